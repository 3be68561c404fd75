"""ONNX export: the model on float pixels, parity-checked, published atomically.

`export_onnx` writes `<base>/<version>/model.onnx` and `kiqa.json` (Triton Inference
Server's model-repository layout), with the SavedModel's pixel contract:

- input `image`: float32 [-1, H, W, 3], RGB 0..255, decoded and resized the way
  `kiqa.image.decode_image` does (`kiqa.serving.preprocess.preprocess_image` is that rule
  in Pillow + numpy, for users without TensorFlow);
- output `mos`: float32 [-1], KonIQ's 0-100 scale, higher is better.

The batch dimension is dynamic. Decoding is not in the ONNX graph: ONNX has no JPEG
decoder an ONNX Runtime user could rely on, so bytes in, scores out stays the
SavedModel's job (`serving_default`).

Converter: Keras 3.15's own `model.export(format="onnx")`. On the TensorFlow backend it
traces the model's call and hands the concrete function to tf2onnx (patching tf2onnx for
numpy 2), so "Keras or tf2onnx" is one path: Keras picks the input signature and names,
tf2onnx converts. It handles ConvNeXt with kiqa's fast depthwise path (DepthwiseConv2D
becomes a grouped ONNX `Conv`; LayerNormalization, GELU and layer scale convert) and
keeps the batch dimension dynamic, with one gap filled here: TF 2.21 computes the exact
GELU as `0.5 * x * erfc(-x / sqrt(2))`, and tf2onnx 1.17 has no handler for `Erfc`
("Unsupported ops: Counter({'Erfc': 18})" on ConvNeXt-Tiny). `_register_erfc` adds one
to tf2onnx's op registry: ONNX `Erf` followed by `1 - erf` (ONNX has no Erfc op). The
difference from TF's erfc is float32 rounding near erfc ~ 0, i.e. GELU's far negative
tail, where the output is ~0 either way. Two more fixes happen before tracing
(`kiqa.serving.artifact`): ConvNeXt's prestem Normalization statistics are traced as
constants (else they stay as extra graph inputs), and a model with the stock grouped
Conv2D (`fast_depthwise=False`; an XLA-compiled nested function tf2onnx leaves as an
unconvertible `StatefulPartitionedCall`) is converted through its fast-depthwise copy.
tf2onnx 1.17 declares `protobuf>=3.20` (no upper pin) and installs beside TF 2.21's
protobuf 7 and numpy 2.4 (`pip check` clean).

Before the rename, ONNX Runtime runs the written file on the caller's real photos and
on generated images, and its scores must agree with the Keras model's within
`PARITY_TOLERANCE` MOS points (max |ΔMOS| is recorded in kiqa.json); otherwise nothing
is published.
"""

import contextlib
import functools
import io
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import tensorflow as tf

from kiqa.contract import DIST_OUTPUT, MOS_OUTPUT, PARITY_BATCH, PIXELS_INPUT, SD_OUTPUT
from kiqa.errors import ExportError
from kiqa.serving import artifact, export
from kiqa.serving.export import ExportOptions

DEFAULT_BASE_PATH = "export/kiqa-onnx"
MODEL_FILE = "model.onnx"
# Same bound as the SavedModel's: ONNX Runtime and TF pick different kernels (sum
# order, fused GELU), measured at ~1e-4 MOS on ConvNeXt-Tiny; 0.05 MOS is far below any
# quality difference yet catches a wrong layout or a dropped layer, which move points.
PARITY_TOLERANCE = export.PARITY_TOLERANCE
# ONNX opset 17 (2022) has every op ConvNeXt needs and runs on ONNX Runtime >= 1.12,
# OpenVINO >= 2022.3 and TensorRT 8.6.
OPSET = 17


def export_onnx(model_or_path, options: Optional[ExportOptions] = None, *, tolerance=PARITY_TOLERANCE,
                **overrides) -> Path:
    """Exports a model as `<base_path>/<version>/model.onnx`, atomically.

    Args:
        model_or_path: a run directory, a `.keras` file or an in-memory `keras.Model`
            (as for `kiqa.serving.export.export_model`).
        options: `kiqa.serving.export.ExportOptions` (default base path
            "export/kiqa-onnx"); its parity images are those the ONNX and Keras models
            must agree on.
        tolerance: largest |ONNX - Keras| allowed, in MOS points.
        **overrides: `ExportOptions` fields by name.

    Returns:
        The `Path` of the published version folder.

    Raises:
        ExportError: the version exists, the conversion failed, or parity failed;
            nothing numeric was left in the base path.
        ModelError, ConfigError, ImageError: as `kiqa.serving.export.export_model`.
    """
    onnxruntime = _require_onnx()
    options = ExportOptions.of(options, **overrides)
    base = Path(options.base_path or DEFAULT_BASE_PATH)
    resolved = export.load_for_export(model_or_path, options, base)
    names, pixels, caller_images = artifact.parity_pixels(options.parity_images, resolved.image_size,
                                                          resolved.max_pixels)
    with export.staged_version(base, options.version, options.overwrite) as (version, temp, target):
        convert(resolved.model, temp / MODEL_FILE, resolved.image_size)
        session = load_session(temp / MODEL_FILE, onnxruntime)
        _check_io(session, resolved.image_size, temp / MODEL_FILE)
        parity = artifact.compare_scores(
            artifact.keras_scores(resolved.model, pixels), run_session(session, pixels), names,
            tolerance, "the ONNX model (ONNX Runtime)",
        )
        parity["caller_images"] = caller_images
        metadata = artifact.base_metadata(resolved, base.resolve().name, version) | dict(
            format="onnx",
            file=MODEL_FILE,
            file_bytes=(temp / MODEL_FILE).stat().st_size,
            opset=OPSET,
            converter=_converter_versions(onnxruntime),
            parity={"onnxruntime_vs_keras": parity,
                    **_distribution_parity(resolved.model, session, pixels, names, tolerance)},
        )
        artifact.write_metadata(temp, metadata)
    return target


def convert(model, path, image_size):
    """Converts a kiqa Keras model to an ONNX file (Keras' exporter, i.e. tf2onnx).

    Raises:
        ExportError: the converter failed (the message says on what).
    """
    _register_erfc()
    height, width = int(image_size[0]), int(image_size[1])
    signature = [tf.TensorSpec([None, height, width, 3], tf.float32, name=PIXELS_INPUT)]
    # tf2onnx logs every rewrite at INFO and prints progress; keep the CLI readable.
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    model, _ = artifact.convertible_model(model)
    try:
        with contextlib.redirect_stdout(io.StringIO()), artifact.constant_normalization(model):
            model.export(str(path), format="onnx", input_signature=signature,
                         opset_version=OPSET, verbose=False)
    except Exception as err:  # tf2onnx raises bare ValueError/KeyError/RuntimeError
        reason = " ".join(str(err).split())[:400]
        raise ExportError(
            f"the ONNX converter (Keras model.export -> tf2onnx) failed: {type(err).__name__}: "
            f"{reason}"
        ) from err


@functools.lru_cache(maxsize=None)
def _register_erfc():
    """Teaches tf2onnx TF's `Erfc` op (used by the exact GELU): Erf, then 1 - erf."""
    from tf2onnx import utils
    from tf2onnx.handler import tf_op

    @tf_op("Erfc")
    class Erfc:  # noqa: F841 (registered by the decorator)
        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            node.type = "Erf"
            dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
            one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.ones([], dtype=dtype))
            ctx.insert_new_node_on_output(
                "Sub", node.output[0], inputs=[one.output[0], node.output[0]],
                name=utils.make_name(f"{node.name}_one_minus"),
            )


def load_session(path, onnxruntime=None, threads=None):
    """An ONNX Runtime CPU session for an exported file.

    Args:
        path: the `.onnx` file.
        onnxruntime: the imported module (None imports it).
        threads: intra-op threads; None lets ONNX Runtime use every core.

    Raises:
        ExportError: ONNX Runtime cannot load the file.
    """
    onnxruntime = onnxruntime or _require_onnx()
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's own exception types are not importable by name
        raise ExportError(f"ONNX Runtime cannot load {path}: {' '.join(str(err).split())[:300]}") from err


def run_session(session, pixels, batch_size=PARITY_BATCH):
    """MOS of a pixel array through an ONNX Runtime session, batch by batch."""
    out = []
    for start in range(0, len(pixels), batch_size):
        batch = np.ascontiguousarray(pixels[start : start + batch_size], dtype=np.float32)
        out.append(np.reshape(session.run([MOS_OUTPUT], {PIXELS_INPUT: batch})[0], [-1]))
    return np.concatenate(out)


def run_session_outputs(session, pixels, batch_size=PARITY_BATCH):
    """Every output of the ONNX model for a pixel array: `mos` [n] and, for a distribution
    model, `mos_sd` [n] and `dist` [n, 5]."""
    names = [o.name for o in session.get_outputs()]
    out = {name: [] for name in names}
    for start in range(0, len(pixels), batch_size):
        batch = np.ascontiguousarray(pixels[start : start + batch_size], dtype=np.float32)
        for name, value in zip(names, session.run(names, {PIXELS_INPUT: batch})):
            out[name].append(value)
    return {name: np.concatenate(parts) for name, parts in out.items()}


def _distribution_parity(model, session, pixels, names, tolerance):
    """Parity of a distribution model's mos_sd and shares (ONNX Runtime vs Keras); {} for
    a regression model (`kiqa.serving.artifact.distribution_parity` states the bounds)."""
    if DIST_OUTPUT not in model.output_names:
        return {}
    return artifact.distribution_parity(
        artifact.keras_outputs(model, pixels), run_session_outputs(session, pixels), names, tolerance,
        "onnxruntime_vs_keras", "the ONNX model (ONNX Runtime)",
    )


def _check_io(session, image_size, path):
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    problems = []
    if list(inputs) != [PIXELS_INPUT]:
        problems.append(f"inputs are {sorted(inputs)}, expected [{PIXELS_INPUT!r}]")
    elif list(inputs[PIXELS_INPUT].shape[1:]) != [int(image_size[0]), int(image_size[1]), 3] or isinstance(
        inputs[PIXELS_INPUT].shape[0], int
    ):
        problems.append(f"input {PIXELS_INPUT!r} has shape {inputs[PIXELS_INPUT].shape}, expected [batch, "
                        f"{image_size[0]}, {image_size[1]}, 3] with a dynamic batch")
    if sorted(outputs) not in ([MOS_OUTPUT], sorted([MOS_OUTPUT, SD_OUTPUT, DIST_OUTPUT])):
        problems.append(f"outputs are {sorted(outputs)}, expected [{MOS_OUTPUT!r}] (or, from a distribution "
                        f"model, also {SD_OUTPUT!r} and {DIST_OUTPUT!r})")
    if problems:
        raise ExportError(f"{path} failed its checks: " + "; ".join(problems))


def _converter_versions(onnxruntime):
    import keras
    import onnx
    import tf2onnx

    return {
        "name": "keras.Model.export(format='onnx') -> tf2onnx",
        "keras": keras.__version__,
        "tf2onnx": tf2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import tf2onnx  # noqa: F401
    except ImportError as err:
        raise ExportError(
            f"ONNX export needs the onnx, tf2onnx and onnxruntime packages ({err.name} is "
            f"missing); install kiqa's onnx extra: pip install 'kiqa[onnx]'"
        ) from err
    return onnxruntime
