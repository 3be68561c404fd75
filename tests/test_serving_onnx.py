"""ONNX export: conversion, reload in ONNX Runtime, parity, atomic publish, refusal."""

import json
import os

import keras
import numpy as np
import pytest

pytest.importorskip("onnx", reason="ONNX export needs kiqa's onnx extra (onnx, tf2onnx, onnxruntime)")
pytest.importorskip("tf2onnx", reason="ONNX export needs kiqa's onnx extra (onnx, tf2onnx, onnxruntime)")
pytest.importorskip("onnxruntime", reason="ONNX export needs kiqa's onnx extra (onnx, tf2onnx, onnxruntime)")

from helpers import EXPORT_SIZE, make_tiny_run  # noqa: E402

from kiqa.serving import savedmodel  # noqa: E402
from kiqa.cli import export as cli_export  # noqa: E402
from kiqa.config import TrainConfig  # noqa: E402
from kiqa.errors import ExportError, VersionExistsError  # noqa: E402
from kiqa.image import load_image  # noqa: E402
from kiqa.model import build_model  # noqa: E402
from kiqa.serving import artifact  # noqa: E402
from kiqa.serving import onnx as kiqa_onnx  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx") / "run"
    # head_scale: scores differ by points between images, so a wrong layout shows.
    make_tiny_run(folder, head_scale=50.0)
    return folder


@pytest.fixture(scope="module")
def published(run_dir, tmp_path_factory, shared_data):
    real = shared_data / "realset" / "images"
    base = tmp_path_factory.mktemp("onnx-export") / "kiqa-onnx"
    path = kiqa_onnx.export_onnx(run_dir, base_path=base, parity_images=[real] if real.is_dir() else None)
    return base, path


def test_export_publishes_version_with_named_dynamic_batch_io(published):
    base, path = published
    assert path == base / "1"
    assert sorted(p.name for p in base.iterdir()) == ["1"]  # no temporary folder left
    session = kiqa_onnx.load_session(path / kiqa_onnx.MODEL_FILE)
    (image,), (mos,) = session.get_inputs(), session.get_outputs()
    assert image.name == "image" and image.type == "tensor(float)"
    assert list(image.shape[1:]) == [*EXPORT_SIZE, 3] and not isinstance(image.shape[0], int)
    assert mos.name == "mos" and len(mos.shape) == 1
    for batch in (1, 3):
        out = session.run(["mos"], {"image": np.zeros((batch, *EXPORT_SIZE, 3), np.float32)})[0]
        assert out.shape == (batch,)


def test_reloaded_model_agrees_with_keras_on_real_photos(published, run_dir, realset):
    _, path = published
    model = keras.models.load_model(run_dir / "model.keras")
    files = sorted((realset / "images").iterdir())
    pixels = np.stack([load_image(f, EXPORT_SIZE).numpy() for f in files])
    keras_mos = np.asarray(model(pixels, training=False)["mos"])
    onnx_mos = kiqa_onnx.run_session(kiqa_onnx.load_session(path / kiqa_onnx.MODEL_FILE), pixels)
    assert np.ptp(keras_mos) > 1.0  # the photos get different scores, so parity means something
    assert np.max(np.abs(onnx_mos - keras_mos)) < kiqa_onnx.PARITY_TOLERANCE


def test_metadata_records_contract_preprocessing_and_parity(published, realset):
    _, path = published
    info = json.loads((path / "kiqa.json").read_text())
    assert info["format"] == "onnx" and info["image_size"] == list(EXPORT_SIZE)
    assert info["input"] == {"name": "image", "dtype": "float32", "shape": [-1, *EXPORT_SIZE, 3]}
    assert info["output"]["name"] == "mos"
    assert info["preprocessing"]["reference_function"] == "kiqa.serving.preprocess.preprocess_image"
    parity = info["parity"]["onnxruntime_vs_keras"]
    n_real = len(list((realset / "images").iterdir()))
    assert parity["caller_images"] == n_real and parity["images"] > n_real
    assert 0 <= parity["max_abs_diff"] < parity["tolerance"] == kiqa_onnx.PARITY_TOLERANCE
    assert info["file_bytes"] == (path / "model.onnx").stat().st_size
    assert "tf2onnx" in info["converter"]["name"]


def test_existing_version_is_refused_without_overwrite(published, run_dir):
    base, path = published
    before = (path / "model.onnx").stat().st_mtime_ns
    with pytest.raises(VersionExistsError, match="already exists"):
        kiqa_onnx.export_onnx(run_dir, base_path=base, version=1)
    assert (path / "model.onnx").stat().st_mtime_ns == before


def test_disagreement_is_refused_and_nothing_published(run_dir, tmp_path, monkeypatch):
    real_run = kiqa_onnx.run_session
    # An injected disagreement of 0.2 MOS on every image, over the 0.05 tolerance.
    monkeypatch.setattr(kiqa_onnx, "run_session", lambda session, pixels: real_run(session, pixels) + 0.2)
    base = tmp_path / "kiqa-onnx"
    with pytest.raises(ExportError, match="parity check failed.*nothing was published"):
        kiqa_onnx.export_onnx(run_dir, base_path=base)
    assert list(base.iterdir()) == []


def test_interrupted_export_leaves_no_version_and_is_cleaned_up(run_dir, tmp_path, monkeypatch):
    base = tmp_path / "kiqa-onnx"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(kiqa_onnx, "convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        kiqa_onnx.export_onnx(run_dir, base_path=base)
    assert list(base.iterdir()) == []
    # A kill -9 leaves only a dot-folder of a dead process; the next export removes it.
    stale = base / f".tmp-1-{savedmodel.host_name()}-{_dead_pid()}"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    monkeypatch.undo()
    path = kiqa_onnx.export_onnx(run_dir, base_path=base)
    assert sorted(p.name for p in base.iterdir()) == [path.name] == ["1"]


def test_overwrite_replaces_the_version(run_dir, tmp_path):
    base = tmp_path / "kiqa-onnx"
    first = kiqa_onnx.export_onnx(run_dir, base_path=base)
    created = json.loads((first / "kiqa.json").read_text())["created"]
    (first / "marker").write_text("old")
    again = kiqa_onnx.export_onnx(run_dir, base_path=base, version=1, overwrite=True)
    assert again == first and not (again / "marker").exists()
    assert json.loads((again / "kiqa.json").read_text())["created"] >= created
    assert sorted(p.name for p in base.iterdir()) == ["1"]


def test_convnext_parts_convert_gelu_normalization_and_grouped_conv(tmp_path):
    """The pieces tf2onnx needed help with, on a tiny backbone: exact GELU (TF's Erfc),
    a Normalization with fixed statistics (captured tensors) and a grouped depthwise
    Conv2D (keras.applications' stock path, converted through the fast copy)."""
    keras.utils.set_random_seed(1)
    image = keras.Input((None, None, 3))
    x = keras.layers.Normalization(mean=[120.0, 110.0, 100.0], variance=[3000.0, 3100.0, 2900.0])(image)
    x = keras.layers.Conv2D(8, 3, strides=2)(x)
    x = keras.layers.Conv2D(8, 3, padding="same", groups=8)(x)  # depthwise as grouped Conv2D
    x = keras.layers.Activation("gelu")(x)
    config = TrainConfig.demo(weights="none", image_size=EXPORT_SIZE)
    model = build_model(config, backbone=keras.Model(image, x))
    head = model.get_layer("head_dense")
    head.kernel.assign(head.kernel * 100.0)
    path = kiqa_onnx.export_onnx(model, base_path=tmp_path / "m", config=config)
    info = json.loads((path / "kiqa.json").read_text())
    assert info["parity"]["onnxruntime_vs_keras"]["max_abs_diff"] < 1e-3
    session = kiqa_onnx.load_session(path / "model.onnx")
    assert [i.name for i in session.get_inputs()] == ["image"]  # no leftover captured inputs
    pixels = np.random.default_rng(0).uniform(0, 255, (4, *EXPORT_SIZE, 3)).astype(np.float32)
    keras_mos = np.asarray(model(pixels, training=False)["mos"])
    assert np.ptp(keras_mos) > 0.1
    np.testing.assert_allclose(kiqa_onnx.run_session(session, pixels), keras_mos, atol=1e-3)


def test_cli_format_onnx(run_dir, tmp_path, capsys):
    base = tmp_path / "cli-onnx"
    assert cli_export.main(["--format", "onnx", str(run_dir), "--base", str(base)]) == 0
    out = capsys.readouterr().out
    assert "(onnx)" in out and "parity onnxruntime_vs_keras" in out
    assert artifact.read_metadata(base / "1")["format"] == "onnx"


def _dead_pid():
    """A process id no process has: the highest free one below 4,000,000."""
    for pid in range(4_000_000, 3_000_000, -1):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue  # someone else's process
    raise AssertionError("every process id from 3,000,001 to 4,000,000 is taken")


@pytest.mark.large
def test_kill_9_during_conversion_leaves_no_version(run_dir, tmp_path):
    """A real kill -9 of an exporting process: only a dot-folder is left, and the next
    export removes it and publishes version 1."""
    import signal
    import subprocess
    import sys
    import time

    base = tmp_path / "kiqa-onnx"
    child = (
        "import sys, time\n"
        "from kiqa.serving import onnx as o\n"
        "def slow(model, path, size):\n"
        "    path.write_bytes(b'half-written')\n"
        "    time.sleep(120)\n"
        "o.convert = slow\n"
        f"o.export_onnx({str(run_dir)!r}, base_path={str(base)!r})\n"
    )
    process = subprocess.Popen([sys.executable, "-c", child])
    try:
        deadline = time.monotonic() + 120
        while not any(base.glob(".tmp-*/model.onnx")):
            assert time.monotonic() < deadline and process.poll() is None, "the export never started"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert savedmodel.list_versions(base) == [] and [p.name[:5] for p in base.iterdir()] == [".tmp-"]
    path = kiqa_onnx.export_onnx(run_dir, base_path=base)
    assert sorted(p.name for p in base.iterdir()) == [path.name] == ["1"]
