"""Running kiqa's ONNX model in ONNX Runtime or OpenVINO: the non-TF engines of the scorer.

`kiqa.scorer.load_scorer(engine=...)` calls these; each returns a predict function
mapping a float32 numpy batch [n, H, W, 3] (0..255, from `kiqa.image.decode_image`) to
MOS [n], and the object that keeps the loaded model alive.

Both runtimes are optional (`pip install 'kiqa[onnx]'`, `'kiqa[openvino]'`); a missing
one is an `ModelError` naming the extra.
"""

import tempfile
from pathlib import Path

import numpy as np

from kiqa.errors import ExportError, ModelError

INPUT = "image"
OUTPUT = "mos"


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


def converted_predictor(model, image_size, engine):
    """(predict, owner) for a Keras model converted to ONNX at load time.

    The file is written to a temporary folder (deleted with the owner) and checked on
    kiqa's generated images against the Keras model before it is used.

    Raises:
        ModelError: the engine or the converter is missing, or the check failed.
    """
    from kiqa.serving import artifact
    from kiqa.serving import onnx as kiqa_onnx

    folder = tempfile.TemporaryDirectory(prefix="kiqa-onnx-")
    path = Path(folder.name) / "model.onnx"
    try:
        kiqa_onnx._require_onnx()
        kiqa_onnx.convert(model, path, image_size)
        predict, owner = onnx_predictor(path, engine)
        names, pixels, _ = artifact.parity_pixels(None, image_size, 10**9)
        predicted = predict(pixels)
        artifact.compare_scores(artifact.keras_scores(model, pixels),
                                predicted["mos"] if isinstance(predicted, dict) else predicted, names,
                                kiqa_onnx.PARITY_TOLERANCE, f"the converted ONNX model ({engine})")
    except ExportError as err:
        folder.cleanup()
        raise ModelError(f"cannot run the model with {engine}: {err}") from err
    return predict, (owner, folder)


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
        # A distribution model: mos, mos_sd and dist, by name (kiqa.scorer reads the dict).
        return dict(zip(names, session.run(names, {INPUT: np.ascontiguousarray(batch, np.float32)})))

    return predict, session


def predicts_distribution(owner):
    """True when an ONNX Runtime session (an `onnx_predictor` owner) has the distribution outputs."""
    session = owner[0] if isinstance(owner, tuple) else owner
    get_outputs = getattr(session, "get_outputs", None)
    return bool(get_outputs) and "dist" in [o.name for o in get_outputs()]


def _openvino(onnx_file, threads, precision="f32"):
    openvino = _import("openvino", "openvino")
    # OpenVINO's CPU plugin computes in bf16 by default on CPUs with AVX512_BF16 (as
    # here): scores then land on a 0.25-MOS grid, 0.14 MOS off TF on the real photos,
    # over the 0.05 parity bound. f32 keeps parity; "bf16" is for the benchmarks.
    config = {"INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        compiled = openvino.Core().compile_model(str(onnx_file), "CPU", config)
    except Exception as err:  # OpenVINO raises RuntimeError subclasses without stable names
        raise ModelError(f"OpenVINO cannot load {onnx_file}: {' '.join(str(err).split())[:300]}") from err
    output = compiled.output(OUTPUT)

    def predict(batch):
        return np.asarray(compiled(np.ascontiguousarray(batch, np.float32))[output]).reshape(-1)

    return predict, compiled


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


def _import(module, extra):
    try:
        return __import__(module)
    except ImportError as err:
        raise ModelError(
            f"the {module} engine is not installed; pip install 'kiqa[{extra}]'"
        ) from err
