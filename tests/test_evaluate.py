"""`kiqa evaluate` on any labelled CSV: scale mapping, seeded intervals, small-n cautions."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import make_tiny_run, shared_export, write_generated_images
from kiqa import metrics
from kiqa.serving import export
from kiqa.cli import evaluate as evaluate_cli
from kiqa.config import TrainConfig
from kiqa.errors import EvaluationExistsError
from kiqa.data.labelled import read_labelled_csv
from kiqa.evaluate import evaluate_saved_model
from kiqa.run import resolve_model
from kiqa.scoring.scorer import load_scorer


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    make_tiny_run(run, head_scale=300.0)
    return run


@pytest.fixture(scope="module")
def rated(tmp_path_factory):
    """Twelve generated photos in a plain file,mos CSV rated 1-5."""
    folder = tmp_path_factory.mktemp("rated")
    names = write_generated_images(folder, 12, seed=2)
    labels = folder / "labels.csv"
    pd.DataFrame({"file": names, "mos": [1 + (i % 5) for i in range(12)]}).to_csv(labels, index=False)
    return labels


def test_a_plain_csv_on_1_to_5_is_mapped_seeded_and_cautioned(tiny_run, rated, tmp_path, capsys):
    out = tmp_path / "a"
    assert evaluate_cli.main([str(tiny_run), "--labels", str(rated), "--scale", "1-5",
                              "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    assert report["n"] == 12 and report["labels"]["part"] == "all"
    assert "'mos' on 1-5, mapped linearly to 0-100" in report["labels"]["scores"]
    predictions = pd.read_csv(out / "predictions.csv")
    assert predictions["mos"].min() == 0.0 and predictions["mos"].max() == 100.0
    # Seeded with the run's seed (0): recomputing from the written predictions gives the same interval.
    again = metrics.evaluate_with_confidence(predictions["mos"], predictions["predicted_mos"], seed=0)
    assert report["srcc_ci_low"] == pytest.approx(again["srcc_ci_low"], abs=1e-3)
    assert report["plcc_ci_high"] == pytest.approx(again["plcc_ci_high"], abs=1e-3)
    assert report["srcc_ci_low"] <= report["srcc"] <= report["srcc_ci_high"]
    assert "bootstrap over images" in report["ci"] and "seed 0" in report["ci"]
    assert any("only 12 images" in c for c in report["cautions"])
    assert "95% CI [" in printed and "caution: only 12 images" in printed and "(unreliable, see below)" in printed


def test_a_split_part_of_a_plain_csv_is_refused(tiny_run, rated, capsys):
    assert evaluate_cli.main([str(tiny_run), "--labels", str(rated), "--part", "test", "--quiet"]) == 1
    assert "has no split" in capsys.readouterr().err


def test_the_20_real_photos_evaluate(realset, tiny_run, tmp_path, capsys):
    out = tmp_path / "real"
    # labels.csv mixes datasets' scales in `mos`; `mos_01` is every label on 0-1.
    assert evaluate_cli.main([str(tiny_run), "--labels", str(realset / "labels.csv"), "--mos-column", "mos_01",
                              "--scale", "0-1", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["n"] == 20 and report["rejected"] == 0 and report["failed"] == 0
    assert any("only 20 images" in c for c in report["cautions"])
    assert report["model"]["warning"].startswith("unknown provenance")
    assert "warning: unknown provenance" in capsys.readouterr().err


def test_a_best_checkpoint_finds_its_runs_config(tiny_run, rated, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run / "config.json", run / "config.json")
    shutil.copy(tiny_run / "model.keras", run / "checkpoints" / "best.keras")
    # No --image-size: the size comes from the run's config.json above checkpoints/.
    assert evaluate_cli.main([str(run / "checkpoints" / "best.keras"), "--labels", str(rated), "--quiet"]) == 0
    # Written into the run folder, as for the run folder itself.
    (written,) = run.glob("eval-labels-all-*/metrics.json")
    assert json.loads(written.read_text())["n"] == 12


def test_a_missing_model_path_is_said_to_not_exist(tmp_path, capsys):
    assert evaluate_cli.main([str(tmp_path / "nope"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"model {tmp_path / 'nope'} does not exist" in err and "config.json" not in err


def test_evaluate_resolves_every_model_path_kiqa_score_resolves(rated, tmp_path_factory, tmp_path):
    tiny_run, base = shared_export(tmp_path_factory, head_scale=300.0)  # tiny_run's model, exported
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run / "config.json", run / "config.json")
    shutil.copy(tiny_run / "model.keras", run / "checkpoints" / "best.keras")
    refs = {tiny_run: "keras", tiny_run / "model.keras": "keras", run / "checkpoints" / "best.keras": "keras",
            base: "savedmodel", base / "1": "savedmodel"}
    for ref, kind in refs.items():
        load_scorer(ref)  # what `kiqa score --model` takes
        resolved = resolve_model(ref)  # what `kiqa evaluate` resolves it through
        assert resolved.kind == kind, ref
        assert (resolved.config() is not None) == (kind == "keras"), ref  # a run's config, found
    assert resolve_model(base).model == resolve_model(base / "1").model
    # Evaluated end to end: one Keras path (checkpoints/best.keras has its own test above)
    # and the export base; the other paths resolve to the same files.
    predicted = []
    for i, ref in enumerate([tiny_run / "model.keras", base]):
        out = tmp_path / f"eval-{i}"
        assert evaluate_cli.main([str(ref), "--labels", str(rated), "--out", str(out), "--quiet"]) == 0, ref
        predicted.append(pd.read_csv(out / "predictions.csv")["predicted_mos"])
    # The export scores the same pixels within its parity tolerance.
    np.testing.assert_allclose(predicted[1], predicted[0], atol=export.PARITY_TOLERANCE)


@pytest.mark.large  # converts the model to ONNX (tf2onnx): tens of seconds on a shared 2-core machine
def test_evaluate_runs_an_onnx_export_like_kiqa_score(tiny_run, rated, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    from kiqa.serving import onnx as kiqa_onnx

    base = tmp_path / "kiqa-onnx"
    model_file = kiqa_onnx.export_onnx(tiny_run, base_path=base)
    for i, ref in enumerate([base, model_file]):
        load_scorer(ref, engine="onnxruntime")
        out = tmp_path / f"onnx-{i}"
        assert evaluate_cli.main([str(ref), "--labels", str(rated), "--engine", "onnxruntime",
                                  "--out", str(out), "--quiet"]) == 0, ref
        assert json.loads((out / "metrics.json").read_text())["n"] == 12


def test_an_earlier_evaluation_is_never_replaced_silently(tiny_run, rated, tmp_path, capsys):
    # Issue 20.2: two label files both called labels.csv, or another --scale, got the same folder.
    other = tmp_path / "other" / "labels.csv"
    other.parent.mkdir()
    shutil.copytree(rated.parent, other.parent, dirs_exist_ok=True)
    frame = pd.read_csv(rated)
    frame.assign(mos=6 - frame["mos"]).to_csv(other, index=False)
    folders = set()
    for labels, scale in [(rated, "1-5"), (other, "1-5"), (rated, "0-10")]:
        assert evaluate_cli.main([str(tiny_run), "--labels", str(labels), "--scale", scale, "--quiet"]) == 0
        folders.add(capsys.readouterr().out.split("written to ")[1].split(" (")[0])
    assert len(folders) == 3 and all(f.startswith(str(tiny_run / "eval-labels-all-")) for f in folders)
    report = json.loads((Path(sorted(folders)[0]) / "metrics.json").read_text())
    assert len(report["labels"]["sha256"]) == 64 and report["labels"]["columns"] == ["file", "mos"]
    assert report["labels"]["scale"] in ([1.0, 5.0], [0.0, 10.0]) and len(report["model"]["weights_sha256"]) == 64

    # An explicit --out holding another evaluation is refused, named, and kept; --overwrite replaces it.
    out = tmp_path / "eval"
    assert evaluate_cli.main([str(tiny_run), "--labels", str(rated), "--scale", "1-5", "--out", str(out), "--quiet"]) == 0
    before = (out / "metrics.json").read_bytes()
    capsys.readouterr()
    assert evaluate_cli.main([str(tiny_run), "--labels", str(other), "--scale", "1-5", "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "holds an evaluation of" in err and "--overwrite" in err and (out / "metrics.json").read_bytes() == before
    with pytest.raises(EvaluationExistsError):  # the Python API refuses too
        config = TrainConfig.load(tiny_run / "config.json").replace(labels=str(other), cache="none")
        evaluate_saved_model(tiny_run, config, part="all", out_dir=out, progress=False,
                             labelled=read_labelled_csv(other, scale="1-5"))
    assert evaluate_cli.main([str(tiny_run), "--labels", str(other), "--scale", "1-5", "--out", str(out),
                              "--quiet", "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["labels"]["file"] == str(other)


def test_training_images_are_counted_and_held_out_ones_reported_alone(tmp_path, capsys):
    # Issue 20.3: evaluating a run on its own training images must say so.
    folder = tmp_path / "rated"
    names = write_generated_images(folder, 12, seed=3)
    labels = folder / "labels.csv"
    pd.DataFrame({"file": names, "mos": [10.0 + 7 * i for i in range(12)]}).to_csv(labels, index=False)
    run = tmp_path / "run"
    make_tiny_run(run, head_scale=300.0)
    config = TrainConfig.load(run / "config.json").replace(labels=str(labels), images=str(folder))
    config.save(run / "config.json")
    parts = ["train"] * 6 + ["val"] * 2 + ["test"] * 4
    pd.DataFrame({"image_name": names, "mos": 0.0, "part": parts}).to_csv(run / "split.csv", index=False)
    assert evaluate_cli.main([str(run), "--labels", str(labels), "--out", str(tmp_path / "e"), "--quiet"]) == 0
    captured = capsys.readouterr()
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert report["overlap"] == {"train": 6, "val": 2, "held_out": 4}
    assert report["held_out"]["n"] == 4 and "6 of these images trained the model" in report["cautions"][0]
    assert "6 of these images trained the model" in captured.err and "held out only (4 images)" in captured.out
