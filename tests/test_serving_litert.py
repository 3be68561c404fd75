"""LiteRT export: float32 and quantised variants, reload, parity, atomic publish, refusal."""

import json

import keras
import numpy as np
import pytest

from helpers import EXPORT_SIZE, make_tiny_run

from kiqa.cli import export as cli_export
from kiqa.config import TrainConfig
from kiqa.errors import ExportError
from kiqa.image import load_image
from kiqa.model import build_model
from kiqa.serving import litert


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("litert") / "run"
    make_tiny_run(folder, head_scale=50.0)
    return folder


@pytest.fixture(scope="module")
def published(run_dir, tmp_path_factory, shared_data):
    real = shared_data / "realset" / "images"
    base = tmp_path_factory.mktemp("litert-export") / "kiqa-litert"
    return base, litert.export_litert(run_dir, base_path=base, parity_images=[real] if real.is_dir() else None)


def test_export_writes_every_variant_with_sizes_and_parity(published, realset):
    base, path = published
    assert path == base / "1" and sorted(p.name for p in base.iterdir()) == ["1"]
    info = json.loads((path / "kiqa.json").read_text())
    assert info["format"] == "litert" and info["input"]["shape"] == [-1, *EXPORT_SIZE, 3]
    n_real = len(list((realset / "images").iterdir()))
    for variant, (file_name, tolerance) in litert.VARIANTS.items():
        assert info["files"][file_name] == (path / file_name).stat().st_size > 0
        figures = info["parity"][f"{variant}_vs_keras"]
        assert figures["caller_images"] == n_real and figures["tolerance"] == tolerance
        assert figures["max_abs_diff"] <= tolerance and figures["srcc"] > 0.99


def test_each_variant_reloads_with_dynamic_batch_and_agrees_on_real_photos(published, run_dir, realset):
    _, path = published
    model = keras.models.load_model(run_dir / "model.keras")
    files = sorted((realset / "images").iterdir())
    pixels = np.stack([load_image(f, EXPORT_SIZE).numpy() for f in files])
    keras_mos = np.asarray(model(pixels, training=False)["mos"])
    assert np.ptp(keras_mos) > 1.0
    for variant, (file_name, tolerance) in litert.VARIANTS.items():
        interpreter = litert.load_interpreter(path / file_name)
        for batch in (1, 3):
            assert litert.run_interpreter(interpreter, pixels[:batch]).shape == (batch,)
        scores = litert.run_interpreter(interpreter, pixels)
        assert np.max(np.abs(scores - keras_mos)) <= tolerance, variant


def test_disagreement_of_a_variant_is_refused_and_nothing_published(run_dir, tmp_path, monkeypatch):
    real_run = litert.run_interpreter_outputs
    calls = []

    def drifting(interpreter, pixels):
        calls.append(1)
        outputs = real_run(interpreter, pixels)
        # The float16 variant (second file) is off by 3 MOS, over its 1-point bound.
        return outputs | {"mos": outputs["mos"] + (3.0 if len(calls) == 2 else 0.0)}

    monkeypatch.setattr(litert, "run_interpreter_outputs", drifting)
    base = tmp_path / "kiqa-litert"
    with pytest.raises(ExportError, match="LiteRT float16 model.*over the 1.0 MOS tolerance"):
        litert.export_litert(run_dir, base_path=base)
    assert list(base.iterdir()) == []


def test_existing_version_is_refused_and_a_failed_conversion_leaves_nothing(published, run_dir, tmp_path, monkeypatch):
    base, _ = published
    with pytest.raises(ExportError, match="already exists"):
        litert.export_litert(run_dir, base_path=base, version=1)

    def broken(*args, **kwargs):
        raise ExportError("the LiteRT converter failed")

    monkeypatch.setattr(litert, "convert", broken)
    other = tmp_path / "kiqa-litert"
    with pytest.raises(ExportError, match="converter failed"):
        litert.export_litert(run_dir, base_path=other)
    assert list(other.iterdir()) == []


def test_convnext_parts_convert_with_builtin_ops(tmp_path):
    """Exact GELU, fixed Normalization statistics and a grouped depthwise Conv2D."""
    keras.utils.set_random_seed(1)
    image = keras.Input((None, None, 3))
    x = keras.layers.Normalization(mean=[120.0, 110.0, 100.0], variance=[3000.0, 3100.0, 2900.0])(image)
    x = keras.layers.Conv2D(8, 3, strides=2)(x)
    x = keras.layers.Conv2D(8, 3, padding="same", groups=8)(x)
    x = keras.layers.Activation("gelu")(x)
    x = keras.layers.LayerNormalization()(x)
    config = TrainConfig.demo(weights="none", image_size=EXPORT_SIZE)
    model = build_model(config, backbone=keras.Model(image, x))
    head = model.get_layer("head_dense")
    head.kernel.assign(head.kernel * 100.0)
    path = litert.export_litert(model, base_path=tmp_path / "m", config=config, variants=("float32",))
    assert sorted(p.name for p in path.iterdir()) == ["kiqa.json", "model.tflite"]
    pixels = np.random.default_rng(0).uniform(0, 255, (4, *EXPORT_SIZE, 3)).astype(np.float32)
    keras_mos = np.asarray(model(pixels, training=False)["mos"])
    assert np.ptp(keras_mos) > 0.1
    scores = litert.run_interpreter(litert.load_interpreter(path / "model.tflite"), pixels)
    np.testing.assert_allclose(scores, keras_mos, atol=1e-3)


def test_cli_format_litert(run_dir, tmp_path, capsys):
    base = tmp_path / "cli-litert"
    assert cli_export.main(["--format", "litert", str(run_dir), "--base", str(base)]) == 0
    out = capsys.readouterr().out
    assert "(litert)" in out and "parity float16_vs_keras" in out and "model_dynamic.tflite" in out
