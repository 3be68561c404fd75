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
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd
import tensorflow as tf

from kiqa import provenance as provenance_lib
from kiqa import score as score_lib
from kiqa.contract import (
    ASSETS_EXTRA,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    MAX_BATCH as SAVED_MODEL_MAX_BATCH,
    METADATA_FILE,
    MOS_OUTPUT,
    PIXELS_INPUT,
    PIXELS_SIGNATURE,
)
from kiqa.errors import BatchMemoryError, ExportError, ImageError, ImageSizeError, ModelError, UntrustedModelError
from kiqa.run import ModelPath, resolve_model

EXPORT_INFO = Path(ASSETS_EXTRA) / METADATA_FILE
ONNX_INFO = "kiqa.json"
# "tf" is the default: it needs no extra package and no conversion. Measured side by side
# at 384x512 ConvNeXt-Tiny on the shared 2-core build machine (benchmarks/README.md,
# "Engines"), OpenVINO f32 ran ~1.3x TF and ONNX Runtime ~0.75x, with parity ~4e-6 MOS.
ENGINES = ("tf", "onnxruntime", "openvino", "openvino-bf16")
# Photos of the caller's a reduced-precision engine is checked on (besides generated ones):
# enough to see a ranking, few enough to add seconds, not minutes, to loading.
PARITY_SAMPLE = 16
DEFAULT_ENGINE = "tf"
ImageInput = Union[str, os.PathLike, bytes]


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
    precision_parity: Optional[dict] = None

    def model_facts(self) -> dict:
        """What outputs record about how the scores were computed, beside the provenance:
        {} for float32; the engine and its parity figures for a reduced-precision one."""
        if self.precision_parity is None:
            return {}
        return {"engine": self.engine, "precision_parity": dict(self.precision_parity)}

    @classmethod
    def from_keras_model(
        cls, model, image_size: Tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS,
        source: str = "in-memory keras.Model", provenance: Optional[provenance_lib.Provenance] = None,
    ) -> "Scorer":
        """A scorer over a Keras model in memory (training's validation pass uses this).

        Args:
            model: a kiqa Keras model (input `image`, output `mos`).
            image_size: (height, width) it scores images at.
            max_pixels: header pixel cap to decode with.
            source: what to call the model in messages.
            provenance: its `kiqa.provenance.Provenance`, if known.
        """
        return cls(
            image_size=tuple(int(v) for v in image_size), max_pixels=int(max_pixels), source=source,
            kind="keras", _predict=keras_forward(model, image_size), _owner=model, provenance=provenance,
        )

    def predict_pixels(self, batch) -> np.ndarray:
        """Scores a batch of decoded images.

        Args:
            batch: float32 array or tensor [batch, height, width, 3] of 0..255 pixels at
                `image_size`, as `kiqa.image.decode_image` returns them.

        Returns:
            float32 numpy array [batch] of MOS on KonIQ's 0-100 scale (higher is better).

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
            return np.zeros([0], np.float32)
        try:
            inputs = tf.constant(batch) if self.engine == "tf" and not isinstance(batch, tf.Tensor) else batch
            mos = self._predict(inputs)
        except tf.errors.ResourceExhaustedError as err:
            raise BatchMemoryError(
                f"{self.source}: out of memory scoring a batch of {batch.shape[0]} images at "
                f"{expected[0]}x{expected[1]}",
                path=self.source, batch_size=int(batch.shape[0]),
            ) from err
        return np.asarray(mos, dtype=np.float32).reshape(-1)

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
        row = self.score_many([image], batch_size=1).iloc[0]
        if row["error"] is not None:
            label = "image bytes" if isinstance(image, (bytes, bytearray, memoryview)) else os.fspath(image)
            raise ImageError(f"{label}: {row['error']}", path=None if label == "image bytes" else label)
        return float(row["mos"])

    def score_many(
        self, images: Iterable[ImageInput], batch_size: int = score_lib.DEFAULT_BATCH_SIZE,
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
            `<bytes N>` for the N-th bytes item), `mos` (float; NaN when it failed) and
            `error` (None when scored, else why not).

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
            files.append((key, None))
        rows = [
            row for batch in score_lib.scored_batches(
                files, self, batch_size, max_bytes, progress=progress, read_bytes=_bytes_reader(blobs),
            ) for row in batch
        ]
        return pd.DataFrame({
            "path": [path for path, _, _ in rows],
            "mos": np.array([np.nan if mos is None else mos for _, mos, _ in rows], dtype=np.float64),
            "error": pd.Series([error or None for _, _, error in rows], dtype=object),
        })


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
_FORWARD = weakref.WeakKeyDictionary()


def keras_forward(model, image_size):
    """The one traced forward pass of a Keras model: float32 [batch, h, w, 3] -> MOS [batch].

    A plain tf.function, not model.predict: measured ~9% faster on CPU, and one trace
    serves every batch size (the batch dimension is None).
    """
    height, width = (int(v) for v in image_size)
    by_size = _FORWARD.setdefault(model, {})
    if (height, width) not in by_size:

        @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32)])
        def predict(images):
            outputs = model(images, training=False)
            if isinstance(outputs, dict):
                outputs = outputs[MOS_OUTPUT]
            return tf.reshape(tf.cast(outputs, tf.float32), [-1])

        by_size[(height, width)] = predict
    return by_size[(height, width)]


def load_scorer(
    model_ref: Union[str, os.PathLike], image_size: Optional[Sequence[int]] = None,
    safe_mode: bool = True, engine: str = DEFAULT_ENGINE, parity_images: Optional[Sequence] = None,
    precision_tolerance: Optional[float] = None,
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
        PrecisionParityError: (a ModelError) the reduced-precision engine is further
            from float32 than its bound on the parity images.
    """
    path = Path(model_ref)
    if image_size is not None:
        image_size = _check_size(image_size, path)
    if engine not in ENGINES:
        raise ModelError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    resolved = resolve_model(path)
    if engine != "tf":
        gate = {"parity_images": parity_images, "tolerance": precision_tolerance}
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
            provenance=keras_scorer.provenance, precision_parity=figures[0] if figures else None,
        )
    onnx_file = resolved.model
    info_path = onnx_file.parent / ONNX_INFO
    try:
        info = json.loads(info_path.read_text())
        export_size = tuple(int(v) for v in info["image_size"])
        max_pixels = int(info.get("max_pixels", DEFAULT_MAX_PIXELS))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(
            f"ONNX export {onnx_file.parent} has no readable {ONNX_INFO} with its image_size "
            f"({err}); kiqa's ONNX export writes one",
            path=str(onnx_file),
        ) from err
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
    return Scorer(
        image_size=export_size, max_pixels=max_pixels, source=str(onnx_file), kind="onnx",
        _predict=predict, _owner=owner, engine=engine, precision_parity=figures,
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


def _keras_scorer(resolved: ModelPath, image_size, safe_mode):
    from kiqa.model import load_model  # Keras model code only when a .keras file is used

    model_file = resolved.model
    config = resolved.config()
    max_pixels = config.max_pixels if config else DEFAULT_MAX_PIXELS
    if image_size is None:
        if config is not None:
            image_size = tuple(config.image_size)
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
    except OSError as err:
        raise ModelError(
            f"SavedModel {version_dir} has no readable {EXPORT_INFO} ({err.strerror}); "
            f"`kiqa export` records the image size there",
            path=str(version_dir),
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
        raise ImageSizeError(
            f"SavedModel {version_dir} was exported for {export_size[0]}x{export_size[1]} "
            f"images and its signature takes only that size, not {image_size[0]}x{image_size[1]}",
            path=str(version_dir), requested=image_size, expected=export_size,
        )

    def predict(images):
        # kiqa exports refuse more than MAX_BATCH images per call (kiqa.serving.export): a
        # larger batch is split here rather than refused.
        return tf.concat([
            signature(**{PIXELS_INPUT: images[start : start + SAVED_MODEL_MAX_BATCH]})[MOS_OUTPUT]
            for start in range(0, int(images.shape[0]), SAVED_MODEL_MAX_BATCH)
        ], axis=0)

    return Scorer(
        image_size=tuple(image_size), max_pixels=max_pixels, source=str(version_dir),
        kind="savedmodel", _predict=predict, _owner=loaded,
        provenance=provenance_lib.find_for_model(version_dir),
    )
