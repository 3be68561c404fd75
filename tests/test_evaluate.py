"""`kiqa evaluate` on any labelled CSV: scale mapping, seeded intervals, small-n cautions."""

import json

import pandas as pd
import pytest

from helpers import make_tiny_run
from kiqa import metrics
from kiqa.serving import warmup
from kiqa.cli import evaluate as evaluate_cli


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    make_tiny_run(run, head_scale=300.0)
    return run


@pytest.fixture(scope="module")
def rated(tmp_path_factory):
    """Twelve generated photos in a plain file,mos CSV rated 1-5."""
    folder = tmp_path_factory.mktemp("rated")
    names = []
    for name, contents in warmup.generated_images(12, seed=2):
        (folder / name).write_bytes(contents)
        names.append(name)
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
