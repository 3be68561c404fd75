"""Local inference: one `Scorer` over a `.keras` model or an exported SavedModel.

`load_scorer` accepts what users have at hand after training or export:

- a run directory (`runs/<name>/` with `model.keras` and `config.json`),
- a `.keras` file (its size comes from a `config.json` beside it or above its
  `checkpoints/` folder; a bare file needs the caller to say the size),
- a SavedModel: a TF Serving base path (`export/kiqa/`, whose highest integer
  version is used) or one version directory (`export/kiqa/3/`); the size comes
  from the export's `assets.extra/kiqa.json`.

Engines (`engine=`): "tf" runs the Keras model or the SavedModel in TensorFlow;
"onnxruntime" and "openvino" run an ONNX export (`kiqa export --format onnx`: its base
path, version folder or `model.onnx`), or convert a Keras model to ONNX at load time
(tens of seconds for ConvNeXt-Tiny; the converted file is checked against the Keras
model on generated images before it scores anything). An engine replaces only
`Scorer.predict_pixels`' model call: decoding stays `kiqa.image.decode_image`.

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
from kiqa.config import TrainConfig
from kiqa.contract import (
    ASSETS_EXTRA,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_PIXELS,
    MAX_BATCH as SAVED_MODEL_MAX_BATCH,
    METADATA_FILE,
    MOS_OUTPUT,
    PIXELS_INPUT,
    PIXELS_SIGNATURE,
)
from kiqa.errors import ConfigError, ExportError, ModelError, UntrustedModelError

SAVED_MODEL_FILE = "saved_model.pb"
EXPORT_INFO = Path(ASSETS_EXTRA) / METADATA_FILE
ONNX_FILE = "model.onnx"
ONNX_INFO = "kiqa.json"
# "tf" is the default: it needs no extra package and no conversion. Measured side by side
# at 384x512 ConvNeXt-Tiny on the shared 2-core build machine (benchmarks/README.md,
# "Engines"), OpenVINO f32 ran ~1.3x TF and ONNX Runtime ~0.75x, with parity ~4e-6 MOS.
ENGINES = ("tf", "onnxruntime", "openvino")
DEFAULT_ENGINE = "tf"


@dataclasses.dataclass(frozen=True)
class Scorer:
    """A loaded model that maps decoded pixel batches to MOS.

    Attributes:
        image_size: (height, width) images must be decoded to (`decode_image`).
        max_pixels: header pixel cap to decode with (the training run's or export's).
        source: the model file or SavedModel version directory that was loaded.
        kind: "keras", "savedmodel" or "onnx".
        engine: what runs the model: "tf", "onnxruntime" or "openvino".
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
    engine: str = DEFAULT_ENGINE
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
            mos = self._predict(tf.constant(batch) if self.engine == "tf" else batch)
        except tf.errors.ResourceExhaustedError as err:
            raise ModelError(
                f"{self.source}: out of memory scoring a batch of {batch.shape[0]} images at "
                f"{expected[0]}x{expected[1]}; use a smaller batch size (--batch-size)"
            ) from err
        return np.asarray(mos, dtype=np.float32).reshape(-1)


def load_scorer(model_ref, image_size=None, safe_mode=True, engine=DEFAULT_ENGINE):
    """Loads a model for local scoring.

    Args:
        model_ref: a run directory (model.keras + config.json), a `.keras` file,
            a SavedModel base path (its highest integer version is used) or a
            SavedModel version directory.
        image_size: (height, width) to decode images to. None takes the size the
            model was trained or exported at. A Keras model is fully convolutional
            and accepts another size; a SavedModel only takes its export size.
        safe_mode: refuse `.keras` files with Lambda layers (arbitrary code) and
            SavedModels using ops outside kiqa's allow list (`kiqa.serving.ops`).
        engine: "tf", "onnxruntime" or "openvino" (see the module docstring).

    Returns:
        A `Scorer`.

    Raises:
        ModelError: the path is missing, is none of the layouts above, the model
            or the model cannot be loaded; the message names the path and the fix.
        UntrustedModelError: (a ModelError) a SavedModel's graph uses ops outside the
            allow list (it is scanned before anything runs); they are named.
    """
    path = Path(model_ref)
    if image_size is not None:
        image_size = _check_size(image_size, path)
    if engine not in ENGINES:
        raise ModelError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    onnx_file = _onnx_file(path)
    if engine != "tf":
        return _onnx_scorer(path, onnx_file, image_size, safe_mode, engine)
    if onnx_file is not None:
        raise ModelError(
            f"{path} is an ONNX export; score it with the onnxruntime or openvino engine, "
            f"or pass the run directory or SavedModel for TensorFlow"
        )
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
        return _saved_model_scorer(path, image_size, safe_mode)
    versions = _versions(path)
    if versions:
        return _saved_model_scorer(versions[-1][1], image_size, safe_mode)
    raise ModelError(
        f"{path} is not a model: no model.keras (run directory), no {SAVED_MODEL_FILE} "
        f"(SavedModel version directory) and no integer version folders holding one "
        f"(SavedModel base path); train with `kiqa train` or export with `kiqa export` first"
    )


def _onnx_file(path):
    """The model.onnx of an ONNX export (file, version folder or base path), else None."""
    if path.is_file():
        return path if path.suffix == ".onnx" else None
    if (path / ONNX_FILE).is_file():
        return path / ONNX_FILE
    if path.is_dir():
        versions = sorted(
            (int(c.name), c / ONNX_FILE) for c in path.iterdir()
            if c.name.isdigit() and (c / ONNX_FILE).is_file()
        )
        if versions:
            return versions[-1][1]
    return None


def _onnx_scorer(path, onnx_file, image_size, safe_mode, engine):
    """A scorer running an ONNX file in ONNX Runtime or OpenVINO."""
    from kiqa.serving import engines

    if onnx_file is None:
        if path.is_dir() and ((path / SAVED_MODEL_FILE).is_file() or _versions(path)):
            raise ModelError(
                f"{path} is a SavedModel; the {engine} engine runs ONNX: export the run with "
                f"`kiqa export RUN --format onnx` and pass that, or use the tf engine"
            )
        keras_scorer = load_scorer(path, image_size, safe_mode)
        predict, owner = engines.converted_predictor(keras_scorer._owner, keras_scorer.image_size, engine)
        return Scorer(
            image_size=keras_scorer.image_size, max_pixels=keras_scorer.max_pixels,
            source=keras_scorer.source, kind="keras", _predict=predict, _owner=owner, engine=engine,
        )
    info_path = onnx_file.parent / ONNX_INFO
    try:
        info = json.loads(info_path.read_text())
        export_size = tuple(int(v) for v in info["image_size"])
        max_pixels = int(info.get("max_pixels", DEFAULT_MAX_PIXELS))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(
            f"ONNX export {onnx_file.parent} has no readable {ONNX_INFO} with its image_size "
            f"({err}); export it with `kiqa export --format onnx`"
        ) from err
    if image_size is not None and image_size != export_size:
        raise ModelError(
            f"ONNX model {onnx_file} takes {export_size[0]}x{export_size[1]} images; drop the "
            f"image size option, or export again with --image-size {image_size[0]} {image_size[1]}"
        )
    predict, owner = engines.onnx_predictor(onnx_file, engine)
    return Scorer(
        image_size=export_size, max_pixels=max_pixels, source=str(onnx_file), kind="onnx",
        _predict=predict, _owner=owner, engine=engine,
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


def _refuse_unknown_ops(version_dir):
    """Checks the graph against kiqa's op allow list before TF runs any of it.

    A SavedModel is a program: a hostile or careless one can read or write files on
    the machine that scores with it (`ReadFile`, `TextLineDataset`, `SaveV2` in a
    signature, ...). kiqa's own exports use only the ops of `kiqa.serving.ops`
    (`kiqa.serving.export` checks that too), so one that uses any other is not run.
    """
    from kiqa.serving import ops as serving_ops, savedmodel  # the graph reader and the allow list

    try:
        meta_graph = savedmodel.read_meta_graph(version_dir)
    except ExportError as err:
        raise ModelError(f"cannot load SavedModel {version_dir}: {err}; re-export it with `kiqa export`") from err
    refused = serving_ops.refused_ops(meta_graph)
    if refused:
        raise UntrustedModelError(
            f"SavedModel {version_dir} uses ops outside kiqa's allow list: {refused}. A "
            f"SavedModel is a program, and these may read or write files, open connections "
            f"or run code; kiqa's own exports use none of them. Use an export made by `kiqa "
            f"export` from a source you trust",
            path=str(version_dir), ops=refused,
        )


def _saved_model_scorer(version_dir, image_size, safe_mode=True):
    export_size, max_pixels = _read_export_info(version_dir)
    if safe_mode:
        _refuse_unknown_ops(version_dir)
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
        # kiqa exports refuse more than MAX_BATCH images per call (kiqa.export): a larger
        # --batch-size is split here rather than refused.
        return tf.concat([
            signature(**{PIXELS_INPUT: images[start : start + SAVED_MODEL_MAX_BATCH]})[MOS_OUTPUT]
            for start in range(0, int(images.shape[0]), SAVED_MODEL_MAX_BATCH)
        ], axis=0)

    return Scorer(
        image_size=tuple(image_size), max_pixels=max_pixels, source=str(version_dir),
        kind="savedmodel", _predict=predict, _owner=loaded,
        provenance=provenance_lib.find_for_model(version_dir),
    )
