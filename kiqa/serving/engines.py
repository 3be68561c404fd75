"""Running kiqa's ONNX model in ONNX Runtime or OpenVINO: the non-TF engines of the scorer.

`kiqa.scoring.scorer.load_scorer(engine=...)` calls these; each returns a predict function
mapping a float32 numpy batch [n, H, W, 3] (0..255, from `kiqa.image.decode_image`) to
MOS [n], and the object that keeps the loaded model alive.

Both runtimes are optional (`pip install 'kiqa[onnx]'`, `'kiqa[openvino]'`); a missing
one is an `ModelError` naming the extra.

Reduced precision (`REDUCED_PRECISION`): "openvino-bf16" runs OpenVINO with bfloat16
inference, ~1.9x its f32 speed at 384x512 on a CPU with AVX512_BF16 or AMX. bf16 keeps
8 bits of mantissa, so scores move by tenths of a MOS point (a score near 70 is on a
0.5-point grid) and every load is gated like the LiteRT float16 export: the engine
scores the caller's photos and kiqa's generated ones beside the float32 model, and is
refused (`PrecisionParityError`) when max |dMOS| exceeds `BF16_TOLERANCE` or the
Spearman correlation with float32 falls below `MIN_SRCC`. The figures travel with the
scorer into every output's provenance.

A distribution model's ONNX file (`TrainConfig.head` "distribution") has the outputs
`mos`, `mos_sd` and `dist`; both runtimes then return all three by name (a dict), and
`predicts_distribution` says so. The bf16 gate then also holds `mos_sd` (0-100 points,
like the MOS) to `BF16_TOLERANCE`.
"""

import tempfile
from pathlib import Path

import numpy as np

from kiqa.contract import DIST_OUTPUT, MOS_OUTPUT, PARITY_BATCH, PIXELS_INPUT, SD_OUTPUT
from kiqa.errors import ExportError, ModelError, PrecisionParityError

INPUT = PIXELS_INPUT
OUTPUT = MOS_OUTPUT

# Engine name -> (runtime, inference precision) of the reduced-precision engines.
REDUCED_PRECISION = {"openvino-bf16": ("openvino", "bf16")}
# Largest |bf16 - float32| allowed, in MOS points. Rounding the output alone to bf16's
# 8-bit mantissa moves a score in 64..100 by up to 0.25; on ConvNeXt-Tiny at 384x512
# OpenVINO bf16 measured 0.12 max |dMOS| (random weights). 0.5 is a twentieth of KonIQ's
# rater disagreement (~10 points) and half the LiteRT float16 bound, and still catches
# a broken conversion (whole points).
BF16_TOLERANCE = 0.5
# The ranking must survive: Spearman correlation with float32 on the parity images.
MIN_SRCC = 0.999


def onnx_predictor(onnx_file, engine, threads=None):
    """(predict, owner) for an ONNX file in `engine` ("onnxruntime" or "openvino").

    Raises:
        ModelError: the engine is not installed or cannot load the file.
    """
    if engine == "onnxruntime":
        return _onnxruntime(onnx_file, threads)
    if engine == "openvino":
        return _openvino(onnx_file, threads)
    raise ModelError(f"unknown ONNX engine {engine!r}")


def converted_predictor(model, image_size, engine, parity=None):
    """(predict, owner) for a Keras model converted to ONNX at load time.

    The file is written to a temporary folder (deleted with the owner) and checked on
    kiqa's generated images against the Keras model before it is used. A
    reduced-precision engine is gated on `parity` instead (see `gated_predictor`),
    with the Keras model's float32 scores as the reference.

    Args:
        model: the Keras model.
        image_size: (height, width).
        engine: "onnxruntime", "openvino" or a `REDUCED_PRECISION` engine.
        parity: for a reduced-precision engine, `ParityImages`.

    Returns:
        (predict, owner), and for a reduced-precision engine a third item: its parity
        figures (`gated_predictor`).

    Raises:
        ModelError: the engine or the converter is missing, or the check failed.
        PrecisionParityError: (a ModelError) the reduced-precision engine is over its bound.
    """
    from kiqa.serving import artifact
    from kiqa.serving import onnx as kiqa_onnx

    folder = tempfile.TemporaryDirectory(prefix="kiqa-onnx-")
    path = Path(folder.name) / "model.onnx"
    try:
        kiqa_onnx._require_onnx()
        kiqa_onnx.convert(model, path, image_size)
        if engine in REDUCED_PRECISION:
            predict, owner, figures = gated_predictor(
                path, engine, parity, reference=lambda pixels: artifact.keras_outputs(model, pixels),
                reference_name="the Keras model (TensorFlow float32)")
            return predict, (owner, folder), figures
        predict, owner = onnx_predictor(path, engine)
        names, pixels, _ = artifact.parity_pixels(None, image_size, 10**9)
        predicted = predict(pixels)
        outputs = predicted if isinstance(predicted, dict) else {MOS_OUTPUT: predicted}
        reference = artifact.keras_outputs(model, pixels)
        what = f"the converted ONNX model ({engine})"
        artifact.compare_scores(reference[MOS_OUTPUT].reshape(-1), outputs[MOS_OUTPUT], names,
                                kiqa_onnx.PARITY_TOLERANCE, what)
        # A distribution model's mos_sd and shares, under the ONNX export's bounds.
        artifact.distribution_parity(reference, outputs, names, kiqa_onnx.PARITY_TOLERANCE, "converted", what)
    except ExportError as err:
        folder.cleanup()
        raise ModelError(f"cannot run the model with {engine}: {err}") from err
    except BaseException:
        folder.cleanup()
        raise
    return predict, (owner, folder)


class ParityImages:
    """The images a reduced-precision engine is checked on, and its bounds.

    Attributes:
        names: one name per image (the caller's files first, then kiqa's generated ones).
        pixels: float32 [n, height, width, 3], from `kiqa.image.decode_image`.
        caller_images: how many of them are the caller's.
        tolerance: largest max |dMOS| allowed.
        min_srcc: smallest Spearman correlation with float32 allowed.
    """

    def __init__(self, names, pixels, caller_images, tolerance=BF16_TOLERANCE, min_srcc=MIN_SRCC):
        self.names, self.pixels, self.caller_images = list(names), pixels, int(caller_images)
        self.tolerance, self.min_srcc = float(tolerance), float(min_srcc)


def gated_predictor(onnx_file, engine, parity, reference=None, reference_name=None, threads=None):
    """(predict, owner, figures) for a reduced-precision engine that passed its parity gate.

    The engine scores `parity.pixels` beside a float32 reference (`reference`, else
    OpenVINO f32 on the same file) and is refused when it is further off than the
    bounds, as the LiteRT float16 export is.

    Args:
        onnx_file: the ONNX file.
        engine: a `REDUCED_PRECISION` name.
        parity: `ParityImages`.
        reference: float32 pixels -> MOS (float32) to compare with, or a dict of outputs
            holding `mos` (and a distribution model's `mos_sd`); None: OpenVINO f32.
        reference_name: what the reference is, for the figures.
        threads: inference threads (None: every core).

    Returns:
        (predict, owner, figures); figures: engine, precision (what the runtime reports
        it runs in: "f32" on a CPU without bf16, with a `note` saying so), reference,
        images, caller_images, max_abs_diff, mean_abs_diff, srcc, tolerance, min_srcc;
        for a distribution model also `mos_sd` (`spread_parity`).

    Raises:
        ModelError: the runtime is missing or cannot load the file.
        PrecisionParityError: (a ModelError) over a bound, or scores not finite.
    """
    runtime, precision = REDUCED_PRECISION[engine]
    predict, compiled = _openvino(onnx_file, threads, precision=precision)
    if reference is None:
        reference = _openvino(onnx_file, threads, precision="f32")[0]
        reference_name = "OpenVINO f32 on the same ONNX file"
    expected = _batched(reference, parity.pixels)
    scores = _batched(predict, parity.pixels)
    figures = precision_parity(expected[MOS_OUTPUT], scores[MOS_OUTPUT], parity, engine, str(onnx_file))
    if SD_OUTPUT in expected and SD_OUTPUT in scores:
        figures[SD_OUTPUT] = spread_parity(expected[SD_OUTPUT], scores[SD_OUTPUT], parity, engine, str(onnx_file))
    computed = _runtime_precision(compiled)
    figures = {
        "engine": engine,
        "precision": computed,
        "reference": reference_name,
        **figures,
    }
    if computed != precision:
        # OpenVINO falls back to f32 where the CPU has no bf16 instructions (no AVX512_BF16
        # or AMX): the scores are float32's, and so is the speed.
        figures["note"] = (f"this CPU cannot compute in {precision} (it has no AVX512_BF16 or AMX); "
                           f"OpenVINO ran in {computed}: float32 scores at float32 speed")
    return predict, compiled, figures


def _runtime_precision(compiled):
    """What OpenVINO reports a compiled model computes in: "bf16", "f32", ... (its
    `INFERENCE_PRECISION_HINT`, which is f32 where the CPU lacks the requested type)."""
    value = compiled.get_property("INFERENCE_PRECISION_HINT")
    name = getattr(value, "get_type_name", lambda: str(value))()
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(name, name)


def precision_parity(reference, scores, parity, engine, source=None):
    """Parity figures of a reduced-precision engine, or its refusal.

    Args:
        reference: float32 MOS per parity image.
        scores: the engine's MOS per parity image.
        parity: `ParityImages` (names and bounds).
        engine: the engine's name, for the message.
        source: the model, for the message.

    Returns:
        dict: images, caller_images, max_abs_diff, mean_abs_diff, srcc (None when the
        reference scores are all equal), tolerance, min_srcc, worst_image.

    Raises:
        PrecisionParityError: scores not finite, max |dMOS| over `parity.tolerance`, or
            SRCC under `parity.min_srcc`.
    """
    from scipy import stats

    reference, scores, worst, differences = _differences(reference, scores, parity)
    srcc = None
    if np.ptp(reference) > 0 and np.ptp(scores) > 0:
        srcc = float(stats.spearmanr(reference, scores).statistic)
    figures = {
        "images": int(reference.size),
        "caller_images": parity.caller_images,
        **differences,
        "srcc": srcc,
        "min_srcc": parity.min_srcc,
    }
    problem = None
    if not (np.all(np.isfinite(reference)) and np.all(np.isfinite(scores))):
        problem = "returns NaN or infinite scores"
    elif figures["max_abs_diff"] > parity.tolerance:
        problem = (f"is {figures['max_abs_diff']:.3g} MOS from float32 on {parity.names[worst]} "
                   f"({scores[worst]:.3f} vs {reference[worst]:.3f}), over its {parity.tolerance} MOS bound")
    elif srcc is not None and srcc < parity.min_srcc:
        problem = (f"ranks the {reference.size} parity images differently from float32 (SRCC "
                   f"{srcc:.4f}, under its {parity.min_srcc} bound)")
    if problem:
        raise PrecisionParityError(
            f"{source or 'the model'}: the {engine} engine {problem}; score with float32 "
            f"(mean |dMOS| {figures['mean_abs_diff']:.3g} over {reference.size} images)",
            path=source, engine=engine, figures=figures, image=figures["worst_image"],
        )
    return figures


def _differences(reference, values, parity):
    """(reference, values, index of the worst image, figures) of an engine's outputs
    against float32's; figures: max_abs_diff, mean_abs_diff, tolerance, worst_image."""
    reference = np.asarray(reference, np.float64).reshape(-1)
    values = np.asarray(values, np.float64).reshape(-1)
    diff = np.abs(values - reference)
    worst = int(np.argmax(diff)) if diff.size else 0
    return reference, values, worst, {
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "tolerance": parity.tolerance,
        "worst_image": parity.names[worst] if diff.size else None,
    }


def spread_parity(reference, spread, parity, engine, source=None):
    """Parity figures of a distribution model's `mos_sd` under a reduced-precision engine,
    or its refusal.

    `mos_sd` is in points of the MOS's 0-100 scale, so it is held to the same bound
    (`parity.tolerance`). Its ranking is not gated: a model's spreads may lie closer
    together than float32's own rounding.

    Args:
        reference: float32 `mos_sd` per parity image.
        spread: the engine's `mos_sd` per parity image.
        parity: `ParityImages` (names and bound).
        engine: the engine's name, for the message.
        source: the model, for the message.

    Returns:
        dict: max_abs_diff, mean_abs_diff, tolerance, worst_image.

    Raises:
        PrecisionParityError: not finite, or max |d mos_sd| over `parity.tolerance`.
    """
    reference, spread, worst, figures = _differences(reference, spread, parity)
    problem = None
    if not (np.all(np.isfinite(reference)) and np.all(np.isfinite(spread))):
        problem = "returns NaN or infinite mos_sd"
    elif figures["max_abs_diff"] > parity.tolerance:
        problem = (f"moves mos_sd (the predicted spread of ratings) {figures['max_abs_diff']:.3g} points from "
                   f"float32 on {parity.names[worst]} ({spread[worst]:.3f} vs {reference[worst]:.3f}), over "
                   f"its {parity.tolerance}-point bound")
    if problem:
        raise PrecisionParityError(
            f"{source or 'the model'}: the {engine} engine {problem}; score with float32",
            path=source, engine=engine, figures=figures, image=figures["worst_image"],
        )
    return figures


def _batched(predict, pixels):
    """{"mos": [n]} (and a distribution model's "mos_sd": [n]) of `predict` on `pixels`,
    batch by batch, as float64; `predict` returns MOS or a dict of outputs."""
    parts = {}
    for start in range(0, len(pixels), PARITY_BATCH):
        outputs = predict(pixels[start : start + PARITY_BATCH])
        if not isinstance(outputs, dict):
            outputs = {MOS_OUTPUT: outputs}
        for key in (MOS_OUTPUT, SD_OUTPUT):
            if key in outputs:
                parts.setdefault(key, []).append(np.reshape(np.asarray(outputs[key]), [-1]))
    return {key: np.concatenate(values).astype(np.float64) for key, values in parts.items()}


def _onnxruntime(onnx_file, threads):
    try:
        from kiqa.serving import onnx as kiqa_onnx

        session = kiqa_onnx.load_session(onnx_file, _import("onnxruntime", "onnx"), threads)
    except ExportError as err:
        raise ModelError(str(err)) from err

    names = [o.name for o in session.get_outputs()]

    def predict(batch):
        if names == [OUTPUT]:
            return session.run([OUTPUT], {INPUT: np.ascontiguousarray(batch, np.float32)})[0].reshape(-1)
        # A distribution model: mos, mos_sd and dist, by name (kiqa.scoring.scorer reads the dict).
        return dict(zip(names, session.run(names, {INPUT: np.ascontiguousarray(batch, np.float32)})))

    return predict, session


def predicts_distribution(owner):
    """True when a loaded ONNX model has the distribution outputs (`mos_sd`, `dist`).

    Args:
        owner: what `onnx_predictor`, `gated_predictor` or `converted_predictor` returned
            beside the predict function (an ONNX Runtime session, an OpenVINO compiled
            model, a `SplitCompiledModel`, or a tuple of one of them and the temporary
            folder).
    """
    session = owner[0] if isinstance(owner, tuple) else owner
    if hasattr(session, "get_outputs"):  # ONNX Runtime
        names = [o.name for o in session.get_outputs()]
    else:  # OpenVINO
        names = [o.get_any_name() for o in getattr(session, "outputs", ())]
    return DIST_OUTPUT in names


def _openvino(onnx_file, threads, precision="f32"):
    openvino = _import("openvino", "openvino")
    # OpenVINO's CPU plugin computes in bf16 by default on CPUs with AVX512_BF16 or AMX:
    # scores then land on a 0.25-MOS grid, 0.14 MOS off TF on the real photos, over the
    # 0.05 parity bound. f32 keeps parity; "bf16" is the gated "openvino-bf16" engine.
    config = {"INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    core = openvino.Core()
    try:
        if precision != "f32":
            split = _split_after_pool(core.read_model(str(onnx_file)), openvino)
            if split is not None:
                return _reduced_body_float_head(core, split, config, threads)
        compiled = core.compile_model(str(onnx_file), "CPU", config)
    except Exception as err:  # OpenVINO raises RuntimeError subclasses without stable names
        raise ModelError(f"OpenVINO cannot load {onnx_file}: {' '.join(str(err).split())[:300]}") from err
    read = _output_reader(compiled)

    def predict(batch):
        return read(compiled(np.ascontiguousarray(batch, np.float32)))

    return predict, compiled


def _output_reader(compiled):
    """OpenVINO inference result -> MOS [n] for a regression model, or (like ONNX Runtime's
    engine) a dict of `mos`, `mos_sd` and `dist` by name for a distribution model."""
    names = [o.get_any_name() for o in compiled.outputs]
    if DIST_OUTPUT not in names:
        output = compiled.output(OUTPUT)
        return lambda result: np.asarray(result[output]).reshape(-1)
    outputs = {name: compiled.output(name) for name in names}
    return lambda result: {name: np.asarray(result[output]) for name, output in outputs.items()}


def input_size(owner):
    """(height, width) an ONNX model's input takes, as its engine reports it.

    Args:
        owner: the second item `onnx_predictor` returns (an ONNX Runtime session or an
            OpenVINO compiled model).

    Returns:
        (height, width), with None for a dimension the model leaves open; None when the
        engine does not say.
    """
    try:
        if hasattr(owner, "get_inputs"):  # ONNX Runtime: ints, or names/None for open dims
            shape = list(owner.get_inputs()[0].shape)
        else:  # OpenVINO: a partial shape of dimensions
            shape = [d.get_length() if d.is_static else None for d in owner.input(0).get_partial_shape()]
    except (AttributeError, IndexError, RuntimeError):
        return None
    if len(shape) != 4:
        return None
    return tuple(v if isinstance(v, int) and v > 0 else None for v in shape[1:3])


def _split_after_pool(model, openvino):
    """(body, head): `model` cut after its last global average pool, or None.

    In bf16 the output itself lands on bf16's grid (8 bits of mantissa: 0.25 MOS near
    50, 0.5 near 70), which alone swaps photos a tenth of a point apart. The head (after
    the pool: layer norm, Dense, rescale) costs nothing, so it runs in float32 and only
    the backbone, where the time goes, in bf16: on the tiny test model max |dMOS| went
    from 0.11 to ~0.01. None when there is no pool over the spatial axes or the head
    needs more than the pooled features.
    """
    pools = []
    for op in model.get_ordered_ops():
        if op.get_type_name() == "ReduceMean" and _is_global_pool(op):
            pools.append(op)
    if not pools:
        return None
    pooled = pools[-1].output(0)
    features = openvino.opset13.parameter(pooled.get_partial_shape(), pooled.get_element_type(), name="features")
    consumers = list(pooled.get_target_inputs())
    for consumer in consumers:
        consumer.replace_source_output(features.output(0))
    try:
        head = openvino.Model(model.get_results(), [features], "kiqa_head")
        body = openvino.Model([openvino.opset13.result(pooled)], model.get_parameters(), "kiqa_body")
    except RuntimeError:  # the head reads more than the pooled features: keep it whole
        for consumer in consumers:
            consumer.replace_source_output(pooled)
        return None
    return body, head


def _is_global_pool(op):
    """A mean over the spatial axes of an image batch: [n, h, w, c] or [n, c, h, w] in
    (the converter may turn the layout), one value per channel out."""
    before, after = op.get_input_partial_shape(0), op.get_output_partial_shape(0)
    if before.rank.is_dynamic or before.rank.get_length() != 4 or after.rank.is_dynamic:
        return False
    dims = list(after)[1:]
    if not dims or not all(d.is_static for d in dims):
        return False
    sizes = [d.get_length() for d in dims]
    return sum(size > 1 for size in sizes) <= 1


class SplitCompiledModel:
    """A model compiled in two parts: the body in reduced precision, the head in f32.

    It answers what kiqa asks of an OpenVINO compiled model: `input` and `get_property`
    are the body's (the image input, the precision the backbone runs in), `outputs` the
    head's (`mos`, and a distribution model's `mos_sd` and `dist`).
    """

    def __init__(self, body, head):
        self.body, self.head = body, head

    def input(self, index=0):
        return self.body.input(index)

    def get_property(self, name):
        return self.body.get_property(name)

    @property
    def outputs(self):
        return self.head.outputs


def _reduced_body_float_head(core, split, config, threads):
    body, head = split
    body_compiled = core.compile_model(body, "CPU", config)
    head_config = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        head_config["INFERENCE_NUM_THREADS"] = int(threads)
    head_compiled = core.compile_model(head, "CPU", head_config)
    read = _output_reader(head_compiled)  # every head output: a distribution head has three

    def predict(batch):
        features = body_compiled(np.ascontiguousarray(batch, np.float32))[0]
        return read(head_compiled(features))

    return predict, SplitCompiledModel(body_compiled, head_compiled)


def _import(module, extra):
    try:
        return __import__(module)
    except ImportError as err:
        raise ModelError(
            f"the {module} engine is not installed; pip install 'kiqa[{extra}]'"
        ) from err
