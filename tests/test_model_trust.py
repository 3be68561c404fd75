"""Model files trusted only as far as the model itself bears them out (issue 24, point 3).

An export's kiqa.json sits beside the model and can say anything: an image size of
20000x20000 beside a 32x48 signature got `kiqa score` killed by memory, and its
max_pixels raised the decode cap. A `.keras` file is a zip whose weights can inflate to
gigabytes from a small file. Each is refused with a typed error naming the file (and the
field), before anything large is allocated.
"""

import json
import shutil
import zipfile

import numpy as np
import pytest

from helpers import EXPORT_SIZE, make_tiny_run, shared_export
from hostile_corpus import huge_png
from kiqa.cli import score as score_cli
from kiqa.cli._common import EXIT_OK
from kiqa.contract import DEFAULT_MAX_PIXELS
from kiqa.errors import ModelMetadataError, ModelTooLargeError, UntrustedModelError
from kiqa.model import MAX_KERAS_COMPRESSION_RATIO, check_keras_archive
from kiqa.scoring.scorer import MAX_MODEL_IMAGE_SIDE, load_scorer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return shared_export(tmp_path_factory)


def _export_with(exported, tmp_path, **fields):
    """A copy of the shared SavedModel version whose kiqa.json has `fields` changed."""
    version = tmp_path / "kiqa" / "1"
    shutil.copytree(exported[1] / "1", version)
    info = version / "assets.extra" / "kiqa.json"
    info.write_text(json.dumps(json.loads(info.read_text()) | fields))
    return version, info


def _photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "flat.png").write_bytes(huge_png(100, 100))
    return folder


# ----------------------------------------------------------------------------- SavedModel kiqa.json


@pytest.mark.parametrize("size", [[20000, 20000], [0, 48], [MAX_MODEL_IMAGE_SIDE + 1, 48]])
def test_export_metadata_with_an_impossible_image_size_is_refused_by_file_and_field(exported, tmp_path, size):
    version, info = _export_with(exported, tmp_path, image_size=size)
    with pytest.raises(ModelMetadataError, match="image_size") as caught:
        load_scorer(version)
    assert caught.value.field == "image_size" and caught.value.path == str(info)
    assert str(info) in str(caught.value)


def test_export_metadata_disagreeing_with_the_signature_is_refused(exported, tmp_path):
    claimed = [EXPORT_SIZE[0] * 2, EXPORT_SIZE[1] * 2]  # within kiqa's limits, but not the model's
    version, info = _export_with(exported, tmp_path, image_size=claimed)
    with pytest.raises(ModelMetadataError) as caught:
        load_scorer(version)
    assert caught.value.field == "image_size"
    assert f"takes {EXPORT_SIZE[0]}x{EXPORT_SIZE[1]} images" in str(caught.value)


def test_kiqa_score_names_the_metadata_file_instead_of_dying(exported, tmp_path, capsys):
    version, info = _export_with(exported, tmp_path, image_size=[20000, 20000])
    code = score_cli.main([str(_photos(tmp_path)), "--model", str(version), "--out", str(tmp_path / "s.csv"),
                           "--quiet"])
    assert code != EXIT_OK
    err = capsys.readouterr().err
    assert str(info) in err and "image_size" in err and "Traceback" not in err


def test_export_metadata_cannot_raise_the_pixel_cap(exported, tmp_path):
    version, _ = _export_with(exported, tmp_path, max_pixels=10**12)
    with pytest.warns(UserWarning, match="cannot raise the cap"):
        scorer = load_scorer(version)
    assert scorer.max_pixels == DEFAULT_MAX_PIXELS
    big = tmp_path / "144mp.png"
    big.write_bytes(huge_png(12000, 12000))  # a real 144 MP PNG (1 MB): refused by its header
    row = scorer.score_many([big]).iloc[0]
    assert np.isnan(row["mos"]) and f"over the cap of {DEFAULT_MAX_PIXELS}" in row["error"]
    # Only the caller may raise it.
    with pytest.warns(UserWarning):
        assert load_scorer(version, max_pixels=200_000_000).max_pixels == 200_000_000


@pytest.mark.parametrize("value", [0, -5])
def test_export_metadata_with_a_nonpositive_pixel_cap_is_refused(exported, tmp_path, value):
    version, _ = _export_with(exported, tmp_path, max_pixels=value)
    with pytest.raises(ModelMetadataError) as caught:
        load_scorer(version)
    assert caught.value.field == "max_pixels"


def test_metadata_errors_are_untrusted_model_errors():
    assert issubclass(ModelMetadataError, UntrustedModelError)
    assert issubclass(ModelTooLargeError, UntrustedModelError)


# ----------------------------------------------------------------------------- ONNX kiqa.json


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")
    from kiqa.serving import onnx as kiqa_onnx

    folder = tmp_path_factory.mktemp("trust-onnx")
    make_tiny_run(folder / "run")
    return kiqa_onnx.export_onnx(folder / "run", base_path=folder / "kiqa-onnx")


@pytest.mark.parametrize("size", [[EXPORT_SIZE[0] * 2, EXPORT_SIZE[1] * 2], [20000, 20000]])
def test_onnx_metadata_is_checked_against_the_onnx_input(onnx_export, tmp_path, size):
    version = tmp_path / "kiqa-onnx" / "1"
    shutil.copytree(onnx_export, version)
    info = version / "kiqa.json"
    info.write_text(json.dumps(json.loads(info.read_text()) | {"image_size": size}))
    with pytest.raises(ModelMetadataError) as caught:
        load_scorer(version, engine="onnxruntime")
    assert caught.value.field == "image_size" and str(info) in str(caught.value)
    # The unaltered export loads at its own size.
    assert load_scorer(onnx_export, engine="onnxruntime").image_size == EXPORT_SIZE


# ----------------------------------------------------------------------------- .keras inflation


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trust-keras") / "run"
    make_tiny_run(folder)
    return folder


def _with_entry(model_file, target, name, size):
    """A copy of a .keras archive with one more entry of `size` zero bytes (deflated)."""
    shutil.copy(model_file, target)
    with zipfile.ZipFile(target, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open(name, "w", force_zip64=True) as entry:
            block = bytes(16 * 1024**2)
            for _ in range(size // len(block)):
                entry.write(block)
    return target


def test_a_keras_zip_bomb_is_refused_before_loading(tiny_run, tmp_path, capsys):
    # 128 MB of zeros deflate to ~130 KB: ~1000x, where weights barely compress.
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _with_entry(tiny_run / "model.keras", run / "model.keras", "model.weights.h5.pad", 128 * 1024**2)
    assert (run / "model.keras").stat().st_size < 2 * 1024**2
    with pytest.raises(ModelTooLargeError, match=f"over {MAX_KERAS_COMPRESSION_RATIO}x") as caught:
        load_scorer(run)
    assert caught.value.path == str(run / "model.keras")
    code = score_cli.main([str(_photos(tmp_path)), "--model", str(run), "--out", str(tmp_path / "s.csv"), "--quiet"])
    assert code != EXIT_OK and "zip bomb" in capsys.readouterr().err


def test_keras_archive_total_inflated_size_is_bounded(tiny_run):
    model_file = tiny_run / "model.keras"
    check_keras_archive(model_file)  # a real kiqa model passes
    with zipfile.ZipFile(model_file) as archive:
        total = sum(entry.file_size for entry in archive.infolist())
    with pytest.raises(ModelTooLargeError, match=f"would inflate to {total} bytes") as caught:
        check_keras_archive(model_file, max_inflated=total - 1)
    assert caught.value.inflated == total and caught.value.limit == total - 1
    assert load_scorer(tiny_run).image_size  # and it still loads with the default bound
