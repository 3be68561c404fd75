"""Each typed error's remedy in each command's flags: the one table.

Library code raises typed errors (`kiqa.errors`) that state facts as attributes and name
arguments and settings, never command-line flags, because the same error reaches users of
the Python API and of notebooks. Here each error class is turned into what a command's
user types to fix it; `kiqa.cli._common.entry_point` prints the remedy under the error.
A test checks that every flag a remedy names exists in that command's parser (and that
a flag of another command is written inside that command, in backquotes).
"""

import dataclasses
from typing import Callable, Mapping, Optional, Sequence, Union

from kiqa import errors


@dataclasses.dataclass(frozen=True)
class Remedy:
    """One remedy text, for the errors it fits.

    Attributes:
        text: a `str.format` template filled from the error's attributes (e.g.
            "{batch_size}"); a flag of another command goes inside backquotes with that
            command, e.g. "`kiqa export MODEL --image-size 64 64`".
        when: whether the text fits this error (by its attributes); None: always.
    """

    text: str
    when: Optional[Callable[[BaseException], bool]] = None

    def fits(self, err: BaseException) -> bool:
        """Whether this remedy applies to `err`."""
        return self.when is None or bool(self.when(err))


# A command's remedies for one error class: one text, or several tried in order.
Remedies = Union[str, Remedy, Sequence[Remedy]]


def _each(commands: Sequence[str], remedy: Remedies) -> dict:
    """The same remedy for several commands (whose parsers all have its flags)."""
    return {command: remedy for command in commands}


def _attribute_is(name: str, *values: object) -> Callable[[BaseException], bool]:
    """A `when` that holds when the error's attribute `name` is one of `values`."""
    return lambda err: getattr(err, name, None) in values


_UNSAFE = ("pass --unsafe only if you trust where the file came from: it runs the file's code "
           "(a Lambda layer) or ops outside kiqa's allow list")
_UNSAFE_OPS = ("--unsafe skips the op check, for a SavedModel whose source you trust and whose ops "
               "you reviewed")
IGNORE_EXTENSION_HINT = "pass --ignore-extension to pair x.png with x.jpg"
_LOADS_MODELS = ("score", "compare", "export", "score_beam", "map")
_SCORES = ("score", "compare", "evaluate")
_IMAGE_SIZE = (*_SCORES, "map")

# error class -> command (the `kiqa.cli` module name: "train", "serve_dev", ...) -> remedy.
# An error takes the first remedy that fits it, from its own class up its MRO.
REMEDIES: Mapping[type, Mapping[str, Remedies]] = {
    # --------------------------------------------------------------- models
    errors.LambdaLayerError: _each(_LOADS_MODELS, _UNSAFE),
    errors.UntrustedModelError: _each(_LOADS_MODELS, _UNSAFE_OPS),
    errors.UntrustedExportError: {"export": _UNSAFE_OPS},
    errors.BatchMemoryError: _each(_SCORES, "lower --batch-size (the batch held {batch_size} images)"),
    errors.PrecisionParityError: _each(("score", "score_beam"), (
        "score in float32 with --engine openvino or --engine tf"
    )),
    errors.QualityMapError: {"map": Remedy(
        "re-export with `kiqa export`, or pass the run folder as --model",
        when=lambda err: err.layer is None and "signature" in str(err),
    )},
    errors.ImageSizeError: _each(_IMAGE_SIZE, Remedy(
        "drop --image-size, or export again at that size: "
        "`kiqa export MODEL --image-size {requested[0]} {requested[1]}`",
        when=lambda err: bool(err.expected and err.requested),
    )),
    errors.WeightsError: {"train": (
        Remedy("pass --weights PATH to a local Keras weights file of the backbone (e.g. "
               "convnext_{variant}_notop.h5 from Keras' storage), or --weights none for random "
               "initial weights (which learn next to nothing on small data)",
               when=_attribute_is("problem", "download")),
        Remedy("pass --weights PATH to an existing Keras weights file, imagenet or none",
               when=_attribute_is("problem", "missing")),
        Remedy("pass --weights with a file of this variant, or set --variant to the size the file was saved from"),
    )},
    # --------------------------------------------------------------- training runs
    errors.StrategyError: {"train": (
        Remedy("--strategy data-parallel runs on JAX (--backend jax, pip install kiqa[jax]); "
               "on TensorFlow --strategy mirrored uses every GPU of one host",
               when=lambda err: "data-parallel" in (err.alternative, err.strategy)),
        Remedy("On one host: --strategy mirrored uses every local GPU. On several hosts: --backend jax "
               "--strategy data-parallel (pip install kiqa[jax]; docs/multihost.md)"),
    )},
    # A lost process has nothing missing to pass: its message says what to do.
    errors.ClusterError: {"train": Remedy(
        "pass --coordinator-address HOST:PORT, --num-processes N and --process-id I (or set the variables)",
        when=lambda err: bool(err.missing),
    )},
    errors.RunExistsError: {"train": (
        Remedy("pass --run-dir for a new run, or --overwrite to replace it", when=_attribute_is("finished", True)),
        Remedy("pass --run-dir for a new run, or --overwrite to start again"),
    )},
    errors.ImageFolderError: {"train": (
        "pass --images with the folder the label file's image_name values are relative to, or "
        "download KonIQ-10k first: `kiqa fetch-koniq DIR` (then --labels DIR/koniq10k_distributions_sets.csv)"
    )},
    errors.BadImagesError: {
        "train": (
            Remedy("fix or remove them, or pass --on-bad-images drop to train without them",
                   when=_attribute_is("policy", "stop")),
            Remedy("check --images, or raise --max-bad-fraction to drop them"),
        ),
        "evaluate": "check --images (the folder the label file's image names are relative to)",
    },
    errors.LabelsNotFoundError: _each(("train", "evaluate"), (
        "check --labels, or download KonIQ-10k first: `kiqa fetch-koniq DIR` "
        "(then --labels DIR/koniq10k_distributions_sets.csv)"
    )),
    errors.SetTooSmallError: {"train": (
        Remedy("at these fractions the set needs at least {minimum} images (it has {n_images}): "
               "add images, or raise --val-fraction",
               when=lambda err: bool(err.minimum) and err.part == "validation"),
        Remedy("at these fractions the set needs at least {minimum} images (it has {n_images}): "
               "add images, or raise --test-fraction",
               when=lambda err: bool(err.minimum) and err.part == "test"),
        Remedy("at these fractions the set needs at least {minimum} images (it has {n_images}): "
               "add images, or raise --test-fraction or --val-fraction", when=lambda err: bool(err.minimum)),
        Remedy("add images"),
    )},
    errors.NoOfficialSplitError: {
        "train": "pass --split random or --split repeated",
        "evaluate": "pass --split random",
    },
    # --------------------------------------------------------------- outputs
    # --no-skip does not help: kiqa replaces only a CSV it wrote itself.
    errors.NotScoresCsvError: _each(("score", "compare"), "choose another --out, or move that file away"),
    errors.OutputIsInputError: _each(("score", "predict"), "choose another --out"),
    errors.ScoresFromAnotherModelError: {
        "compare": "use a new --out, or pass --no-skip to rescore with this model",
        "predict": "write to another --out, or pass --overwrite to replace it with this model's scores",
        "score": Remedy("write to another --out, or pass --no-skip to replace it and rescore every file "
                        "with this model", when=lambda err: err.path is not None),
    },
    # `kiqa.scoring.compare` marks a no-pair DataError with the images that pair but for their extension.
    errors.DataError: {"compare": Remedy(IGNORE_EXTENSION_HINT,
                                         when=lambda err: bool(getattr(err, "extension_pairable", ())))},
    errors.EvaluationExistsError: {"evaluate": "pass another --out, or --overwrite to replace it"},
    errors.VersionExistsError: {"export": (
        "pick another --version (next free: {next_free}), or pass --overwrite to replace it"
    )},
    # --------------------------------------------------------------- serving
    errors.MessageTooLargeError: {"predict": "lower --batch-size or raise --max-message-mb"},
    errors.ServingStatusError: {"predict": (
        Remedy("check --server: TF Serving's gRPC port is 8500 by default (8501 is REST); for a local "
               "test, serve an export on this machine with `kiqa serve-dev --base EXPORT_BASE_PATH`",
               when=_attribute_is("code", "UNAVAILABLE")),
        Remedy("raise --timeout (a version's first requests can be slow) or check the server's load",
               when=_attribute_is("code", "DEADLINE_EXCEEDED")),
        Remedy("check --model against the name in models.config, and `kiqa predict --status` for the "
               "versions' states", when=_attribute_is("code", "NOT_FOUND")),
        Remedy("pass --signature, or re-export the model with `kiqa export`",
               when=_attribute_is("code", "FAILED_PRECONDITION")),
    )},
    errors.SignatureError: {"predict": (
        Remedy("pass --signature (one of {available}), or re-export the model with `kiqa export`",
               when=_attribute_is("problem", "missing")),
        Remedy("pass the right --model and --signature, or re-export the model with `kiqa export`"),
    )},
    errors.NoExportError: {"serve_dev": "export a model first: `kiqa export RUN --base {base_path}`"},
    errors.PortError: {"serve_dev": "pick another --port"},
    # --------------------------------------------------------------- downloads
    errors.DownloadError: {"fetch": "check --base-url (--split-file-url for the split file), or try again later"},
    errors.ChecksumError: {"fetch": (
        "if the file was legitimately updated, pass --sha256 {name}=<the new digest>"
    )},
    errors.UnsafeArchiveError: {"fetch": "delete {archive} and check --base-url"},
}


def remedies_for(command: str) -> dict:
    """The table's rows for one command.

    Args:
        command: a `kiqa.cli` module name ("train", "serve_dev", ...).

    Returns:
        {error class: its remedies} for the classes that have some for `command`.
    """
    return {cls: by_command[command] for cls, by_command in REMEDIES.items() if command in by_command}


def _as_remedies(remedies: Remedies) -> tuple:
    if isinstance(remedies, str):
        return (Remedy(remedies),)
    if isinstance(remedies, Remedy):
        return (remedies,)
    return tuple(remedies)


def texts(remedies: Remedies) -> list:
    """The template texts of one table entry (for checking the flags they name)."""
    return [remedy.text for remedy in _as_remedies(remedies)]


def remedy_for(err: BaseException, command: str) -> Optional[str]:
    """What a command's user passes to fix a typed error, or None when no flag helps.

    Args:
        err: the error raised.
        command: the `kiqa.cli` module name of the command that raised it ("score", ...).

    Returns:
        The remedy, filled in from the error's attributes, or None.
    """
    for cls in type(err).__mro__:
        entry = REMEDIES.get(cls, {}).get(command)
        if entry is None:
            continue
        for remedy in _as_remedies(entry):
            if remedy.fits(err):
                return remedy.text.format_map(vars(err))
    return None


def command_of(module_name: str) -> str:
    """The table's command key of a `kiqa.cli` module: "kiqa.cli.serve_dev" -> "serve_dev"."""
    return module_name.rsplit(".", 1)[-1]
