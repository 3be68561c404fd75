"""Where a model came from, and whether its scores mean anything.

Every model kiqa trains gets a provenance record: what it was trained on (the demo data,
KonIQ-10k or another label file, with the file's sha256 and image count), its backbone and
starting weights, its test metrics, and the kiqa, TensorFlow and Keras versions. The record
travels with the model:

- training writes `provenance.json` into the run directory, beside `model.keras` and
  `checkpoints/` (Keras 3's `.keras` format has no place for custom metadata: its own
  `metadata.json` holds only the Keras version and the save date);
- `kiqa export` copies it to the SavedModel's `assets.extra/provenance.json` and into a
  `provenance` signature, so a TF Serving client can read it remotely (TF Serving's
  GetModelMetadata only answers `signature_def`);
- `kiqa score`, `compare`, `evaluate`, `predict` and `kiqa-train` print `warning()` when
  the model's scores are not meaningful, and record the provenance in their outputs
  (`report_entry`: a `model` key in JSON reports, a `<csv>.provenance.json` beside a CSV).

The rule behind `knows_quality`: a model knows quality only when it is a ConvNeXt that
started from pretrained weights (ImageNet or a weights file) and was trained on real rated
photos (KonIQ-10k or another label file). Demo data (synthetic distortions with made-up
scores), random initial weights and the small CNN (a teaching backbone, always from random
weights) each make it False. A model without a record (an older export, a bare `.keras`
file) is of unknown provenance: never reported as trustworthy.

No TensorFlow import: reading a record is cheap, and versions come from package metadata.
"""

import dataclasses
import datetime
import json
from importlib import metadata
from pathlib import Path
from typing import Optional

from kiqa import __version__
from kiqa.errors import ModelError
from kiqa.fsutil import sha256_of, write_json_atomically, write_text_atomically

FILE_NAME = "provenance.json"
SCHEMA = 1
# KonIQ-10k has 10,073 rated photos; a label file listing all of them is "koniq".
KONIQ_IMAGES = 10_073
DATA_KINDS = ("demo", "koniq", "custom")
WEIGHT_KINDS = ("imagenet", "file", "none")
SMALL_CNN = "small-cnn"
# Columns only kiqa.data.synthetic's demo label files have.
DEMO_COLUMNS = frozenset({"source_image", "distortion", "level"})

UNKNOWN_WARNING = (
    "unknown provenance: this model carries no provenance record (an older export or a bare "
    ".keras file), so kiqa cannot say what it was trained on or whether its scores mean "
    "anything; treat them as unverified"
)
_NOT_MEANINGFUL = "these scores are not meaningful quality predictions: "


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@dataclasses.dataclass(frozen=True)
class Provenance:
    """A model's origin.

    Attributes:
        data: "demo" (kiqa's built-in synthetic data, or a label file it wrote), "koniq" (a KonIQ-10k label file
            listing all 10,073 photos) or "custom" (any other label file).
        split: how the labels were split: "official", "random" or "repeated".
        labels_file: the label file's path at training time (None for the demo data).
        labels_sha256: its sha256.
        n_images: images the run used (after rejected ones were dropped).
        backbone: "convnext-tiny" ... "convnext-xlarge", "small-cnn", or "custom" (a
            backbone passed in code).
        weights: the backbone's starting weights: "imagenet", "file" or "none" (random).
        weights_file: the weights file's path when weights == "file".
        weights_sha256: its sha256.
        test_metrics: {"plcc", "srcc", "n"} on the held-out test part (medians for
            repeated splits), or None.
        kiqa_version, tensorflow_version, keras_version: the versions that trained it.
        created: ISO 8601 UTC time the record was made.
        schema: version of this record's layout.
    """

    data: str
    split: str
    backbone: str
    weights: str
    labels_file: Optional[str] = None
    labels_sha256: Optional[str] = None
    n_images: Optional[int] = None
    weights_file: Optional[str] = None
    weights_sha256: Optional[str] = None
    test_metrics: Optional[dict] = None
    kiqa_version: Optional[str] = None
    tensorflow_version: Optional[str] = None
    keras_version: Optional[str] = None
    created: Optional[str] = None
    schema: int = SCHEMA

    def __post_init__(self):
        if self.data not in DATA_KINDS:
            raise ValueError(f"provenance data must be one of {list(DATA_KINDS)}, got {self.data!r}")
        if self.weights not in WEIGHT_KINDS:
            raise ValueError(f"provenance weights must be one of {list(WEIGHT_KINDS)}, got {self.weights!r}")

    # ------------------------------------------------------------------ judgement

    def problems(self):
        """Why this model's scores are not meaningful; empty when they are."""
        found = []
        if self.data == "demo":
            found.append("it was trained on kiqa's built-in demo data (synthetic blur, noise and "
                         "JPEG damage with made-up scores), not on photos rated by people")
        if self.backbone == SMALL_CNN:
            found.append("its backbone is the small CNN, a teaching and testing stand-in for "
                         "ConvNeXt trained from random weights")
        elif self.backbone == "custom":
            found.append("its backbone was passed in code, not built by kiqa, so kiqa cannot say "
                         "what it was initialised from")
        elif self.weights == "none":
            found.append("its backbone started from random weights, not ImageNet's (from scratch, "
                         "ConvNeXt learns next to nothing about quality on small data)")
        return found

    @property
    def knows_quality(self):
        """True only for a pretrained ConvNeXt trained on real rated photos (module docstring)."""
        return not self.problems()

    def warning(self):
        """The plain sentence to show beside this model's scores, or None if they are meaningful."""
        problems = self.problems()
        if not problems:
            return None
        return _NOT_MEANINGFUL + "; ".join(problems) + "."

    def describe(self):
        """One line: backbone, weights, data and test SRCC, e.g. for a report header."""
        data = {"demo": "kiqa's demo data", "koniq": "KonIQ-10k", "custom": "a custom label file"}[self.data]
        weights = {"imagenet": "ImageNet weights", "file": "a weights file", "none": "random weights"}[self.weights]
        text = f"{self.backbone} from {weights}, trained on {data} ({self.split} split"
        text += f", {self.n_images} images)" if self.n_images is not None else ")"
        if self.test_metrics and self.test_metrics.get("srcc") is not None:
            text += f"; test SRCC {self.test_metrics['srcc']:.3f} (n={self.test_metrics.get('n')})"
        return text

    # ------------------------------------------------------------------ storage

    def to_dict(self):
        """The record as a JSON-ready dict, with the judgement spelled out."""
        data = dataclasses.asdict(self)
        data["knows_quality"] = self.knows_quality
        data["warning"] = self.warning()
        return data

    def to_json(self):
        """The record as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data, source="provenance"):
        """Builds a record from `to_dict` output (derived keys are recomputed, not trusted).

        Raises:
            ModelError: not an object, unknown layout, or invalid values; names `source`.
        """
        if not isinstance(data, dict):
            raise ModelError(f"{source}: a provenance record must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**fields)
        except (TypeError, ValueError) as err:
            raise ModelError(
                f"{source} is not a kiqa provenance record ({err}); delete it (the model is then "
                f"reported as of unknown provenance) or retrain to write a new one"
            ) from err

    @classmethod
    def from_json(cls, text, source="provenance"):
        """Parses `to_json` output.

        Raises:
            ModelError: not JSON or not a provenance record; names `source`.
        """
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as err:
            raise ModelError(f"{source} is not valid JSON ({err}); delete it or retrain") from err
        return cls.from_dict(data, source=source)


def warning_for(record):
    """The sentence to print beside scores for `record`, or None; an absent record is unknown."""
    return UNKNOWN_WARNING if record is None else record.warning()


def report_entry(record, source, **extra):
    """What an output file records about the model that produced its scores.

    The same dict goes into every JSON report (under "model") and every CSV's
    `<csv>.provenance.json` sidecar.

    Args:
        record: a `Provenance`, or None when the model has none.
        source: the model file, run or SavedModel that was used (or a server address).
        **extra: more facts about the model to record (e.g. kind, image_size).

    Returns:
        {"source", **extra, "provenance" (dict or None), "knows_quality" (bool, None
        when unknown), "warning" (str or None)}.
    """
    return {
        "source": str(source),
        **extra,
        "provenance": record.to_dict() if record is not None else None,
        "knows_quality": record.knows_quality if record is not None else None,
        "warning": warning_for(record),
    }


def sidecar_path(csv_path):
    """`scores.csv` -> `scores.csv.provenance.json`."""
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.name + "." + FILE_NAME)


def write_sidecar(csv_path, record, source, **extra):
    """Writes `report_entry` (with `extra`, e.g. a reduced-precision engine's parity)
    beside a CSV of scores; returns the sidecar's path."""
    path = sidecar_path(csv_path)
    write_json_atomically(path, report_entry(record, source, **extra), sort_keys=True)
    return path


def write(folder, record):
    """Writes `record` as `<folder>/provenance.json` (atomically); returns the path."""
    path = Path(folder) / FILE_NAME
    write_text_atomically(path, record.to_json())
    return path


def read(path):
    """Reads a provenance file.

    Raises:
        ModelError: unreadable or not a provenance record (the message names the file).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ModelError(f"cannot read the provenance file {path}: {err.strerror}") from err
    return Provenance.from_json(text, source=str(path))


def find_for_model(model_ref):
    """The provenance of a model on disk, or None when it has none.

    Looks where kiqa writes it: a run directory's `provenance.json`; beside a `.keras`
    file (or above `checkpoints/`, for `checkpoints/best.keras`); a SavedModel version
    directory's `assets.extra/provenance.json`.

    Raises:
        ModelError: a provenance file exists but cannot be read.
    """
    path = Path(model_ref)
    if path.is_file():
        candidates = [path.parent / FILE_NAME]
        if path.parent.name == "checkpoints":
            candidates.append(path.parent.parent / FILE_NAME)
    else:
        candidates = [path / FILE_NAME, path / "assets.extra" / FILE_NAME]
    for candidate in candidates:
        if candidate.is_file():
            return read(candidate)
    return None


def for_training(config, metrics, n_images, n_labelled, custom_backbone=False):
    """The record of a finished training run.

    Args:
        config: the run's `TrainConfig`.
        metrics: its test metrics: a flat dict (plcc, srcc, n) or, for repeated splits,
            `summarize_repeats` output ({metric: {"median", ...}}).
        n_images: images the run used.
        n_labelled: rows of the label file (before rejected images were dropped).
        custom_backbone: a backbone was passed in code instead of chosen by the config.

    Returns:
        A `Provenance`.
    """
    if config.labels is None:
        data, labels_sha = "demo", None
    else:
        labels_sha = sha256_of(config.labels)
        if _is_demo_labels(config.labels):
            data = "demo"
        else:
            data = "koniq" if n_labelled == KONIQ_IMAGES else "custom"
    if custom_backbone:
        backbone = "custom"
    elif config.backbone == SMALL_CNN:
        backbone = SMALL_CNN
    else:
        backbone = f"convnext-{config.variant}"
    if config.weights in ("imagenet", "none"):
        weights, weights_file, weights_sha = config.weights, None, None
    else:
        weights, weights_file, weights_sha = "file", str(config.weights), sha256_of(config.weights)
    return Provenance(
        data=data,
        split=config.split,
        backbone=backbone,
        weights=weights,
        labels_file=str(config.labels) if config.labels else None,
        labels_sha256=labels_sha,
        n_images=int(n_images),
        weights_file=weights_file,
        weights_sha256=weights_sha,
        test_metrics=_headline(metrics),
        kiqa_version=__version__,
        tensorflow_version=_version("tensorflow") or _version("tensorflow-cpu"),
        keras_version=_version("keras"),
        created=_now(),
    )


def _is_demo_labels(path):
    """True for a label file kiqa's demo generator wrote (or a subset of one): its header
    has the synthetic distortion columns, which no rated dataset has."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        header = {name.strip().strip('"') for name in handle.readline().split(",")}
    return DEMO_COLUMNS <= header


def _headline(metrics):
    """PLCC, SRCC and n from flat metrics or a repeated-splits summary (medians)."""
    if not metrics:
        return None
    pick = {}
    for key in ("plcc", "srcc", "n"):
        value = metrics.get(key)
        if isinstance(value, dict):
            value = value.get("median")
        pick[key] = None if value is None or value != value else (int(value) if key == "n" else float(value))
    if isinstance(metrics.get("srcc"), dict):
        pick["summary"] = "median over repeated splits"
    return pick
