"""LiteRT (TFLite) export for phones and edge devices: float32 and quantised variants.

`export_litert` writes one version folder, `<base>/<version>/`, holding

- `model.tflite`: float32, the reference (its parity with Keras must hold within
  `PARITY_TOLERANCE`, like the SavedModel and ONNX exports);
- `model_fp16.tflite`: weights stored as float16 (half the size; LiteRT dequantises them
  to float32 on CPU, and GPU delegates compute in float16);
- `model_dynamic.tflite`: dynamic-range quantisation (int8 weights, float activations;
  about a quarter of the size, int8 matrix kernels on CPU);
- `kiqa.json`: the pixel contract (input `image` float32 [-1, H, W, 3] 0..255, output
  `mos` float32 [-1]), kiqa's preprocessing rule, each file's size and its measured
  parity (max and mean |ΔMOS| and SRCC against the float Keras model).

A distribution model's files (`TrainConfig.head` "distribution") also output `mos_sd`
float32 [-1] and `dist` float32 [-1, 5] (kiqa.json's `extra_outputs`), and each
variant's parity covers them: `mos_sd` within the variant's MOS tolerance, each share
within that tolerance over `KONIQ_MOS_SLOPE` (`kiqa.serving.artifact.distribution_parity`),
recorded as `<variant>_vs_keras_mos_sd` and `<variant>_vs_keras_dist`.

The quantised variants trade accuracy for size, so their bound is looser
(`QUANTISED_TOLERANCE`); an export whose variant drifts further is refused, as a wrong
conversion would be. The parity of a random-weight model (the tests, the benchmarks
here) says little about a trained one: re-check with your trained model and real photos
(the export's `parity_images`), which the export does every time.

Converter: `tf.lite.TFLiteConverter.from_concrete_functions` on the model's traced call,
builtin ops only. Keras 3.15's own `model.export(format="litert")` goes through a
SavedModel (`ExportArchive`, which stores each weight twice, keras issue 23553) and
enables `SELECT_TF_OPS`, which makes the file need the Flex delegate (TF ops inside
LiteRT, ~+6 MB on a phone); kiqa's model needs none, so it is not enabled, and a model
that would need one fails the conversion with the op named. Like the ONNX export, the
fast-depthwise copy of a stock model is what gets converted.

The interpreter used for the parity check (and `load_interpreter`) is `ai_edge_litert`'s
when installed: `tf.lite.Interpreter` is deprecated ("scheduled for deletion in TF 2.20",
still present in 2.21) in favour of that package. Both read the same files.
"""

import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import tensorflow as tf

from kiqa.contract import DIST_OUTPUT, MOS_OUTPUT, PARITY_BATCH, PIXELS_INPUT, RATING_LEVELS, SD_OUTPUT
from kiqa.errors import ExportError
from kiqa.serving import artifact, export
from kiqa.serving.export import ExportOptions

DEFAULT_BASE_PATH = "export/kiqa-litert"
PARITY_TOLERANCE = export.PARITY_TOLERANCE
# Quantised weights move scores: float16 rounds each weight to 11 significant bits,
# dynamic-range to 256 levels per channel. 1 MOS point is a tenth of KonIQ's rater
# disagreement (~10 points), and still catches a broken conversion (tens of points).
QUANTISED_TOLERANCE = 1.0
# The outputs a kiqa LiteRT file returns (sorted): a regression model's, a distribution model's.
OUTPUT_SETS = ([MOS_OUTPUT], sorted([MOS_OUTPUT, SD_OUTPUT, DIST_OUTPUT]))
# name -> (file, tolerance).
VARIANTS = {
    "float32": ("model.tflite", PARITY_TOLERANCE),
    "float16": ("model_fp16.tflite", QUANTISED_TOLERANCE),
    "dynamic_range": ("model_dynamic.tflite", QUANTISED_TOLERANCE),
}


def export_litert(model_or_path, options: Optional[ExportOptions] = None, *, variants=tuple(VARIANTS),
                  tolerances=None, **overrides) -> Path:
    """Exports a model as LiteRT files in `<base_path>/<version>/`, atomically.

    Args:
        model_or_path: a run directory, a `.keras` file or an in-memory `keras.Model`.
        options: `kiqa.serving.export.ExportOptions` (default base path
            "export/kiqa-litert"); each variant must agree with the Keras model on its
            parity images.
        variants: which of `VARIANTS` to write ("float32" is always written).
        tolerances: {variant: MOS points} overriding the defaults of `VARIANTS`.
        **overrides: `ExportOptions` fields by name.

    Returns:
        The `Path` of the published version folder.

    Raises:
        ExportError: the version exists, a conversion failed, or a variant's parity
            failed; nothing numeric was left in the base path.
    """
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ExportError(f"unknown LiteRT variants {unknown}; choose from {sorted(VARIANTS)}")
    variants = ["float32"] + [v for v in VARIANTS if v in variants and v != "float32"]
    tolerances = {name: tol for name, (_, tol) in VARIANTS.items()} | dict(tolerances or {})
    options = ExportOptions.of(options, **overrides)
    base = Path(options.base_path or DEFAULT_BASE_PATH)
    resolved = export.load_for_export(model_or_path, options, base)
    names, pixels, caller_images = artifact.parity_pixels(options.parity_images, resolved.image_size,
                                                          resolved.max_pixels)
    reference = artifact.keras_outputs(resolved.model, pixels)
    with export.staged_version(base, options.version, options.overwrite) as (version, temp, target):
        files, parity = {}, {}
        for variant in variants:
            file_name = VARIANTS[variant][0]
            (temp / file_name).write_bytes(convert(resolved.model, resolved.image_size, variant))
            outputs = run_interpreter_outputs(load_interpreter(temp / file_name), pixels)
            what = f"the LiteRT {variant} model"
            figures = artifact.compare_scores(reference[MOS_OUTPUT].reshape(-1), outputs[MOS_OUTPUT], names,
                                              tolerances[variant], what)
            figures["caller_images"] = caller_images
            parity[f"{variant}_vs_keras"] = figures
            parity.update(artifact.distribution_parity(reference, outputs, names, tolerances[variant],
                                                       f"{variant}_vs_keras", what))
            files[file_name] = (temp / file_name).stat().st_size
        metadata = artifact.base_metadata(resolved, base.resolve().name, version) | dict(
            format="litert",
            file=VARIANTS["float32"][0],
            files=files,
            variants={v: VARIANTS[v][0] for v in variants},
            converter={"name": "tf.lite.TFLiteConverter.from_concrete_functions (builtin ops only)",
                       "tensorflow": tf.__version__},
            parity=parity,
        )
        artifact.write_metadata(temp, metadata)
    return target


def convert(model, image_size, variant="float32"):
    """The model as LiteRT flatbuffer bytes.

    Args:
        model: a kiqa Keras model.
        image_size: (height, width).
        variant: one of `VARIANTS`.

    Raises:
        ExportError: the converter failed (e.g. an op with no builtin kernel).
    """
    model, _ = artifact.convertible_model(model)
    height, width = int(image_size[0]), int(image_size[1])

    @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32, name=PIXELS_INPUT)])
    def serve(image):
        outputs = model(image, training=False)
        served = {MOS_OUTPUT: tf.reshape(tf.cast(outputs[MOS_OUTPUT], tf.float32), [-1])}
        if DIST_OUTPUT in outputs:  # a distribution model: its spread and shares too
            served[SD_OUTPUT] = tf.reshape(tf.cast(outputs[SD_OUTPUT], tf.float32), [-1])
            served[DIST_OUTPUT] = tf.reshape(tf.cast(outputs[DIST_OUTPUT], tf.float32), [-1, RATING_LEVELS])
        return served

    # The converter freezes the variables the trackable object holds; a Keras 3 model
    # is not one TF can walk for its raw tf.Variables (the file then computes with
    # uninitialised weights: NaN or 1e36 scores), so a plain tf.Module holds them.
    holder = tf.Module()
    holder.variables_to_freeze = [export.raw_variable(w) for w in model.weights]
    with artifact.constant_normalization(model):
        concrete = serve.get_concrete_function()
        converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "dynamic_range":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return converter.convert()
    except Exception as err:  # the converter raises ConverterError and plain exceptions
        raise ExportError(
            f"the LiteRT converter failed on the {variant} variant: "
            f"{' '.join(str(err).split())[:500]}"
        ) from err


def load_interpreter(path, threads=None):
    """A LiteRT interpreter for an exported file (ai_edge_litert's, else tf.lite's).

    The file's signature takes `image` and returns `mos`, or for a distribution model
    `mos`, `mos_sd` and `dist`.

    Raises:
        ExportError: the file cannot be loaded or has other inputs or outputs.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
            interpreter = Interpreter(model_path=str(path), num_threads=threads)
    except (ValueError, RuntimeError) as err:
        raise ExportError(f"LiteRT cannot load {path}: {' '.join(str(err).split())[:300]}") from err
    runner = interpreter.get_signature_runner()
    inputs, outputs = runner.get_input_details(), runner.get_output_details()
    if list(inputs) != [PIXELS_INPUT] or sorted(outputs) not in OUTPUT_SETS:
        raise ExportError(f"{path} takes {sorted(inputs)} and returns {sorted(outputs)}, "
                          f"expected [{PIXELS_INPUT!r}] -> {' or '.join(map(str, OUTPUT_SETS))}")
    return interpreter


def run_interpreter(interpreter, pixels, batch_size=PARITY_BATCH):
    """MOS of a pixel array through a LiteRT interpreter, batch by batch: float32 [n]."""
    return run_interpreter_outputs(interpreter, pixels, batch_size)[MOS_OUTPUT]


def run_interpreter_outputs(interpreter, pixels, batch_size=PARITY_BATCH):
    """Every output of a LiteRT file for a pixel array, batch by batch.

    Returns:
        dict of float32 arrays: `mos` [n] and, for a distribution model, `mos_sd` [n]
        (0-100 points) and `dist` [n, 5] (shares of the rating levels 1..5).
    """
    runner = interpreter.get_signature_runner()
    out = {}
    for start in range(0, len(pixels), batch_size):
        batch = np.ascontiguousarray(pixels[start : start + batch_size], dtype=np.float32)
        for name, value in runner(**{PIXELS_INPUT: batch}).items():
            out.setdefault(name, []).append(np.asarray(value))
    shapes = {MOS_OUTPUT: [-1], SD_OUTPUT: [-1], DIST_OUTPUT: [-1, RATING_LEVELS]}
    return {name: np.reshape(np.concatenate(parts), shapes.get(name, [len(pixels), -1]))
            for name, parts in out.items()}
