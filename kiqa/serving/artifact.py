"""What the ONNX and LiteRT exports share: parity with the Keras model, and kiqa.json.

Both lay out their files like the SavedModel, `<base>/<integer version>/` (the layout
Triton Inference Server and TF Serving read: `export/kiqa-onnx/1/model.onnx`), and
publish through the SavedModel's own step (`kiqa.serving.export.staged_version`): the
version is written to a dot-directory beside the target, checked, and renamed into
place only when its parity with the Keras model holds. A failure or a kill leaves no
numeric folder.
"""

import contextlib
import json
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from scipy import stats

from kiqa.contract import (DIST_OUTPUT, KONIQ_MOS_SLOPE, METADATA_FILE, MOS_OUTPUT, PARITY_BATCH, PIXELS_INPUT,
                           RATING_LEVELS, SD_OUTPUT)
from kiqa.errors import ExportError
from kiqa.image import decode_image, describe_decode_error
from kiqa.serving import export

# What an ONNX or LiteRT user must do to the pixels, recorded in every kiqa.json
# (kiqa.serving.preprocess.preprocess_image does it in Pillow + numpy).
PREPROCESSING = {
    "reference_function": "kiqa.serving.preprocess.preprocess_image",
    "input": "float32 [batch, height, width, 3], RGB, 0..255 (not normalised: the model "
    "normalises internally)",
    "steps": [
        "first frame only (animated GIF/WebP)",
        "JPEG: decode at the largest DCT scale 1/r (r in 1, 2, 4, 8; Pillow Image.draft) "
        "whose size ceil(h/r) x ceil(w/r) still covers the target after the EXIF turn",
        "apply the EXIF orientation tag (JPEG, PNG, WebP)",
        "convert to 8-bit RGB (grey, palette, CMYK; alpha dropped, not composited; "
        "16-bit keeps the high byte)",
        "resize the whole image to height x width (no crop, no padding; other aspect "
        "ratios are stretched) with an antialiased bilinear (triangle) filter, as "
        "tf.image.resize(method='bilinear', antialias=True); skipped when the size "
        "already matches",
        "round half to even, clip to 0..255",
    ],
}


def all_layers(model):
    """Every layer of a model, nested models' layers included."""
    for layer in getattr(model, "layers", ()):
        yield layer
        yield from all_layers(layer)


def convertible_model(model):
    """The model as converters can take it: grouped depthwise `Conv2D`s made `DepthwiseConv2D`.

    keras.applications' stock ConvNeXt (`fast_depthwise=False`) runs its depthwise
    convolutions as grouped `Conv2D` inside a nested XLA-compiled function, which
    tf2onnx leaves as an unconvertible `StatefulPartitionedCall`. The copy from
    `kiqa.model.fast_depthwise_backbone` has the same weights and outputs (within 1e-5);
    the parity check compares the converted file with the original model anyway.

    Returns:
        (model to convert, True when it is a fast-depthwise copy).
    """
    from kiqa.model import _is_depthwise_conv2d, fast_depthwise_backbone

    if any(_is_depthwise_conv2d(layer) for layer in all_layers(model)):
        return fast_depthwise_backbone(model), True
    return model, False


@contextlib.contextmanager
def constant_normalization(model):
    """Makes `keras.layers.Normalization` statistics numpy arrays while tracing.

    ConvNeXt's prestem `Normalization` keeps its ImageNet mean and variance as eager
    tensors; a traced function captures those as extra placeholders, which tf2onnx
    leaves as graph inputs ("Required inputs ... prestem_normalization/Sub/y:0 are
    missing"). As numpy arrays they are traced as constants. Restored on exit.
    """
    changed = []
    for layer in all_layers(model):
        if isinstance(layer, keras.layers.Normalization):
            for attr in ("mean", "variance"):
                value = getattr(layer, attr, None)
                if isinstance(value, tf.Tensor):
                    changed.append((layer, attr, value))
                    setattr(layer, attr, value.numpy())
    try:
        yield
    finally:
        for layer, attr, value in changed:
            setattr(layer, attr, value)


def parity_pixels(parity_images, image_size, max_pixels):
    """Decoded pixels of the caller's images plus kiqa's generated ones.

    Returns:
        (names, float32 array [n, height, width, 3], number of the caller's images).

    Raises:
        ImageError: a parity image cannot be read.
        ExportError: a parity image cannot be decoded.
    """
    inputs, caller_images = export.parity_inputs(parity_images)
    pixels = []
    for name, contents in inputs:
        try:
            pixels.append(decode_image(contents, image_size, max_pixels).numpy())
        except tf.errors.OpError as err:
            raise ExportError(
                f"parity image {name} cannot be decoded ({describe_decode_error(err)}); "
                f"remove it from the parity images"
            ) from err
    return [name for name, _ in inputs], np.stack(pixels), caller_images


def keras_scores(model, pixels):
    """The Keras model's MOS for a pixel array, batch by batch (float64)."""
    out = []
    for start in range(0, len(pixels), PARITY_BATCH):
        batch = tf.constant(pixels[start : start + PARITY_BATCH])
        out.append(np.reshape(model(batch, training=False)[MOS_OUTPUT], [-1]))
    return np.concatenate(out).astype(np.float64)


def keras_outputs(model, pixels):
    """Every output of the Keras model for a pixel array, batch by batch (float64 arrays)."""
    out = {}
    for start in range(0, len(pixels), PARITY_BATCH):
        for key, value in model(tf.constant(pixels[start : start + PARITY_BATCH]), training=False).items():
            out.setdefault(key, []).append(np.asarray(value, np.float64))
    return {key: np.concatenate(parts) for key, parts in out.items()}


def compare_scores(reference, candidate, names, tolerance, what):
    """Parity figures of `candidate` against the Keras model's `reference` scores.

    Args:
        reference: the Keras model's MOS per image.
        candidate: the exported model's MOS per image.
        names: image names (for the error message).
        tolerance: largest |difference| allowed, in MOS points.
        what: the exported model, as named in the error ("the ONNX model").

    Returns:
        dict: images, max_abs_diff, mean_abs_diff, srcc (Spearman between the two; None
        when all reference scores are equal), tolerance.

    Raises:
        ExportError: not finite, or a difference over `tolerance` (naming the image).
    """
    reference = np.asarray(reference, np.float64)
    candidate = np.asarray(candidate, np.float64).reshape(-1)
    if candidate.shape != reference.shape:
        raise ExportError(f"{what} returned {candidate.shape[0]} scores for {reference.shape[0]} images")
    if not (np.all(np.isfinite(reference)) and np.all(np.isfinite(candidate))):
        raise ExportError(f"{what} or the Keras model returns NaN or infinite scores on the parity images")
    diff = np.abs(candidate - reference)
    worst = int(np.argmax(diff))
    if diff[worst] > tolerance:
        raise ExportError(
            f"parity check failed: on {names[worst]} the Keras model says {reference[worst]:.3f} "
            f"but {what} says {candidate[worst]:.3f}, {diff[worst]:.3g} MOS apart, over the "
            f"{tolerance} MOS tolerance; nothing was published"
        )
    srcc = None
    if np.ptp(reference) > 0 and np.ptp(candidate) > 0:
        srcc = float(stats.spearmanr(reference, candidate).statistic)
    return {
        "images": int(len(reference)),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "srcc": srcc,
        "tolerance": float(tolerance),
    }


def distribution_parity(reference, candidate, names, tolerance, key_prefix, what):
    """Parity figures of a distribution model's `mos_sd` and shares; {} for a regression model.

    `mos_sd` is held to `tolerance` (it is on the MOS's 0-100 scale); each share to
    `tolerance / KONIQ_MOS_SLOPE`: one rating level is KONIQ_MOS_SLOPE MOS points, so a
    share that moves by that much to the next level moves `mos` by at most `tolerance`.

    Args:
        reference: the Keras model's outputs (`keras_outputs`).
        candidate: the exported model's outputs, by the same names.
        names: one name per image (for the error message).
        tolerance: the MOS tolerance of this comparison.
        key_prefix: the figures' keys are "<key_prefix>_mos_sd" and "<key_prefix>_dist".
        what: the exported model, as named in the error ("the ONNX model"); the output's
            name follows it.

    Returns:
        {key: `compare_scores` figures}; the shares' figures count every image's five
        shares ("images" is 5 x the images).

    Raises:
        ExportError: an output is missing, not finite, or over its tolerance.
    """
    if DIST_OUTPUT not in reference:
        return {}
    figures = {}
    for key, limit in ((SD_OUTPUT, tolerance), (DIST_OUTPUT, tolerance / KONIQ_MOS_SLOPE)):
        if key not in candidate:
            raise ExportError(f"{what} has no {key!r} output, which the Keras model has")
        values = np.asarray(reference[key], np.float64).reshape(-1)
        per_image = values.size // len(names)
        figures[f"{key_prefix}_{key}"] = compare_scores(
            values, candidate[key], np.repeat(names, per_image), limit, f"{what} ({key!r})",
        )
    return figures


def output_metadata(model):
    """The kiqa.json description of every output beyond `mos` (a distribution model's
    `mos_sd` and `dist`); [] for a regression model."""
    if DIST_OUTPUT not in (getattr(model, "output_names", None) or []):
        return []
    return [
        {"name": SD_OUTPUT, "dtype": "float32", "shape": [-1],
         "meaning": "predicted spread (SD) of people's ratings, in points of KonIQ's 0-100 scale"},
        {"name": DIST_OUTPUT, "dtype": "float32", "shape": [-1, RATING_LEVELS],
         "meaning": "predicted share of raters choosing each rating level 1 (bad) .. 5 (excellent); "
                    "each row sums to 1"},
    ]


def base_metadata(resolved, model_name, version):
    """The kiqa.json fields of an ONNX or LiteRT export: the common ones, the tensors, the preprocessing."""
    height, width = (int(v) for v in resolved.image_size)
    metadata = export.common_metadata(resolved, model_name, version) | {
        "input": {"name": PIXELS_INPUT, "dtype": "float32", "shape": [-1, height, width, 3]},
        "output": {"name": MOS_OUTPUT, "dtype": "float32", "shape": [-1],
                   "meaning": "MOS on KonIQ's 0-100 scale, higher is better"},
        "preprocessing": PREPROCESSING,
    }
    extra_outputs = output_metadata(resolved.model)
    if extra_outputs:
        metadata["extra_outputs"] = extra_outputs
    provenance = _provenance()
    if provenance is not None:
        metadata["provenance"] = provenance
    return metadata


def _provenance():
    """kiqa.provenance's record of this build, when that module exists."""
    try:
        from kiqa import provenance  # noqa: PLC0415 (optional module)
    except ImportError:
        return None
    collect = getattr(provenance, "collect", None)
    return collect() if callable(collect) else None


def write_metadata(folder, metadata):
    (Path(folder) / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def read_metadata(folder):
    """The kiqa.json of an exported ONNX / LiteRT version.

    Raises:
        ExportError: missing or unreadable.
    """
    path = Path(folder) / METADATA_FILE
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise ExportError(f"{path} cannot be read ({err.strerror}); export with `kiqa export`") from err
    except ValueError as err:
        raise ExportError(f"{path} is not JSON ({err})") from err
