"""Quality maps: where in a photo the model's score comes from, on the 0-100 MOS scale.

Method. A kiqa model is backbone -> global average pooling -> head. Every head layer
after the pooling is affine in the pooled feature vector (Dense without activation,
Rescaling, Reshape, Dropout at inference), except ConvNeXt's LayerNormalization after
the pooling. So the head can be run on every position of the backbone's last feature
map instead of on its average: the result is a grid of local MOS values whose mean is
exactly the image's score, because the mean of an affine function is the function of
the mean. ConvNeXt's LayerNormalization is made affine the same way the real forward
pass sees it: each position is normalised with the mean and standard deviation of the
*pooled* vector (the statistics the score used), not with its own; a per-position
LayerNorm would break the identity. No weights change and nothing is retrained: the
map is built from the trained model's own layers, so it works for any saved run.

When the identity does not hold: a head with a non-linear layer after the pooling (a
Dense with an activation, max pooling, anything not listed above) has no such
decomposition; `map_head` then raises `QualityMapError` naming the layer, rather than
drawing a map whose mean is not the score.

Cost: one backbone pass (the score's own) plus the head on h' x w' positions (a
[h'*w', C] x [C, 1] product): a map costs about one forward pass, and the image is
decoded and resized to the model's size first, exactly as for scoring, so a 64 MP photo
costs what its score costs.
"""

import dataclasses
import weakref
from typing import Dict, List, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from kiqa.contract import (
    BYTES_INPUT,
    DEFAULT_MAX_BYTES,
    MOS_OUTPUT,
    QUALITY_MAP_OUTPUT,
    QUALITY_MAP_SIGNATURE,
)
from kiqa.errors import ImageError, QualityMapError

METHOD = "head-per-position"
# Safety bound on the graph walk from the output back to the pooling (a kiqa head is
# 3-6 layers; a walk this long means a graph of another shape).
_MAX_HEAD_LAYERS = 64
# Regions listed as worst and best in summaries.
SUMMARY_REGIONS = 3


@dataclasses.dataclass(frozen=True)
class QualityMap:
    """Local quality of one image on KonIQ's 0-100 MOS scale.

    Attributes:
        values: float32 [rows, cols]: local MOS per cell (higher is better); cell (0, 0)
            is the top-left of the image as decoded (EXIF turn applied).
        mos: the image's score. For a model with an affine head the mean of `values`
            equals it (float tolerance).
        image_size: (height, width) in pixels the image was resized to for the model;
            the map's cells tile that image.
    """

    values: np.ndarray
    mos: float
    image_size: Tuple[int, int]

    @property
    def grid(self) -> Tuple[int, int]:
        """(rows, cols) of the map."""
        return tuple(int(v) for v in self.values.shape)

    @property
    def cell_size(self) -> Tuple[float, float]:
        """(height, width) of one cell in pixels of the model's input image."""
        rows, cols = self.grid
        return self.image_size[0] / rows, self.image_size[1] / cols

    def regions(self, count: int = SUMMARY_REGIONS, best: bool = False) -> List[Dict]:
        """The worst (or best) cells, each with its box as fractions of the image.

        Args:
            count: how many cells.
            best: the highest cells instead of the lowest.

        Returns:
            Dicts with `row`, `col`, `mos` and `box` = [top, left, bottom, right] as
            fractions 0..1 of the image's height and width (they apply to the original
            photo at any resolution).
        """
        return cell_regions(self.values, count, best)

    def summary(self) -> Dict:
        """JSON-ready facts: score, grid, cell size, mean, worst and best regions."""
        return {
            "mos": round(float(self.mos), 4),
            "map_mean": round(float(np.mean(self.values)), 4),
            "map_min": round(float(np.min(self.values)), 4),
            "map_max": round(float(np.max(self.values)), 4),
            "grid": list(self.grid),
            "image_size": list(self.image_size),
            "cell_size_pixels": [round(v, 3) for v in self.cell_size],
            "method": METHOD,
            "worst_regions": self.regions(),
            "best_regions": self.regions(best=True),
        }


def cell_regions(values: np.ndarray, count: int = SUMMARY_REGIONS, best: bool = False) -> List[Dict]:
    """The `count` lowest (or highest) cells of a map, with fractional boxes (see `QualityMap.regions`)."""
    rows, cols = values.shape
    order = np.argsort(values, axis=None, kind="stable")
    if best:
        order = order[::-1]
    out = []
    for flat in order[: max(0, int(count))]:
        row, col = divmod(int(flat), cols)
        out.append({
            "row": row, "col": col, "mos": round(float(values[row, col]), 4),
            "box": [round(row / rows, 4), round(col / cols, 4), round((row + 1) / rows, 4), round((col + 1) / cols, 4)],
        })
    return out


class MapHead:
    """The trained model split at its global pooling: feature map, then the head per position.

    Calling it on a pixel batch returns `{"mos": [b], "quality_map": [b, rows, cols]}`
    from one backbone pass; `mos` is the model's own score (pooled path), the map the
    same head run on every position. Works eagerly and inside `tf.function` (the
    SavedModel's `quality_map` signature traces it).
    """

    def __init__(self, features: keras.Model, head: List[keras.layers.Layer]):
        self.features = features
        self.head = head

    def __call__(self, images) -> Dict[str, tf.Tensor]:
        feature_map = tf.cast(self.features(images, training=False), tf.float32)
        pooled = tf.reduce_mean(feature_map, axis=[1, 2])
        local = feature_map
        for layer in self.head:
            if isinstance(layer, keras.layers.LayerNormalization):
                local = _pooled_layer_norm(layer, local, pooled)
            elif isinstance(layer, keras.layers.Reshape):
                pooled = layer(pooled)
                continue  # the map keeps its grid; its trailing axis of 1 is dropped below
            elif not isinstance(layer, keras.layers.Dropout):
                local = layer(local)
            if not isinstance(layer, keras.layers.Dropout):
                pooled = layer(pooled)
        mos = tf.reshape(tf.cast(pooled, tf.float32), [-1])
        return {MOS_OUTPUT: mos, QUALITY_MAP_OUTPUT: tf.cast(local[..., 0], tf.float32)}


def _pooled_layer_norm(layer, local, pooled):
    """LayerNormalization of every position with the pooled vector's statistics.

    LN(mean_p f_p) = mean_p [gamma * (f_p - mu) / sigma + beta] when mu and sigma are
    the pooled vector's mean and standard deviation: affine in f_p, so the identity
    (map mean == score) survives ConvNeXt's LayerNorm after the pooling.
    """
    mean, variance = tf.nn.moments(pooled, axes=[-1], keepdims=True)
    scale = tf.math.rsqrt(variance + layer.epsilon)
    out = (local - mean[:, None, None, :]) * scale[:, None, None, :]
    if layer.scale:
        out = out * tf.cast(layer.gamma, tf.float32)
    if layer.center:
        out = out + tf.cast(layer.beta, tf.float32)
    return out


def _producer(tensor):
    return tensor._keras_history.operation


def _input_of(tensor):
    """The (single) input tensor of the layer call that produced `tensor`."""
    history = tensor._keras_history
    node = history.operation._inbound_nodes[history.node_index]
    inputs = node.input_tensors
    if len(inputs) != 1:
        raise QualityMapError(
            f"layer {history.operation.name!r} takes {len(inputs)} inputs; a quality map needs a "
            f"chain of single-input layers after the pooling", layer=history.operation.name,
        )
    return inputs[0]


def _single_output(model):
    outputs = model.outputs
    if len(outputs) != 1:
        raise QualityMapError(
            f"model {model.name!r} has {len(outputs)} outputs; a quality map needs the one "
            f"MOS output of a kiqa model", layer=model.name,
        )
    return outputs[0]


def _affine(layer) -> bool:
    if isinstance(layer, keras.layers.Dense):
        return getattr(layer.activation, "__name__", "") == "linear"
    if isinstance(layer, keras.layers.LayerNormalization):
        axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        # RMS scaling divides by a statistic of each position's own values: not affine.
        return list(axis) in ([-1], [1]) and not getattr(layer, "rms_scaling", False)
    return isinstance(layer, (keras.layers.Rescaling, keras.layers.Reshape, keras.layers.Dropout))


def map_head(model: keras.Model) -> MapHead:
    """Splits a kiqa Keras model at its global average pooling (no copy of the weights).

    Args:
        model: a kiqa model (`kiqa.model.build_model` layout, as loaded from any run or
            checkpoint): image -> backbone -> GlobalAveragePooling2D (in the model or at
            the end of the backbone) -> affine head -> `mos`.

    Returns:
        A `MapHead` over the model's own layers.

    Raises:
        QualityMapError: (a ModelError) the model has no global average pooling, or a
            layer between it and the output is not affine (named in `layer`), so no map
            would have the score as its mean.
    """
    tensor = _single_output(model)
    graph_input = model.inputs[0]
    head: List[keras.layers.Layer] = []
    for _ in range(_MAX_HEAD_LAYERS):
        layer = _producer(tensor)
        if isinstance(layer, keras.layers.GlobalAveragePooling2D):
            features = keras.Model(graph_input, _input_of(tensor), name=f"{model.name}_feature_map")
            return MapHead(features, head[::-1])
        if isinstance(layer, keras.Model):
            # A nested backbone called on the model's input: continue inside it.
            if _input_of(tensor) is not graph_input:
                raise QualityMapError(
                    f"model {model.name!r}: nested model {layer.name!r} does not take the model's "
                    f"input directly; a quality map needs image -> backbone -> pooling -> head",
                    layer=layer.name,
                )
            tensor, graph_input = _single_output(layer), layer.inputs[0]
            continue
        if isinstance(layer, keras.layers.InputLayer):
            break
        if not _affine(layer):
            raise QualityMapError(
                f"model {model.name!r}: layer {layer.name!r} ({type(layer).__name__}) after the "
                f"global pooling is not affine, so the head cannot be run per position with the "
                f"score as the map's mean", layer=layer.name,
            )
        head.append(layer)
        tensor = _input_of(tensor)
    raise QualityMapError(
        f"model {model.name!r} has no GlobalAveragePooling2D between its input and its MOS "
        f"output; quality maps need a kiqa model (backbone, global average pooling, Dense head)",
        layer=None,
    )


# One MapHead and one traced function per model and size, like kiqa.scoring.scorer's forward pass.
_MAP_FUNCTIONS = weakref.WeakKeyDictionary()


def map_function(model: keras.Model, image_size: Tuple[int, int]):
    """The traced map pass of a Keras model: float32 [b, h, w, 3] -> {"mos", "quality_map"}.

    Raises:
        QualityMapError: see `map_head`.
    """
    height, width = (int(v) for v in image_size)
    by_size = _MAP_FUNCTIONS.setdefault(model, {})
    if (height, width) not in by_size:
        head = map_head(model)

        @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32)])
        def quality_map(images):
            return head(images)

        by_size[(height, width)] = quality_map
    return by_size[(height, width)]


def difference_map(a: QualityMap, b: QualityMap) -> np.ndarray:
    """A - B per cell (positive where A is better), in MOS points.

    Raises:
        QualityMapError: the two maps have different grids (made at different image sizes).
    """
    if a.grid != b.grid:
        raise QualityMapError(
            f"maps of different grids cannot be subtracted: {a.grid} and {b.grid} (images "
            f"resized to {a.image_size} and {b.image_size})", layer=None,
        )
    return (a.values - b.values).astype(np.float32)


def half_means(values: np.ndarray, axis: int = 1) -> Tuple[float, float]:
    """Mean map value of the first and the second half of the grid along `axis` (1: left/right).

    With an odd number of cells the middle row/column is left out of both halves.
    """
    size = values.shape[axis]
    half = size // 2
    first = np.take(values, range(0, half), axis=axis)
    second = np.take(values, range(size - half, size), axis=axis)
    return float(first.mean()), float(second.mean())


def maybe_map_head(model: keras.Model) -> Optional[MapHead]:
    """`map_head(model)`, or None when the model's head has no per-position form."""
    try:
        return map_head(model)
    except QualityMapError:
        return None


def _read(image, max_bytes):
    """(label for messages, encoded bytes) of a path or bytes."""
    from kiqa.image import read_image_bytes

    if isinstance(image, (bytes, bytearray, memoryview)):
        contents = bytes(image)
        if len(contents) > max_bytes:
            raise ImageError(f"image bytes: {len(contents)} bytes is over the {max_bytes}-byte cap for one image")
        return "image bytes", contents
    return str(image), read_image_bytes(image, max_bytes=max_bytes)


def _decode(label, contents, scorer):
    from kiqa.image import decode_image, describe_decode_error

    try:
        return decode_image(contents, scorer.image_size, scorer.max_pixels,
                            name=None if label == "image bytes" else label)
    except tf.errors.OpError as err:
        path = None if label == "image bytes" else label
        raise ImageError(f"{label}: {describe_decode_error(err, path)}", path=path) from err


def map_image(scorer, image, max_bytes: int = DEFAULT_MAX_BYTES) -> Tuple[QualityMap, np.ndarray]:
    """The quality map of one image with a loaded `kiqa.scoring.scorer.Scorer`, and the pixels it saw.

    A Keras model runs `map_function`; a SavedModel its `quality_map` signature on the
    file's bytes (decoded in its graph by the same function). Either way the image is
    decoded and resized to the scorer's `image_size` first, as for scoring.

    Args:
        scorer: a `Scorer` of kind "keras" or "savedmodel" on the tf engine.
        image: an image file's path or its encoded bytes.
        max_bytes: files larger than this are refused.

    Returns:
        (QualityMap, float32 pixels [height, width, 3] 0..255 as the model saw them).

    Raises:
        ImageError: the image cannot be read or decoded (the message names it).
        QualityMapError: (a ModelError) the model has no map: an ONNX engine, an export
            without the `quality_map` signature, or a head that is not affine.
    """
    label, contents = _read(image, max_bytes)
    pixels = _decode(label, contents, scorer)
    if scorer.engine != "tf" or scorer.kind not in ("keras", "savedmodel"):
        raise QualityMapError(
            f"{scorer.source}: quality maps run on TensorFlow (a run folder, .keras file or "
            f"SavedModel), not on the {scorer.engine} engine", path=scorer.source,
        )
    if scorer.kind == "keras":
        out = map_function(scorer._owner, scorer.image_size)(pixels[None])
    else:
        signature = scorer._owner.signatures.get(QUALITY_MAP_SIGNATURE)
        if signature is None:
            raise QualityMapError(
                f"SavedModel {scorer.source} has no {QUALITY_MAP_SIGNATURE!r} signature (exported "
                f"before kiqa had maps, or its head is not affine); export it again, or map with "
                f"the run folder", path=scorer.source,
            )
        try:
            out = signature(**{BYTES_INPUT: tf.constant([contents])})
        except tf.errors.InvalidArgumentError as err:
            raise ImageError(f"{label}: {' '.join(str(err.message).split())[:300]}",
                             path=None if label == "image bytes" else label) from err
    values = np.asarray(out[QUALITY_MAP_OUTPUT][0], np.float32)
    quality = QualityMap(values=values, mos=float(out[MOS_OUTPUT][0]), image_size=tuple(scorer.image_size))
    return quality, np.asarray(pixels, np.float32)
