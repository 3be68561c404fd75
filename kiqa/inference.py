"""Local inference: one `Scorer` over a `.keras` model or an exported SavedModel.

`load_scorer` accepts what users have at hand after training or export:

- a run directory (`runs/<name>/` with `model.keras` and `config.json`),
- a `.keras` file (its size comes from a `config.json` beside it or above its
  `checkpoints/` folder; a bare file needs the caller to say the size),
- a SavedModel: a TF Serving base path (`export/kiqa/`, whose highest integer
  version is used) or one version directory (`export/kiqa/3/`); the size comes
  from the export's `assets.extra/kiqa.json`.

Every scorer takes pixel batches already decoded by `kiqa.image.decode_image` at its
`image_size`, so local scoring sees the pixels training saw, and a `.keras` model and
its export agree (the SavedModel's `score_pixels` signature skips the bytes path).
"""

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import numpy as np
import tensorflow as tf

from kiqa import provenance as provenance_lib
from kiqa.config import DEFAULT_MAX_PIXELS, TrainConfig
from kiqa.errors import ConfigError, ExportError, ModelError

# Size for a bare .keras file with no config.json: the default training size.
DEFAULT_IMAGE_SIZE = (384, 512)
SAVED_MODEL_FILE = "saved_model.pb"
EXPORT_INFO = Path("assets.extra") / "kiqa.json"
PIXELS_SIGNATURE = "score_pixels"
PIXELS_INPUT = "image"
MOS_OUTPUT = "mos"


@dataclasses.dataclass(frozen=True)
class Scorer:
    """A loaded model that maps decoded pixel batches to MOS.

    Attributes:
        image_size: (height, width) images must be decoded to (`decode_image`).
        max_pixels: header pixel cap to decode with (the training run's or export's).
        source: the model file or SavedModel version directory that was loaded.
        kind: "keras" or "savedmodel".
        provenance: the model's `kiqa.provenance.Provenance` (from the run directory
            or the SavedModel's `assets.extra/provenance.json`), or None when it has
            none: then its origin is unknown, and commands say so.
    """

    image_size: Tuple[int, int]
    max_pixels: int
    source: str
    kind: str
    _predict: Callable[[tf.Tensor], tf.Tensor] = dataclasses.field(repr=False)
    # The Keras model or the loaded SavedModel: a signature function must not
    # outlive the object it was loaded from (its variables go with it).
    _owner: Any = dataclasses.field(repr=False, default=None)
    provenance: Optional[provenance_lib.Provenance] = None

    def predict_pixels(self, batch):
        """Scores a batch of decoded images.

        Args:
            batch: float32 array [batch, height, width, 3] of 0..255 pixels at
                `image_size`, as `kiqa.image.decode_image` returns them.

        Returns:
            float32 numpy array [batch] of MOS on KonIQ's 0-100 scale (higher is better).

        Raises:
            ModelError: the batch has the wrong shape for this model, or does not fit
                in memory.
        """
        batch = np.asarray(batch, dtype=np.float32)
        expected = (*self.image_size, 3)
        if batch.ndim != 4 or batch.shape[1:] != expected:
            raise ModelError(
                f"{self.source}: expected a pixel batch of shape [batch, {expected[0]}, "
                f"{expected[1]}, 3], got {list(batch.shape)}; decode images with "
                f"kiqa.image.decode_image at the scorer's image_size"
            )
        if batch.shape[0] == 0:
            return np.zeros([0], np.float32)
        try:
            mos = self._predict(tf.constant(batch))
        except tf.errors.ResourceExhaustedError as err:
            raise ModelError(
                f"{self.source}: out of memory scoring a batch of {batch.shape[0]} images at "
                f"{expected[0]}x{expected[1]}; use a smaller batch size (--batch-size)"
            ) from err
        return np.asarray(mos, dtype=np.float32).reshape(-1)


def load_scorer(model_ref, image_size=None, safe_mode=True):
    """Loads a model for local scoring.

    Args:
        model_ref: a run directory (model.keras + config.json), a `.keras` file,
            a SavedModel base path (its highest integer version is used) or a
            SavedModel version directory.
        image_size: (height, width) to decode images to. None takes the size the
            model was trained or exported at. A Keras model is fully convolutional
            and accepts another size; a SavedModel only takes its export size.
        safe_mode: refuse `.keras` files with Lambda layers (arbitrary code).

    Returns:
        A `Scorer`.

    Raises:
        ModelError: the path is missing, is none of the layouts above, the model
            cannot be loaded, or a SavedModel's graph holds file-system ops (it is
            scanned before anything runs); the message names the path and the fix.
    """
    path = Path(model_ref)
    if image_size is not None:
        image_size = _check_size(image_size, path)
    if not path.exists():
        raise ModelError(
            f"model {path} not found; pass a run directory (model.keras + config.json), "
            f"a .keras file, or an exported SavedModel (e.g. export/kiqa)"
        )
    if path.is_file():
        if path.suffix != ".keras":
            raise ModelError(
                f"model {path} is not a .keras file; pass a run directory, a .keras file, "
                f"or a SavedModel directory (e.g. export/kiqa)"
            )
        return _keras_scorer(path, image_size, safe_mode)
    if (path / "model.keras").is_file():
        return _keras_scorer(path / "model.keras", image_size, safe_mode)
    if (path / SAVED_MODEL_FILE).is_file():
        return _saved_model_scorer(path, image_size)
    versions = _versions(path)
    if versions:
        return _saved_model_scorer(versions[-1][1], image_size)
    raise ModelError(
        f"{path} is not a model: no model.keras (run directory), no {SAVED_MODEL_FILE} "
        f"(SavedModel version directory) and no integer version folders holding one "
        f"(SavedModel base path); train with `kiqa train` or export with `kiqa export` first"
    )


def _check_size(image_size, path):
    try:
        size = tuple(int(v) for v in image_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise ModelError(f"image size for {path} must be (height, width) in pixels, got {image_size!r}")
    return size


def _versions(base):
    """Integer-named subfolders holding a SavedModel, sorted by version."""
    found = []
    for child in base.iterdir():
        if child.is_dir() and child.name.isdigit() and (child / SAVED_MODEL_FILE).is_file():
            found.append((int(child.name), child))
    return sorted(found)


def _config_beside(model_file):
    """The run's config.json for a model file: beside it, or above `checkpoints/`."""
    candidates = [model_file.parent / "config.json"]
    if model_file.parent.name == "checkpoints":
        candidates.append(model_file.parent.parent / "config.json")
    for candidate in candidates:
        if candidate.is_file():
            try:
                return TrainConfig.load(candidate)
            except ConfigError as err:
                raise ModelError(
                    f"{candidate} (the config of model {model_file}) is unusable: {err}; "
                    f"fix or remove it and pass the image size explicitly"
                ) from err
    return None


def _keras_scorer(model_file, image_size, safe_mode):
    from kiqa.model import load_model  # Keras model code only when a .keras file is used

    config = _config_beside(model_file)
    max_pixels = config.max_pixels if config else DEFAULT_MAX_PIXELS
    if image_size is None:
        if config is not None:
            image_size = tuple(config.image_size)
        else:
            image_size = DEFAULT_IMAGE_SIZE
            warnings.warn(
                f"{model_file} has no config.json beside it; scoring at the default "
                f"{image_size[0]}x{image_size[1]} (height x width). Pass the size the model "
                f"was trained at (--image-size H W) if it differs",
                stacklevel=3,
            )
    model = load_model(model_file, safe_mode=safe_mode)
    height, width = image_size

    # A plain tf.function, not model.predict: measured ~9% faster on CPU, and one
    # trace serves every batch size (the batch dimension is None).
    @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32)])
    def predict(images):
        outputs = model(images, training=False)
        if isinstance(outputs, dict):
            outputs = outputs[MOS_OUTPUT]
        return tf.reshape(tf.cast(outputs, tf.float32), [-1])

    return Scorer(
        image_size=tuple(image_size), max_pixels=int(max_pixels), source=str(model_file),
        kind="keras", _predict=predict, _owner=model,
        provenance=provenance_lib.find_for_model(model_file),
    )


def _read_export_info(version_dir):
    info_path = version_dir / EXPORT_INFO
    try:
        info = json.loads(info_path.read_text())
        size = tuple(int(v) for v in info["image_size"])
        max_pixels = int(info.get("max_pixels", DEFAULT_MAX_PIXELS))
    except OSError as err:
        raise ModelError(
            f"SavedModel {version_dir} has no readable {EXPORT_INFO} ({err.strerror}); "
            f"export it with `kiqa export`, which records the image size there"
        ) from err
    except (ValueError, KeyError, TypeError) as err:
        raise ModelError(
            f"{info_path} does not hold an image_size [height, width] ({err}); "
            f"re-export the model with `kiqa export`"
        ) from err
    if len(size) != 2:
        raise ModelError(f"{info_path}: image_size must be [height, width], got {list(size)}")
    return size, max_pixels


def _refuse_file_system_ops(version_dir):
    """Scans the graph like `saved_model_cli scan` before TF runs any of it.

    A SavedModel is a program: a hostile or careless one can read or write files on
    the machine that scores with it (`ReadFile`, `WriteFile`, ...). kiqa's exports
    contain none of those ops (`kiqa.export` refuses them), so one that does is not a
    kiqa export and is not run.
    """
    from kiqa import export  # the export's own deny list and graph reader

    try:
        meta_graph = export.read_meta_graph(version_dir)
    except ExportError as err:
        raise ModelError(f"cannot load SavedModel {version_dir}: {err}; re-export it with `kiqa export`") from err
    denied = sorted(export.ops_used(meta_graph) & export.DENYLISTED_OPS)
    if denied:
        raise ModelError(
            f"SavedModel {version_dir} uses ops that touch the file system or logs {denied}; "
            f"a SavedModel is a program and kiqa does not run one that can read or write "
            f"files. kiqa exports have none: use an export made by `kiqa export` from a "
            f"source you trust"
        )


def _saved_model_scorer(version_dir, image_size):
    export_size, max_pixels = _read_export_info(version_dir)
    _refuse_file_system_ops(version_dir)
    try:
        loaded = tf.saved_model.load(str(version_dir))
    except Exception as err:  # TF raises several op/IO error types for a broken SavedModel
        raise ModelError(
            f"cannot load SavedModel {version_dir}: {' '.join(str(err).split())[:300]}; "
            f"re-export it with `kiqa export`"
        ) from err
    signatures = getattr(loaded, "signatures", {})
    if PIXELS_SIGNATURE not in signatures:
        raise ModelError(
            f"SavedModel {version_dir} has no {PIXELS_SIGNATURE!r} signature (it has "
            f"{sorted(signatures)}); re-export it with `kiqa export`"
        )
    signature = signatures[PIXELS_SIGNATURE]
    _, spec = signature.structured_input_signature
    if PIXELS_INPUT not in spec:
        raise ModelError(
            f"SavedModel {version_dir}: signature {PIXELS_SIGNATURE!r} takes {sorted(spec)}, "
            f"not {PIXELS_INPUT!r}; re-export it with `kiqa export`"
        )
    fixed = tuple(spec[PIXELS_INPUT].shape.as_list()[1:3])
    if image_size is None:
        image_size = export_size
    elif image_size != export_size and None not in fixed:
        raise ModelError(
            f"SavedModel {version_dir} was exported for {export_size[0]}x{export_size[1]} "
            f"images and its signature takes only that size; drop the image size option, "
            f"or export again with --image-size {image_size[0]} {image_size[1]}"
        )

    def predict(images):
        return signature(**{PIXELS_INPUT: images})[MOS_OUTPUT]

    return Scorer(
        image_size=tuple(image_size), max_pixels=max_pixels, source=str(version_dir),
        kind="savedmodel", _predict=predict, _owner=loaded,
        provenance=provenance_lib.find_for_model(version_dir),
    )
