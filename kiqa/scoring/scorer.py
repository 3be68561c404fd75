"""Local inference: one `Scorer` over a `.keras` model, a SavedModel or an ONNX export.

`load_scorer` accepts every model path `kiqa.run.resolve_model` resolves: a run folder,
a `.keras` file (its size comes from the run's `config.json` beside it or above its
`checkpoints/` folder; a bare file needs the caller to say the size), a SavedModel base
path or version folder (the size comes from `assets.extra/kiqa.json`), an ONNX export.

Engines (`engine=`): "tf" runs the Keras model or the SavedModel in TensorFlow;
"onnxruntime" and "openvino" run an ONNX export (its base path, version folder or
`model.onnx`), or convert a Keras model to ONNX at load time (tens of seconds for
ConvNeXt-Tiny; the converted file is checked against the Keras model on generated images
before it scores anything). "openvino-bf16" is the reduced-precision engine: OpenVINO in
bfloat16, gated at load on the caller's photos (`parity_images`) and generated ones
against float32 (`kiqa.serving.engines.gated_predictor`); its figures are the scorer's
`precision_parity` and go into every output's provenance. An engine replaces only the
model call: decoding stays `kiqa.image.decode_image`.

The `Scorer` is the one forward pass behind `kiqa score`, evaluation, training's
validation pass and the notebooks: `score` / `score_many` read and decode files as
`kiqa score` does; `predict_pixels` takes pixel batches already decoded by
`kiqa.image.decode_image` at its `image_size`, so local scoring sees the pixels training
saw, and a `.keras` model and its export agree.
"""

import dataclasses
import json
import os
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import tensorflow as tf

if TYPE_CHECKING:  # Keras loads lazily here: only the Keras path needs it
    import keras

from kiqa import provenance as provenance_lib
from kiqa.scoring import batches as batch_lib
from kiqa.contract import (
    ASSETS_EXTRA,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DIST_OUTPUT,
    DISTRIBUTION_COLUMNS,
    ERROR_COLUMN,
    MAX_BATCH as SAVED_MODEL_MAX_BATCH,
    METADATA_FILE,
    MOS_COLUMN,
    MOS_OUTPUT,
    PATH_COLUMN,
    PIXELS_INPUT,
    PIXELS_SIGNATURE,
    SD_OUTPUT,
    WEIGHTS_KEY,
)
from kiqa.errors import (
    BatchMemoryError, ExportError, ImageError, ImageSizeError, ModelError, ModelMetadataError, UntrustedModelError,
)
from kiqa.run import ModelPath, resolve_model

EXPORT_INFO = Path(ASSETS_EXTRA) / METADATA_FILE
# "tf" is the default: it needs no extra package and no conversion. Measured side by side
# at 384x512 ConvNeXt-Tiny on the shared 2-core build machine (benchmarks/README.md,
# "Engines"), OpenVINO f32 ran ~1.3x TF and ONNX Runtime ~0.75x, with parity ~4e-6 MOS.
ENGINES = ("tf", "onnxruntime", "openvino", "openvino-bf16")
# Photos of the caller's a reduced-precision engine is checked on (besides generated ones):
# enough to see a ranking, few enough to add seconds, not minutes, to loading.
PARITY_SAMPLE = 16
DEFAULT_ENGINE = "tf"
ImageInput = Union[str, os.PathLike, bytes]
# An export's kiqa.json is a file beside the model, not the model: its image_size must be
# the size the model's input takes, and at most this on either side when the input does
# not fix one (a 20000x20000 claim beside a 48x64 model got `kiqa score` killed by memory).
MAX_MODEL_IMAGE_SIDE = 4096
if TYPE_CHECKING:
    from kiqa.maps import QualityMap


@dataclasses.dataclass(frozen=True)
class Scorer:
    """A loaded model: scores image files or bytes (`score`, `score_many`) and decoded
    pixel batches (`predict_pixels`) as MOS. Make one with `load_scorer`.

    Attributes:
        image_size: (height, width) images must be decoded to (`decode_image`).
        max_pixels: header pixel cap to decode with (the training run's or export's).
        source: the model file or SavedModel version directory that was loaded.
        kind: "keras", "savedmodel" or "onnx".
        engine: what runs the model: "tf", "onnxruntime", "openvino" or "openvino-bf16".
        precision_parity: for a reduced-precision engine, how far it is from float32 on
            the parity images (`kiqa.serving.engines.gated_predictor`'s figures); None
            for a float32 engine.
        provenance: the model's `kiqa.provenance.Provenance` (from the run directory
            or the SavedModel's `assets.extra/provenance.json`), or None when it has
            none: then its origin is unknown, and commands say so.
        weights_sha256: the weights' `kiqa.provenance.weights_fingerprint` as an export
            recorded it; None for a Keras model (computed from its weights when asked)
            or an export made before kiqa recorded it (unknown).
        distribution: True for a distribution model (`TrainConfig.head` "distribution"):
            besides `mos` it predicts `mos_sd` and the shares `p1..p5`
            (`predict_outputs`, and extra columns in `score_many`).
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
    weights_sha256: Optional[str] = None
    distribution: bool = False
    precision_parity: Optional[dict] = None

    def identity(self) -> dict:
        """The model's `kiqa.provenance.model_identity`: what a resumed scores file must match.

        A Keras model's fingerprint is computed from its weights now (they change while
        it trains), an export's is the one recorded when it was exported.

        Returns:
            dict source, kind, image_size and weights_sha256 (None when unknown).
        """
        fingerprint = self.weights_sha256
        weights = getattr(self._owner, "weights", None) if fingerprint is None else None
        if weights is not None and self.kind == "keras":
            fingerprint = provenance_lib.weights_fingerprint(np.asarray(w) for w in weights)
        return provenance_lib.model_identity(self.source, self.kind, self.image_size, fingerprint)

    def model_facts(self) -> dict:
        """What outputs record about how the scores were computed, beside the provenance.

        Returns:
            {} for float32; the engine and its parity figures for a reduced-precision one.
        """
        if self.precision_parity is None:
            return {}
        return {"engine": self.engine, "precision_parity": dict(self.precision_parity)}

    @classmethod
    def from_keras_model(
        cls, model: "keras.Model", image_size: Sequence[int], max_pixels: int = DEFAULT_MAX_PIXELS,
        source: str = "in-memory keras.Model", provenance: Optional[provenance_lib.Provenance] = None,
    ) -> "Scorer":
        """A scorer over a Keras model in memory (training's validation pass uses this).

        Args:
            model: a kiqa Keras model (input `image`, output `mos`).
            image_size: (height, width) it scores images at.
            max_pixels: header pixel cap to decode with.
            source: what to call the model in messages.
            provenance: its `kiqa.provenance.Provenance`, if known.

        Returns:
            The `Scorer`.
        """
        return cls(
            image_size=(int(image_size[0]), int(image_size[1])), max_pixels=int(max_pixels), source=source,
            kind="keras", _predict=keras_forward(model, image_size), _owner=model, provenance=provenance,
            distribution=is_distribution_model(model),
        )

    def predict_pixels(self, batch: Union[np.ndarray, tf.Tensor]) -> np.ndarray:
        """Scores a batch of decoded images.

        Args:
            batch: float32 array or tensor [batch, height, width, 3] of 0..255 pixels at
                `image_size` (see `predict_outputs`).

        Returns:
            float32 numpy array [batch] of MOS on KonIQ's 0-100 scale (higher is better).
        """
        return self.predict_outputs(batch)[MOS_OUTPUT]

    def predict_outputs(self, batch: Union[np.ndarray, tf.Tensor]) -> Dict[str, np.ndarray]:
        """Scores a batch of decoded images.

        Args:
            batch: float32 array or tensor [batch, height, width, 3] of 0..255 pixels at
                `image_size`, as `kiqa.image.decode_image` returns them.

        Returns:
            dict of float32 numpy arrays: `mos` [batch] on KonIQ's 0-100 scale (higher is
            better), and for a distribution model `mos_sd` [batch] (0-100 points) and
            `dist` [batch, 5] (shares of the rating levels 1..5).

        Raises:
            ModelError: the batch has the wrong shape for this model.
            BatchMemoryError: (a ModelError) the batch does not fit in memory.
        """
        if self.engine == "tf" and isinstance(batch, tf.Tensor):
            batch = tf.cast(batch, tf.float32)  # already on the device: no copy to numpy and back
        else:
            batch = np.asarray(batch, dtype=np.float32)
        expected = (*self.image_size, 3)
        if len(batch.shape) != 4 or tuple(batch.shape[1:]) != expected:
            raise ModelError(
                f"{self.source}: expected a pixel batch of shape [batch, {expected[0]}, "
                f"{expected[1]}, 3], got {list(batch.shape)}; decode images with "
                f"kiqa.image.decode_image at the scorer's image_size",
                path=self.source,
            )
        if batch.shape[0] == 0:
            empty = {MOS_OUTPUT: np.zeros([0], np.float32)}
            if self.distribution:
                empty.update({SD_OUTPUT: np.zeros([0], np.float32), DIST_OUTPUT: np.zeros([0, 5], np.float32)})
            return empty
        try:
            inputs = tf.constant(batch) if self.engine == "tf" and not isinstance(batch, tf.Tensor) else batch
            outputs = self._predict(inputs)
        except tf.errors.ResourceExhaustedError as err:
            raise BatchMemoryError(
                f"{self.source}: out of memory scoring a batch of {batch.shape[0]} images at "
                f"{expected[0]}x{expected[1]}",
                path=self.source, batch_size=int(batch.shape[0]),
            ) from err
        return _as_outputs(outputs)

    def score(self, image: ImageInput) -> float:
        """The MOS of one image.

        Args:
            image: an image file's path, or its encoded bytes (JPEG, PNG, BMP, GIF, WebP).

        Returns:
            MOS on KonIQ's 0-100 scale (higher is better), rounded to 4 decimals as
            `kiqa score` writes it.

        Raises:
            ImageError: the image cannot be read or decoded (the reason is the message).
            ModelError: the model failed.
        """
        if not isinstance(image, (bytes, bytearray, memoryview)) and not os.fspath(image):
            raise ImageError(EMPTY_PATH)
        row = self.score_many([image], batch_size=1).iloc[0]
        if row[ERROR_COLUMN] is not None:
            label = "image bytes" if isinstance(image, (bytes, bytearray, memoryview)) else os.fspath(image)
            raise ImageError(f"{label}: {row[ERROR_COLUMN]}", path=None if label == "image bytes" else label)
        return float(row[MOS_COLUMN])

    def quality_map(self, image: ImageInput) -> "QualityMap":
        """Where the image's quality is good or bad: local MOS on a grid (`kiqa.maps`).

        Args:
            image: an image file's path, or its encoded bytes.

        Returns:
            A `kiqa.maps.QualityMap`: `values` [rows, cols] of local MOS (0-100, higher
            is better) whose mean is the image's score, `mos`, `grid`, `cell_size`.

        Raises:
            ImageError: the image cannot be read or decoded.
            QualityMapError: (a ModelError) this model has no map (an ONNX engine, an
                export without the `quality_map` signature, or a non-affine head).
        """
        from kiqa import maps

        return maps.map_image(self, image)[0]

    def score_many(
        self, images: Iterable[ImageInput], batch_size: int = batch_lib.DEFAULT_BATCH_SIZE,
        max_bytes: int = DEFAULT_MAX_BYTES, progress: bool = False,
    ) -> pd.DataFrame:
        """Scores image files (or encoded bytes); a file that fails is a row, not an exception.

        Files go through the same reading, decoding and batching as `kiqa score`, so the
        scores equal its CSV's.

        Args:
            images: paths of image files, or encoded bytes, in any mix.
            batch_size: images per model call.
            max_bytes: files larger than this get an error row.
            progress: show a tqdm progress bar.

        Returns:
            DataFrame with one row per image, in input order: `path` (the path as given,
            `<bytes N>` for the N-th bytes item), `mos` (float; NaN when it failed), for a
            distribution model `mos_sd` and `p1`..`p5` (NaN when it failed), and `error`
            (None when scored, else why not).

        Raises:
            ModelError: the model failed on a batch.
        """
        files, blobs = [], {}
        for i, image in enumerate(images):
            if isinstance(image, (bytes, bytearray, memoryview)):
                key = f"<bytes {i}>"
                blobs[key] = bytes(image)
            else:
                key = os.fspath(image)
            # "" would reach the reader as "." (the current folder): say what it is instead.
            files.append((key, EMPTY_PATH if key in ("", b"") else None))
        rows = [
            row for batch in batch_lib.scored_batches(
                files, self, batch_size, max_bytes, progress=progress, read_bytes=_bytes_reader(blobs),
            ) for row in batch
        ]
        table = {
            PATH_COLUMN: [row[0] for row in rows],
            MOS_COLUMN: np.array([np.nan if row[1] is None else row[1] for row in rows], dtype=np.float64),
        }
        if self.distribution:
            extras = np.array([row[3] if row[1] is not None else [np.nan] * len(DISTRIBUTION_COLUMNS)
                               for row in rows], dtype=np.float64).reshape(-1, len(DISTRIBUTION_COLUMNS))
            table.update({name: extras[:, k] for k, name in enumerate(DISTRIBUTION_COLUMNS)})
        table[ERROR_COLUMN] = pd.Series([row[2] or None for row in rows], dtype=object)
        return pd.DataFrame(table)


# The error text of an empty path ("" given as an image), in `score` and `score_many` rows.
EMPTY_PATH = "empty path: give an image file's path or its encoded bytes"


def _bytes_reader(blobs):
    """`read_image_bytes` that serves the in-memory items of `score_many` by their key."""
    from kiqa.image import read_image_bytes

    def read(path, max_bytes=DEFAULT_MAX_BYTES):
        if path not in blobs:
            return read_image_bytes(path, max_bytes=max_bytes)
        contents = blobs[path]
        if len(contents) > max_bytes:
            raise ImageError(f"{len(contents)} bytes is over the {max_bytes}-byte cap for one image")
        return contents

    return read


# One traced forward pass per model and size: training's validation pass scores every
# epoch, and a new tf.function each time would trace the whole model again.
_FORWARD: "weakref.WeakKeyDictionary[Any, Dict[Tuple[int, int], Callable]]" = weakref.WeakKeyDictionary()


def is_distribution_model(model: Any) -> bool:
    """True for a Keras model with the distribution head's `dist` output."""
    return DIST_OUTPUT in (getattr(model, "output_names", None) or [])


def _as_outputs(outputs: Any) -> Dict[str, np.ndarray]:
    """A forward pass's result (a MOS tensor, or a dict of outputs) as float32 numpy arrays."""
    if not isinstance(outputs, dict):
        return {MOS_OUTPUT: np.asarray(outputs, dtype=np.float32).reshape(-1)}
    result: Dict[str, np.ndarray] = {MOS_OUTPUT: np.asarray(outputs[MOS_OUTPUT], dtype=np.float32).reshape(-1)}
    if DIST_OUTPUT in outputs:
        result[SD_OUTPUT] = np.asarray(outputs[SD_OUTPUT], dtype=np.float32).reshape(-1)
        result[DIST_OUTPUT] = np.asarray(outputs[DIST_OUTPUT], dtype=np.float32).reshape(-1, 5)
    return result


def keras_forward(model, image_size):
    """The one traced forward pass of a Keras model: float32 [batch, h, w, 3] -> MOS [batch]
    (a dict of `mos`, `mos_sd` and `dist` for a distribution model).

    A plain tf.function, not model.predict: measured ~9% faster on CPU, and one trace
    serves every batch size (the batch dimension is None).
    """
    height, width = (int(v) for v in image_size)
    by_size = _FORWARD.setdefault(model, {})
    if (height, width) not in by_size:

        @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32)])
        def predict(images):
            outputs = model(images, training=False)
            if isinstance(outputs, dict) and DIST_OUTPUT in outputs:
                return {key: tf.cast(value, tf.float32) for key, value in outputs.items()}
            if isinstance(outputs, dict):
                outputs = outputs[MOS_OUTPUT]
            return tf.reshape(tf.cast(outputs, tf.float32), [-1])

        by_size[(height, width)] = predict
    return by_size[(height, width)]


def load_scorer(
    model_ref: Union[str, os.PathLike], image_size: Optional[Sequence[int]] = None,
    safe_mode: bool = True, engine: str = DEFAULT_ENGINE, max_pixels: Optional[int] = None,
    parity_images: Optional[Sequence] = None, precision_tolerance: Optional[float] = None,
) -> Scorer:
    """Loads a model for local scoring.

    Args:
        model_ref: any model path `kiqa.run.resolve_model` accepts: a run folder
            (model.keras + config.json), a `.keras` file, a SavedModel base path (its
            highest integer version is used) or version folder, an ONNX export.
        image_size: (height, width) to decode images to. None takes the size the
            model was trained or exported at. A Keras model is fully convolutional
            and accepts another size; an export only takes its export size.
        safe_mode: refuse `.keras` files with Lambda layers (arbitrary code) and
            SavedModels using ops outside kiqa's allow list (`kiqa.serving.ops`).
        engine: "tf", "onnxruntime", "openvino" or "openvino-bf16" (see the module
            docstring).
        max_pixels: header pixel cap to decode images with. None takes the model's own
            (its run's config.json or its export's kiqa.json), but never above kiqa's
            DEFAULT_MAX_PIXELS: a model file cannot raise the cap, only this argument can.
        parity_images: for "openvino-bf16": your photos (paths or encoded bytes; the
            first `PARITY_SAMPLE` that decode are used) on which it must agree with
            float32, besides kiqa's generated images. Ignored by the other engines.
        precision_tolerance: for "openvino-bf16": its max |dMOS| bound (default
            `kiqa.serving.engines.BF16_TOLERANCE`).

    Returns:
        A `Scorer`.

    Raises:
        ModelNotFoundError: (a ModelError) the path does not exist.
        ImageSizeError: (a ModelError) an export was asked for another image size.
        ModelError: the path is none of the layouts above, or the model cannot be
            loaded; the message names the path.
        UntrustedModelError: (a ModelError) a SavedModel's graph uses ops outside the
            allow list (it is scanned before anything runs); they are named.
        ModelMetadataError: (an UntrustedModelError) an export's kiqa.json disagrees
            with the model's input shape or kiqa's limits; the file and field are named.
        ModelTooLargeError: (an UntrustedModelError) a `.keras` file would inflate past
            kiqa's bound (`kiqa.model.check_keras_archive`).
        PrecisionParityError: (a ModelError) the reduced-precision engine is further
            from float32 than its bound on the parity images.
    """
    path = Path(model_ref)
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ModelError(f"max_pixels must be a positive pixel count, got {max_pixels!r}")
    if image_size is not None:
        image_size = _check_size(image_size, path)
    if engine not in ENGINES:
        raise ModelError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    resolved = resolve_model(path)
    gate = {"parity_images": parity_images, "tolerance": precision_tolerance}
    scorer = _load(resolved, path, image_size, safe_mode, engine, gate)
    if max_pixels is not None:
        scorer = dataclasses.replace(scorer, max_pixels=max_pixels)
    return scorer


def _load(resolved, path, image_size, safe_mode, engine, gate):
    if engine != "tf":
        return _onnx_scorer(resolved, image_size, safe_mode, engine, gate)
    if resolved.kind == "onnx":
        raise ModelError(
            f"{path} is an ONNX export; score it with the onnxruntime or openvino engine, "
            f"or pass the run directory or SavedModel for TensorFlow",
            path=str(path),
        )
    if resolved.kind == "keras":
        return _keras_scorer(resolved, image_size, safe_mode)
    return _saved_model_scorer(resolved.model, image_size, safe_mode)


def _parity_images(gate, image_size, max_pixels):
    """`engines.ParityImages`: the first `PARITY_SAMPLE` of the caller's images that
    decode (one that does not is the scoring run's to report, not the gate's), then
    kiqa's generated ones."""
    from kiqa.image import decode_image, read_image_bytes
    from kiqa.serving import engines
    from kiqa.serving.warmup import generated_images

    names, pixels = [], []
    for i, item in enumerate(gate["parity_images"] or ()):
        if len(names) == PARITY_SAMPLE:
            break
        name = f"<bytes {i}>" if isinstance(item, (bytes, bytearray)) else os.fspath(item)
        try:
            contents = bytes(item) if isinstance(item, (bytes, bytearray)) else read_image_bytes(item)
            pixels.append(decode_image(contents, image_size, max_pixels).numpy())
        except (ImageError, tf.errors.OpError):
            continue
        names.append(name)
    caller = len(names)
    for name, contents in generated_images():
        names.append(name)
        pixels.append(decode_image(contents, image_size, max_pixels).numpy())
    tolerance = engines.BF16_TOLERANCE if gate["tolerance"] is None else float(gate["tolerance"])
    return engines.ParityImages(names, np.stack(pixels), caller, tolerance=tolerance)


def _onnx_scorer(resolved, image_size, safe_mode, engine, gate):
    """A scorer running an ONNX file in ONNX Runtime or OpenVINO (float32 or gated bf16)."""
    from kiqa.serving import engines

    reduced = engine in engines.REDUCED_PRECISION

    if resolved.kind == "savedmodel":
        raise ModelError(
            f"{resolved.given} is a SavedModel; the {engine} engine runs ONNX exports "
            f"(`kiqa export` in the onnx format) and converts run folders or .keras files",
            path=str(resolved.given),
        )
    if resolved.kind == "keras":
        keras_scorer = _keras_scorer(resolved, image_size, safe_mode)
        parity = _parity_images(gate, keras_scorer.image_size, keras_scorer.max_pixels) if reduced else None
        predict, owner, *figures = engines.converted_predictor(
            keras_scorer._owner, keras_scorer.image_size, engine, parity)
        return Scorer(
            image_size=keras_scorer.image_size, max_pixels=keras_scorer.max_pixels,
            source=keras_scorer.source, kind="keras", _predict=predict, _owner=owner, engine=engine,
            weights_sha256=keras_scorer.identity()["weights_sha256"],
            distribution=engines.predicts_distribution(owner),
            provenance=keras_scorer.provenance, precision_parity=figures[0] if figures else None,
        )
    onnx_file = resolved.model
    info_path = onnx_file.parent / METADATA_FILE
    try:
        info = json.loads(info_path.read_text())
        export_size = tuple(int(v) for v in info["image_size"])
        max_pixels = int(info.get("max_pixels", DEFAULT_MAX_PIXELS))
        fingerprint = info.get(WEIGHTS_KEY)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelError(
            f"ONNX export {onnx_file.parent} has no readable {METADATA_FILE} with its image_size "
            f"({err}); kiqa's ONNX export writes one",
            path=str(onnx_file),
        ) from err
    export_size, max_pixels = _within_limits(export_size, max_pixels, info_path)
    if image_size is not None and image_size != export_size:
        raise ImageSizeError(
            f"ONNX model {onnx_file} takes {export_size[0]}x{export_size[1]} images, not "
            f"{image_size[0]}x{image_size[1]}",
            path=str(onnx_file), requested=image_size, expected=export_size,
        )
    figures = None
    if reduced:
        predict, owner, figures = engines.gated_predictor(
            onnx_file, engine, _parity_images(gate, export_size, max_pixels))
    else:
        predict, owner = engines.onnx_predictor(onnx_file, engine)
    _agrees_with_model(export_size, engines.input_size(owner), info_path, f"ONNX model {onnx_file}")
    return Scorer(
        image_size=export_size, max_pixels=max_pixels, source=str(onnx_file), kind="onnx",
        _predict=predict, _owner=owner, engine=engine, weights_sha256=fingerprint,
        distribution=engines.predicts_distribution(owner), precision_parity=figures,
    )


def _check_size(image_size, path):
    try:
        size = tuple(int(v) for v in image_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise ImageSizeError(
            f"image size for {path} must be (height, width) in pixels, got {image_size!r}",
            path=str(path), requested=image_size,
        )
    return size


def _keras_scorer(resolved: ModelPath, image_size: Optional[Sequence[int]], safe_mode: bool) -> Scorer:
    from kiqa.model import load_model  # Keras model code only when a .keras file is used

    model_file = resolved.model
    config = resolved.config()
    max_pixels = min(int(config.max_pixels), DEFAULT_MAX_PIXELS) if config else DEFAULT_MAX_PIXELS
    if image_size is None:
        if config is not None:
            image_size = tuple(config.image_size)
            if not all(1 <= int(side) <= MAX_MODEL_IMAGE_SIDE for side in image_size):
                config_path = resolved.run.config_path if resolved.run is not None else model_file
                raise ModelMetadataError(
                    f"{config_path}: image_size {list(image_size)} is outside "
                    f"1..{MAX_MODEL_IMAGE_SIDE} pixels a side; pass the image size to score at",
                    path=str(config_path), field="image_size",
                )
        else:
            image_size = DEFAULT_IMAGE_SIZE
            warnings.warn(
                f"{model_file} has no config.json beside it; scoring at the default "
                f"{image_size[0]}x{image_size[1]} (height x width), which may not be the size "
                f"it was trained at",
                stacklevel=3,
            )
    model = load_model(model_file, safe_mode=safe_mode)
    return Scorer.from_keras_model(
        model, image_size, max_pixels, source=str(model_file),
        provenance=provenance_lib.find_for_model(model_file),
    )


def _read_export_info(version_dir):
    info_path = version_dir / EXPORT_INFO
    try:
        info = json.loads(info_path.read_text())
        size = tuple(int(v) for v in info["image_size"])
        max_pixels = int(info.get("max_pixels", DEFAULT_MAX_PIXELS))
        fingerprint = info.get(WEIGHTS_KEY)
    except OSError as err:
        raise ModelError(
            f"SavedModel {version_dir} has no readable {EXPORT_INFO} ({err.strerror}); "
            f"`kiqa export` records the image size there",
            path=str(version_dir),
        ) from err
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelError(
            f"{info_path} does not hold an image_size [height, width] ({err}); "
            f"re-export the model with `kiqa export`"
        ) from err
    if len(size) != 2:
        raise ModelError(f"{info_path}: image_size must be [height, width], got {list(size)}")
    size, max_pixels = _within_limits(size, max_pixels, info_path)
    return size, max_pixels, fingerprint


def _within_limits(size, max_pixels, info_path):
    """An export's (image_size, max_pixels) from its kiqa.json, held to kiqa's own limits.

    Raises:
        ModelMetadataError: a side outside 1..MAX_MODEL_IMAGE_SIDE, or max_pixels below 1.
    """
    if len(size) != 2 or not all(1 <= side <= MAX_MODEL_IMAGE_SIDE for side in size):
        raise ModelMetadataError(
            f"{info_path}: image_size {list(size)} is outside 1..{MAX_MODEL_IMAGE_SIDE} pixels a "
            f"side; the file does not describe a kiqa model: re-export it with `kiqa export`",
            path=str(info_path), field="image_size",
        )
    if max_pixels < 1:
        raise ModelMetadataError(
            f"{info_path}: max_pixels {max_pixels} is not a positive pixel count; re-export it "
            f"with `kiqa export`",
            path=str(info_path), field="max_pixels",
        )
    if max_pixels > DEFAULT_MAX_PIXELS:
        # The export's own graph keeps its cap; scoring here decodes with kiqa's, unless
        # the caller raises it (load_scorer's max_pixels).
        warnings.warn(
            f"{info_path}: max_pixels {max_pixels} is over kiqa's cap of {DEFAULT_MAX_PIXELS}; "
            f"decoding with {DEFAULT_MAX_PIXELS} (a model's metadata cannot raise the cap)",
            stacklevel=4,
        )
        max_pixels = DEFAULT_MAX_PIXELS
    return tuple(size), max_pixels


def _agrees_with_model(size, model_size, info_path, what):
    """Refuses metadata whose image_size is not the one the model's input fixes.

    Args:
        size: (height, width) from the metadata.
        model_size: (height, width) of the model's input; None or None sides when not fixed.
        info_path: the metadata file, named in the error.
        what: the model, as named in the error.

    Raises:
        ModelMetadataError: the model's input fixes another size.
    """
    if model_size is None or None in model_size or tuple(model_size) == tuple(size):
        return
    raise ModelMetadataError(
        f"{info_path}: image_size {list(size)} disagrees with {what}, whose input takes "
        f"{model_size[0]}x{model_size[1]} images; the metadata was altered or belongs to "
        f"another model: re-export it with `kiqa export`",
        path=str(info_path), field="image_size",
    )


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
    export_size, max_pixels, fingerprint = _read_export_info(version_dir)
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
    _agrees_with_model(export_size, fixed, version_dir / EXPORT_INFO, f"SavedModel {version_dir}")
    if image_size is None:
        image_size = export_size
    elif image_size != export_size and None not in fixed:
        raise ImageSizeError(
            f"SavedModel {version_dir} was exported for {export_size[0]}x{export_size[1]} "
            f"images and its signature takes only that size, not {image_size[0]}x{image_size[1]}",
            path=str(version_dir), requested=image_size, expected=export_size,
        )

    distribution = DIST_OUTPUT in signature.structured_outputs
    keys = (MOS_OUTPUT, SD_OUTPUT, DIST_OUTPUT) if distribution else (MOS_OUTPUT,)

    def predict(images):
        # kiqa exports refuse more than MAX_BATCH images per call (kiqa.serving.export): a
        # larger batch is split here rather than refused.
        parts = [
            signature(**{PIXELS_INPUT: images[start : start + SAVED_MODEL_MAX_BATCH]})
            for start in range(0, int(images.shape[0]), SAVED_MODEL_MAX_BATCH)
        ]
        return {key: tf.concat([part[key] for part in parts], axis=0) for key in keys}

    return Scorer(
        image_size=tuple(image_size), max_pixels=max_pixels, source=str(version_dir),
        kind="savedmodel", _predict=predict, _owner=loaded,
        provenance=provenance_lib.find_for_model(version_dir), weights_sha256=fingerprint,
        distribution=distribution,
    )
