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
import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from kiqa import __version__
from kiqa.contract import ASSETS_EXTRA, PROVENANCE_FILE
from kiqa.errors import ModelError
from kiqa.fsutil import sha256_of, write_json_atomically, write_text_atomically

FILE_NAME = PROVENANCE_FILE
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
        test_metrics: {"plcc", "srcc", "rmse", "n"} on the held-out test part (medians
            for repeated splits; rmse in MOS points, absent from older records), or None.
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

    def __post_init__(self) -> None:
        if self.data not in DATA_KINDS:
            raise ValueError(f"provenance data must be one of {list(DATA_KINDS)}, got {self.data!r}")
        if self.weights not in WEIGHT_KINDS:
            raise ValueError(f"provenance weights must be one of {list(WEIGHT_KINDS)}, got {self.weights!r}")

    # ------------------------------------------------------------------ judgement

    def problems(self) -> List[str]:
        """Why this model's scores are not meaningful.

        Returns:
            One clause per reason; empty when they are meaningful.
        """
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
    def knows_quality(self) -> bool:
        """True only for a pretrained ConvNeXt trained on real rated photos (module docstring)."""
        return not self.problems()

    def warning(self) -> Optional[str]:
        """The plain sentence to show beside this model's scores.

        Returns:
            The sentence, or None when they are meaningful.
        """
        problems = self.problems()
        if not problems:
            return None
        return _NOT_MEANINGFUL + "; ".join(problems) + "."

    def describe(self) -> str:
        """The model in one line, e.g. for a report header.

        Returns:
            Backbone, weights, data and test SRCC.
        """
        data = {"demo": "kiqa's demo data", "koniq": "KonIQ-10k", "custom": "a custom label file"}[self.data]
        weights = {"imagenet": "ImageNet weights", "file": "a weights file", "none": "random weights"}[self.weights]
        text = f"{self.backbone} from {weights}, trained on {data} ({self.split} split"
        text += f", {self.n_images} images)" if self.n_images is not None else ")"
        if self.test_metrics and self.test_metrics.get("srcc") is not None:
            text += f"; test SRCC {self.test_metrics['srcc']:.3f} (n={self.test_metrics.get('n')})"
        return text

    # ------------------------------------------------------------------ storage

    def to_dict(self) -> Dict[str, Any]:
        """The record as a JSON-ready dict.

        Returns:
            {field: value}, with the judgement spelled out (`knows_quality`, `warning`).
        """
        data = dataclasses.asdict(self)
        data["knows_quality"] = self.knows_quality
        data["warning"] = self.warning()
        return data

    def to_json(self) -> str:
        """The record as JSON.

        Returns:
            Indented JSON text of `to_dict`, ending in a newline.
        """
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = "provenance") -> "Provenance":
        """Builds a record from `to_dict` output (derived keys are recomputed, not trusted).

        Args:
            data: the parsed JSON object.
            source: where it came from, for error messages.

        Returns:
            The `Provenance`.

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
    def from_json(cls, text: Union[str, bytes], source: str = "provenance") -> "Provenance":
        """Parses `to_json` output.

        Args:
            text: the JSON text.
            source: where it came from, for error messages.

        Returns:
            The `Provenance`.

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


def weights_fingerprint(arrays):
    """A model's identity by its weights: the same numbers give the same fingerprint.

    sha256 over the sorted sha256 digests of each weight's float32 bytes. Sorted, and
    without names or shapes, because an export holds the run's weights under other
    variable names, in another order, and ConvNeXt's grouped kernels reshaped to
    depthwise ones (same bytes): a SavedModel of a run is the same model as the run.

    Args:
        arrays: the model's weights as array-likes (e.g. `[w.numpy() for w in model.weights]`).

    Returns:
        64 hex digits.
    """
    import numpy as np  # kept out of the module's import: reading a record needs no numpy

    digests = sorted(
        hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest() for array in arrays
    )
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def model_identity(source, kind, image_size, weights_sha256):
    """What a scores file records about the model that wrote it, to refuse mixing on resume.

    Args:
        source: the model path that was loaded (for people; not compared).
        kind: "keras", "savedmodel" or "onnx" (for people; not compared).
        image_size: (height, width) images were decoded to.
        weights_sha256: `weights_fingerprint` of its weights, or None when unknown.
    """
    return {"source": str(source), "kind": kind, "image_size": [int(v) for v in image_size],
            "weights_sha256": weights_sha256}


def same_model(previous, current):
    """True when two `model_identity` dicts are the same weights at the same image size.

    An identity without a fingerprint (an older file, an export made before kiqa recorded
    one) is never the same: kiqa cannot tell, so it does not mix.
    """
    if not isinstance(previous, dict) or not previous.get("weights_sha256"):
        return False
    return (previous.get("weights_sha256") == current.get("weights_sha256")
            and list(previous.get("image_size") or []) == list(current.get("image_size") or []))


def describe_identity(identity):
    """One phrase naming a model by its `model_identity`: source, size and fingerprint start."""
    if not isinstance(identity, dict):
        return "an unrecorded model"
    size = identity.get("image_size") or ["?", "?"]
    weights = (identity.get("weights_sha256") or "unknown")[:12]
    return f"{identity.get('source', 'an unnamed model')} at {size[0]}x{size[1]} (weights {weights})"


def read_sidecar(csv_path):
    """The `write_sidecar` dict beside a CSV, or None when it is missing or unreadable."""
    try:
        data = json.loads(sidecar_path(csv_path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def sidecar_path(csv_path):
    """`scores.csv` -> `scores.csv.provenance.json`."""
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.name + "." + FILE_NAME)


def write_sidecar(csv_path, record, source, **identity):
    """Writes `report_entry` beside a CSV of scores; returns the sidecar's path.

    Args:
        csv_path: the CSV.
        record: the model's `Provenance`, or None.
        source: the model that was used.
        **identity: more of `model_identity` (kind, image_size, weights_sha256), which
            a resumed job compares, and how the scores were computed
            (`Scorer.model_facts`, e.g. a reduced-precision engine's parity).
    """
    path = sidecar_path(csv_path)
    write_json_atomically(path, report_entry(record, source, **identity), sort_keys=True)
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
        candidates = [path / FILE_NAME, path / ASSETS_EXTRA / FILE_NAME]
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
    """PLCC, SRCC, RMSE and n from flat metrics or a repeated-splits summary (medians)."""
    if not metrics:
        return None
    pick = {}
    for key in ("plcc", "srcc", "rmse", "n"):
        if key == "rmse" and key not in metrics:  # older callers' metrics
            continue
        value = metrics.get(key)
        if isinstance(value, dict):
            value = value.get("median")
        pick[key] = None if value is None or value != value else (int(value) if key == "n" else float(value))
    if isinstance(metrics.get("srcc"), dict):
        pick["summary"] = "median over repeated splits"
    return pick
