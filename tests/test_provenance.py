"""Tests for kiqa.provenance: the record, its rule, and that it travels with the model.

Training writes it (tests/test_train.py, tests/test_cli.py check the run folder); here:
the rule, the file round trip, where it is looked for, the export's assets.extra and
`provenance` signature read back by the scorer and over gRPC, and every scoring command
warning for a demo model but not for one whose (crafted) record says ImageNet + KonIQ.
"""

import json

import pandas as pd
import pytest

from helpers import make_tiny_run
from kiqa import provenance
from kiqa.serving import export, savedmodel, warmup
from kiqa.cli import compare as compare_cli
from kiqa.cli import evaluate as evaluate_cli
from kiqa.cli import predict as predict_cli
from kiqa.cli import score as score_cli
from kiqa.config import TrainConfig
from kiqa.serving.devserver import DevServer
from kiqa.errors import ModelError
from kiqa.scoring.scorer import load_scorer
from kiqa.provenance import Provenance
from kiqa.serving.client import ServingClient

KONIQ_SHA256 = "d0bd1ad54a60bc36fe172049e46ac76c83554e50ab84acebfd47b82b3e698a0a"
NOT_MEANINGFUL = "these scores are not meaningful quality predictions"

DEMO = Provenance(data="demo", split="random", backbone="convnext-tiny", weights="none", n_images=512,
                  test_metrics={"plcc": 0.1, "srcc": 0.05, "n": 128})
TRUSTED = Provenance(data="koniq", split="official", backbone="convnext-tiny", weights="imagenet",
                     labels_file="koniq10k_distributions_sets.csv", labels_sha256=KONIQ_SHA256,
                     n_images=10073, test_metrics={"plcc": 0.92, "srcc": 0.91, "n": 2015})


def test_the_rule_names_each_reason():
    assert TRUSTED.knows_quality and TRUSTED.warning() is None
    assert not DEMO.knows_quality
    assert DEMO.warning().startswith(NOT_MEANINGFUL)
    assert "demo data" in DEMO.warning() and "random weights" in DEMO.warning()
    small = TRUSTED.__class__(**{**TRUSTED.__dict__, "backbone": "small-cnn", "weights": "none"})
    assert not small.knows_quality and "small CNN" in small.warning() and "demo" not in small.warning()
    scratch = TRUSTED.__class__(**{**TRUSTED.__dict__, "weights": "none"})
    assert not scratch.knows_quality and "random weights" in scratch.warning()
    custom = TRUSTED.__class__(**{**TRUSTED.__dict__, "backbone": "custom"})
    assert not custom.knows_quality
    assert provenance.warning_for(None) == provenance.UNKNOWN_WARNING
    assert "unknown provenance" in provenance.UNKNOWN_WARNING


def test_json_round_trip_recomputes_the_judgement(tmp_path):
    assert Provenance.from_json(DEMO.to_json()) == DEMO
    tampered = json.loads(DEMO.to_json())
    tampered["knows_quality"] = True  # a derived key is never trusted from the file
    assert Provenance.from_dict(tampered).knows_quality is False
    path = provenance.write(tmp_path, TRUSTED)
    assert provenance.read(path) == TRUSTED
    (tmp_path / "provenance.json").write_text("{not json")
    with pytest.raises(ModelError, match="provenance.json is not valid JSON"):
        provenance.read(tmp_path / "provenance.json")
    (tmp_path / "provenance.json").write_text(json.dumps({"data": "imaginary", "split": "x",
                                                          "backbone": "b", "weights": "none"}))
    with pytest.raises(ModelError, match="not a kiqa provenance record"):
        provenance.read(tmp_path / "provenance.json")


def test_found_beside_the_model_and_absent_means_none(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("model.keras", "checkpoints/best.keras"):
        (run / name).write_bytes(b"")
    assert provenance.find_for_model(run) is None and provenance.find_for_model(run / "model.keras") is None
    provenance.write(run, DEMO)
    for ref in (run, run / "model.keras", run / "checkpoints" / "best.keras"):
        assert provenance.find_for_model(ref) == DEMO
    version = tmp_path / "export" / "1"
    (version / "assets.extra").mkdir(parents=True)
    provenance.write(version / "assets.extra", TRUSTED)
    assert provenance.find_for_model(version) == TRUSTED
    assert provenance.sidecar_path(tmp_path / "scores.csv").name == "scores.csv.provenance.json"


def test_a_koniq_training_record_has_the_label_files_hash(koniq_csv, tmp_path):
    config = TrainConfig(labels=str(koniq_csv))
    record = provenance.for_training(config, {"plcc": 0.9, "srcc": 0.91, "n": 2015, "rmse": 7.0},
                                     n_images=10073, n_labelled=10073)
    assert (record.data, record.labels_sha256, record.backbone, record.weights) == (
        "koniq", KONIQ_SHA256, "convnext-tiny", "imagenet")
    assert record.knows_quality and record.test_metrics == {"plcc": 0.9, "srcc": 0.91, "rmse": 7.0, "n": 2015}
    assert record.tensorflow_version and record.keras_version and record.kiqa_version
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"weights")
    subset = provenance.for_training(config.replace(weights=str(weights)), None, n_images=90, n_labelled=100)
    assert (subset.data, subset.weights, subset.weights_file) == ("custom", "file", str(weights))
    assert subset.weights_sha256 == provenance.sha256_of(weights) and subset.knows_quality
    repeated = provenance.for_training(config, {"srcc": {"median": 0.8}, "plcc": {"median": 0.7},
                                                "n": {"median": 400.0}}, n_images=2000, n_labelled=2000)
    assert repeated.test_metrics == {"plcc": 0.7, "srcc": 0.8, "n": 400, "summary": "median over repeated splits"}


# ----------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two run folders with one tiny model each: a demo record, and a crafted ImageNet + KonIQ one."""
    root = tmp_path_factory.mktemp("prov")
    made = {}
    for name, record in (("demo", DEMO), ("trusted", TRUSTED)):
        make_tiny_run(root / name, head_scale=300.0)
        provenance.write(root / name, record)
        made[name] = root / name
    make_tiny_run(root / "bare", head_scale=300.0)  # no record: an older run
    made["bare"] = root / "bare"
    photos = root / "photos"
    photos.mkdir()
    for name, contents in warmup.generated_images(4, seed=1):
        (photos / name).write_bytes(contents)
    made["photos"] = photos
    return made


def test_scorer_reads_the_record(runs):
    assert load_scorer(runs["demo"]).provenance == DEMO
    assert load_scorer(runs["trusted"] / "model.keras").provenance == TRUSTED
    assert load_scorer(runs["bare"]).provenance is None


@pytest.mark.parametrize("name, expected", [("demo", NOT_MEANINGFUL), ("trusted", None),
                                            ("bare", "unknown provenance")])
def test_kiqa_score_warns_and_records_the_model(runs, name, expected, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    assert score_cli.main([str(runs["photos"]), "--model", str(runs[name]), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    sidecar = json.loads(provenance.sidecar_path(out).read_text())
    assert sidecar["source"].endswith("model.keras")
    if expected is None:
        assert "warning:" not in err and sidecar["knows_quality"] is True and sidecar["warning"] is None
        assert Provenance.from_dict(sidecar["provenance"]) == TRUSTED
    else:
        assert f"warning: {expected}" in err and sidecar["warning"].startswith(expected)
        assert sidecar["knows_quality"] is (None if name == "bare" else False)


def test_kiqa_compare_warns_and_records_the_model(runs, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        for photo in runs["photos"].iterdir():
            (folder / photo.name).write_bytes(photo.read_bytes())
    for name in ("demo", "trusted"):
        out = tmp_path / f"cmp-{name}"
        assert compare_cli.main([str(a), str(b), "--model", str(runs[name]), "--out", str(out),
                                 "--bootstrap", "200", "--quiet"]) == 0
        err = capsys.readouterr().err
        report = json.loads((out / "compare.json").read_text())["model"]
        assert report["kind"] == "keras" and report["image_size"] == [32, 48]
        assert (NOT_MEANINGFUL in err) is (name == "demo")
        assert report["knows_quality"] is (name == "trusted")
        assert provenance.sidecar_path(out / "scores-a.csv").is_file()


def test_kiqa_evaluate_warns_and_records_the_model(runs, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"file": sorted(p.name for p in runs["photos"].iterdir()),
                  "mos": [1.5, 2.5, 3.5, 4.5]}).to_csv(labels, index=False)
    for name in ("demo", "trusted"):
        out = tmp_path / f"ev-{name}"
        assert evaluate_cli.main([str(runs[name]), "--labels", str(labels), "--image-root", str(runs["photos"]),
                                  "--scale", "1-5", "--out", str(out), "--quiet"]) == 0
        err = capsys.readouterr().err
        model = json.loads((out / "metrics.json").read_text())["model"]
        assert (NOT_MEANINGFUL in err) is (name == "demo") and model["knows_quality"] is (name == "trusted")


# ----------------------------------------------------------------------------- export and gRPC


def _export(run_dir, base, version):
    export.export_model(run_dir, base_path=base, version=version)
    return base


@pytest.fixture(scope="module")
def trusted_export(runs, tmp_path_factory):
    """The trusted run exported (one export: each costs ~15 s on a quiet 2-core machine)."""
    return _export(runs["trusted"], tmp_path_factory.mktemp("prov-export") / "kiqa", 1)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pics")
    for name, contents in warmup.generated_images(2, seed=5):
        (folder / name).write_bytes(contents)
    return folder


def _predict(server, pictures, out, capsys, *flags):
    assert predict_cli.main([str(pictures), "--server", server.address, "--out", str(out), *flags]) == 0
    sidecar = json.loads(provenance.sidecar_path(out).read_text())
    return capsys.readouterr().err, sidecar


def test_export_carries_the_record_in_assets_extra(trusted_export):
    version = trusted_export / "1"
    assert provenance.read(version / "assets.extra" / "provenance.json") == TRUSTED
    assert load_scorer(trusted_export).provenance == TRUSTED
    signature = savedmodel.check_saved_model(version)["signatures"][export.PROVENANCE_SIGNATURE]
    assert signature == {"inputs": {"request": ["DT_STRING", [-1]]}, "outputs": {"provenance": ["DT_STRING", [-1]]}}


def test_the_client_reads_the_record_remotely_and_predict_stays_quiet(trusted_export, pictures, tmp_path, capsys):
    with DevServer(trusted_export, port=0) as server:
        with ServingClient(server.address, timeout=30) as client:
            assert client.provenance() == TRUSTED
        err, sidecar = _predict(server, pictures, tmp_path / "p.csv", capsys)
        assert predict_cli.main(["--server", server.address, "--status"]) == 0
        status = capsys.readouterr()
    assert "provenance: convnext-tiny from ImageNet weights, trained on KonIQ-10k" in status.out
    assert "warning:" not in status.err
    assert "warning:" not in err and sidecar["knows_quality"] is True
    assert Provenance.from_dict(sidecar["provenance"]) == TRUSTED


def test_an_export_without_a_record_is_reported_as_unknown(server, pictures, tmp_path, capsys):
    # The shared tiny export (tests/helpers.py) was made from a run without provenance.json.
    with ServingClient(server.address, timeout=30) as client:
        assert client.provenance() is None
    err, sidecar = _predict(server, pictures, tmp_path / "p.csv", capsys)
    assert "warning: unknown provenance" in err and sidecar["knows_quality"] is None


@pytest.mark.large
def test_predict_warns_for_a_demo_export(runs, pictures, tmp_path, capsys):
    base = _export(runs["demo"], tmp_path / "kiqa", 1)
    with DevServer(base, port=0) as server:
        with ServingClient(server.address, timeout=30) as client:
            assert client.provenance() == DEMO
        err, sidecar = _predict(server, pictures, tmp_path / "p.csv", capsys)
    assert f"warning: {NOT_MEANINGFUL}" in err and sidecar["knows_quality"] is False
