"""The commands users type, run in-process through their `main(argv)`."""

import contextlib
import io
import json

import pandas as pd
import pytest

from helpers import demo_subset
from kiqa import cli, provenance
from kiqa.cli import evaluate as evaluate_cli
from kiqa.cli import train as train_cli


@pytest.fixture(scope="module")
def convnext_run(tmp_path_factory):
    """`kiqa-train` as the README runs it, on a small demo subset: the real ConvNeXt path."""
    folder = tmp_path_factory.mktemp("cli")
    labels = demo_subset(folder, per_source=3)
    run_dir = folder / "run"
    argv = ["--labels", str(labels), "--weights", "none", "--image-size", "32", "32", "--epochs", "1",
            "--batch-size", "8", "--split", "random", "--run-dir", str(run_dir), "--quiet"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # capsys is per test; this fixture is per module
        code = train_cli.main(argv)
    (folder / "train-stderr.txt").write_text(err.getvalue())
    return labels, run_dir, argv, code


def test_umbrella_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert command in out
    assert cli.main(["no-such-command"]) == 2


def test_train_help_carries_domain_facts(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "0-100" in out and "MOS_zscore" in out and "--weights" in out


def test_kiqa_train_runs_convnext_end_to_end(convnext_run, capsys):
    labels, run_dir, _, code = convnext_run
    assert code == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["variant"] == "tiny" and config["weights"] == "none" and config["image_size"] == [32, 32]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n"] == len(pd.read_csv(run_dir / "predictions.csv"))
    assert (run_dir / "model.keras").stat().st_size > 50e6  # the real 28M-parameter ConvNeXt-Tiny
    record = provenance.read(run_dir / "provenance.json")
    assert (record.backbone, record.weights, record.data) == ("convnext-tiny", "none", "demo")


def test_kiqa_train_ends_with_the_plain_warning(convnext_run):
    _, run_dir, _, _ = convnext_run
    err = (run_dir.parent / "train-stderr.txt").read_text()
    warning = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warning == ["warning: " + provenance.read(run_dir / "provenance.json").warning()]
    assert "demo data" in warning[0] and "random weights" in warning[0]


def test_rerunning_a_finished_run_is_refused_with_the_fix(convnext_run, capsys):
    _, _, argv, _ = convnext_run
    assert train_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "finished run" in err and "--overwrite" in err


def test_bad_flags_name_the_field(tmp_path, capsys):
    assert train_cli.main(["--labels", str(tmp_path / "x.csv"), "--test-fraction", "2"]) == 1
    assert "test_fraction" in capsys.readouterr().err
    assert train_cli.main(["--labels", str(tmp_path / "missing.csv"), "--run-dir", str(tmp_path / "r")]) == 1
    assert "label file not found" in capsys.readouterr().err


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"epochs": 7, "learning_rate": 0.01, "labels": "k.csv"}))
    args = train_cli.build_parser().parse_args(["--config", str(path), "--epochs", "3"])
    config = train_cli.resolve_config(args)
    assert (config.epochs, config.learning_rate, config.labels) == (3, 0.01, "k.csv")
    assert config.image_size == (384, 512)  # the KonIQ defaults, not the demo's
    demo = train_cli.resolve_config(train_cli.build_parser().parse_args([]))
    assert demo.labels is None and demo.name == "demo"


def test_kiqa_evaluate_reproduces_the_run_metrics(convnext_run, tmp_path, capsys):
    _, run_dir, _, _ = convnext_run
    out = tmp_path / "eval"
    assert evaluate_cli.main([str(run_dir), "--out", str(out), "--quiet"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    first = json.loads((run_dir / "metrics.json").read_text())
    assert again["n"] == first["n"]
    assert again["srcc"] == pytest.approx(first["srcc"], abs=1e-6, nan_ok=True)
    captured = capsys.readouterr()
    assert (out / "scatter.png").is_file() and "PLCC" in captured.out
    assert "these scores are not meaningful quality predictions" in captured.err
    assert again["model"]["provenance"]["backbone"] == "convnext-tiny" and again["model"]["knows_quality"] is False
