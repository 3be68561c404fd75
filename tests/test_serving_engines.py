"""kiqa score's engines: ONNX Runtime and OpenVINO agree with TensorFlow on real photos."""

import numpy as np
import pytest

from helpers import EXPORT_SIZE, make_tiny_run

from kiqa.cli import score as cli_score
from kiqa.errors import ModelError
from kiqa.image import load_image
from kiqa.scorer import load_scorer
from kiqa.score import read_scores

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


def test_cli_score_with_onnxruntime(onnx_export, realset, tmp_path):
    _engine_or_skip("onnxruntime")
    run_dir, version = onnx_export
    out = tmp_path / "scores.csv"
    files = sorted((realset / "images").glob("koniq_*_512.jpg"))[:3]
    code = cli_score.main([*map(str, files), "--model", str(version.parent),
                           "--engine", "onnxruntime", "--out", str(out), "--quiet"])
    assert code == 0
    rows = read_scores(out)
    assert len(rows) == 3 and all(mos is not None for mos, _ in rows.values())
