"""kiqa score's engines: ONNX Runtime and OpenVINO agree with TensorFlow on real photos."""

import numpy as np
import pytest

from helpers import EXPORT_SIZE, make_tiny_run

from kiqa.cli import score as cli_score
from kiqa.errors import ModelError
from kiqa.image import load_image
from kiqa.scoring.scorer import load_scorer
from kiqa.scoring.table import read_scores

# The bound: an engine may replace TF only where |dMOS| < 0.05 on real photos.
ENGINE_TOLERANCE = 0.05


def _engine_or_skip(engine):
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino"}[engine]
    pytest.importorskip(module, reason=f"the {engine} engine is not installed (kiqa[{'onnx' if engine == 'onnxruntime' else 'openvino'}])")
    pytest.importorskip("tf2onnx", reason="ONNX export needs kiqa's onnx extra")


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    pytest.importorskip("tf2onnx", reason="ONNX export needs kiqa's onnx extra")
    pytest.importorskip("onnxruntime", reason="ONNX export needs kiqa's onnx extra")
    from kiqa.serving.onnx import export_onnx

    root = tmp_path_factory.mktemp("engines")
    make_tiny_run(root / "run", head_scale=50.0)
    return root / "run", export_onnx(root / "run", base_path=root / "kiqa-onnx")


def _cpu_has_bf16():
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.fixture(scope="module")
def real_pixels(realset):
    files = sorted((realset / "images").iterdir())
    return files, np.stack([load_image(f, EXPORT_SIZE).numpy() for f in files])


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_engine_agrees_with_tf_on_real_photos(engine, onnx_export, real_pixels):
    _engine_or_skip(engine)
    run_dir, version = onnx_export
    _, pixels = real_pixels
    tf_mos = load_scorer(run_dir).predict_pixels(pixels)
    assert np.ptp(tf_mos) > 1.0
    for ref in (version.parent, version, version / "model.onnx"):
        scorer = load_scorer(ref, engine=engine)
        assert scorer.engine == engine and scorer.kind == "onnx" and scorer.image_size == EXPORT_SIZE
        assert np.max(np.abs(scorer.predict_pixels(pixels) - tf_mos)) < ENGINE_TOLERANCE


def test_keras_run_is_converted_at_load_time(onnx_export, real_pixels):
    _engine_or_skip("onnxruntime")
    run_dir, _ = onnx_export
    _, pixels = real_pixels
    scorer = load_scorer(run_dir, engine="onnxruntime")
    assert scorer.kind == "keras" and scorer.engine == "onnxruntime"
    assert np.max(np.abs(scorer.predict_pixels(pixels) - load_scorer(run_dir).predict_pixels(pixels))) < ENGINE_TOLERANCE


def test_wrong_engine_for_the_model_is_refused_with_the_fix(onnx_export, tmp_path):
    run_dir, version = onnx_export
    base = tmp_path / "kiqa"
    (base / "1").mkdir(parents=True)
    (base / "1" / "saved_model.pb").write_bytes(b"")  # the layout is what is refused, before loading
    with pytest.raises(ModelError, match="is an ONNX export; score it with the onnxruntime or openvino"):
        load_scorer(version)
    with pytest.raises(ModelError, match="is a SavedModel.*runs ONNX exports"):
        load_scorer(base, engine="onnxruntime")
    with pytest.raises(ModelError, match="unknown engine"):
        load_scorer(run_dir, engine="torch")


def _cli_score(version, engine, realset, out):
    """`kiqa score` of three real photos with `engine`; returns its exit code."""
    files = sorted((realset / "images").glob("koniq_*_512.jpg"))[:3]
    return cli_score.main([*map(str, files), "--model", str(version.parent),
                           "--engine", engine, "--out", str(out), "--quiet"])


def test_cli_score_with_onnxruntime(onnx_export, realset, tmp_path):
    _engine_or_skip("onnxruntime")
    run_dir, version = onnx_export
    out = tmp_path / "scores.csv"
    assert _cli_score(version, "onnxruntime", realset, out) == 0
    rows = read_scores(out)
    assert len(rows) == 3 and all(mos is not None for mos, _ in rows.values())


# ----------------------------------------------------------------------------- openvino-bf16


def test_bf16_engine_is_gated_on_your_photos_and_says_how_far_it_is(onnx_export, realset, real_pixels):
    _engine_or_skip("openvino")
    from kiqa.serving.engines import BF16_TOLERANCE, MIN_SRCC

    run_dir, version = onnx_export
    files, pixels = real_pixels
    scorer = load_scorer(version.parent, engine="openvino-bf16", parity_images=files)
    figures = scorer.precision_parity
    assert scorer.engine == "openvino-bf16" and figures["engine"] == "openvino-bf16"
    # The first PARITY_SAMPLE of the caller's photos, then kiqa's generated images.
    assert figures["caller_images"] == min(16, len(files)) and figures["images"] > figures["caller_images"]
    assert figures["max_abs_diff"] <= BF16_TOLERANCE and figures["srcc"] >= MIN_SRCC
    assert figures["tolerance"] == BF16_TOLERANCE and figures["min_srcc"] == MIN_SRCC
    assert figures["reference"].startswith("OpenVINO f32")
    # What OpenVINO computed in: bf16 where the CPU has it, else f32, said in a note.
    if _cpu_has_bf16():
        assert figures["precision"] == "bf16" and "note" not in figures
    else:
        assert figures["precision"] == "f32" and "AVX512_BF16 or AMX" in figures["note"]
    # What the gate promised holds on the photos scored.
    tf_mos = load_scorer(run_dir).predict_pixels(pixels)
    assert np.max(np.abs(scorer.predict_pixels(pixels) - tf_mos)) <= BF16_TOLERANCE + ENGINE_TOLERANCE
    # A float32 engine carries no such figures, and its outputs record nothing more.
    assert load_scorer(version.parent, engine="openvino").precision_parity is None
    assert load_scorer(version.parent, engine="openvino").model_facts() == {}


def test_bf16_engine_over_its_bound_is_refused_naming_the_image(onnx_export, real_pixels):
    _engine_or_skip("openvino")
    from kiqa.errors import PrecisionParityError

    run_dir, _ = onnx_export
    files, _ = real_pixels
    # A bound nothing meets: against TensorFlow float32 (a run folder's reference) another
    # runtime differs by ~1e-5 even where the CPU has no bf16 and OpenVINO runs in f32.
    with pytest.raises(PrecisionParityError, match=r"openvino-bf16 engine is .* MOS from float32 on .*over its 1e-09 MOS bound") as caught:
        load_scorer(run_dir, engine="openvino-bf16", parity_images=files, precision_tolerance=1e-9)
    assert caught.value.engine == "openvino-bf16" and caught.value.figures["max_abs_diff"] > 1e-9
    assert caught.value.image in [str(f) for f in files] or caught.value.image.startswith("generated-")


def test_precision_parity_refuses_a_changed_ranking():
    from kiqa.errors import PrecisionParityError
    from kiqa.serving.engines import ParityImages, precision_parity

    parity = ParityImages(["a", "b", "c", "d"], None, 4, tolerance=1.0)
    reference = np.array([10.0, 10.2, 10.4, 10.6])
    assert precision_parity(reference, reference + 0.1, parity, "openvino-bf16")["srcc"] == pytest.approx(1.0)
    with pytest.raises(PrecisionParityError, match=r"ranks the 4 parity images differently .*SRCC"):
        precision_parity(reference, np.array([10.3, 10.2, 10.4, 10.6]), parity, "openvino-bf16")
    with pytest.raises(PrecisionParityError, match="NaN or infinite"):
        precision_parity(reference, np.array([np.nan, 10.2, 10.4, 10.6]), parity, "openvino-bf16")


def test_cli_score_with_bf16_records_its_parity_in_the_provenance(onnx_export, realset, tmp_path, capsys):
    _engine_or_skip("openvino")
    import json

    _, version = onnx_export
    assert _cli_score(version, "openvino-bf16", realset, tmp_path / "scores.csv") == 0
    assert "openvino-bf16 (" in capsys.readouterr().out
    sidecar = json.loads((tmp_path / "scores.csv.provenance.json").read_text())
    assert sidecar["engine"] == "openvino-bf16"
    assert sidecar["precision_parity"]["caller_images"] == 3
    assert sidecar["precision_parity"]["max_abs_diff"] <= sidecar["precision_parity"]["tolerance"]
