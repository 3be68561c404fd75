"""`kiqa-train` on any labelled CSV (issue #20, point 7) and the run folder's one copy of
the weights (point 8)."""

import json
import os
import re

import numpy as np
import pandas as pd
import pytest

from helpers import write_generated_images
from kiqa import provenance
from kiqa.cli import train as train_cli
from kiqa.config import TrainConfig
from kiqa.data import koniq
from kiqa.errors import ConfigError

SMALL = ["--backbone", "small-cnn", "--image-size", "32", "32", "--epochs", "1", "--batch-size", "8", "--quiet"]


def rated_folder(folder, count):
    """`count` generated photos and a `photo,rating` CSV on 1-5 (no `set` column)."""
    names = write_generated_images(folder, count, seed=4)
    labels = folder / "ratings.csv"
    pd.DataFrame({"photo": names, "rating": [1 + (i % 9) / 2 for i in range(count)]}).to_csv(labels, index=False)
    return labels


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    labels = rated_folder(tmp_path_factory.mktemp("rated"), 24)
    run = tmp_path_factory.mktemp("runs") / "custom"
    code = train_cli.main(["--labels", str(labels), "--path-column", "photo", "--mos-column", "rating",
                           "--scale", "1-5", "--val-fraction", "0.2", "--seed", "3", "--run-dir", str(run), *SMALL])
    assert code == 0
    return labels, run


def test_a_plain_labelled_csv_trains_with_a_seeded_random_split(custom_run):
    labels, run = custom_run
    config = TrainConfig.load(run / "config.json")
    assert (config.path_column, config.mos_column, config.scale, config.split) == ("photo", "rating", "1-5", "random")
    split = pd.read_csv(run / "split.csv")
    frame = pd.read_csv(labels).rename(columns={"photo": "image_name"})
    expected = koniq.random_split(frame, config.test_fraction, config.val_fraction, seed=3)
    for part in ("train", "val", "test"):
        assert sorted(split[split.part == part].image_name) == sorted(getattr(expected, part).image_name), part
    # 1-5 mapped to 0-100 as kiqa evaluate maps it.
    mapped = split.set_index("image_name").mos
    rating = frame.set_index("image_name").rating
    assert np.allclose(mapped, (rating[mapped.index] - 1) / 4 * 100)
    record = provenance.read(run / "provenance.json")
    assert record.data == "custom" and record.labels_sha256 == provenance.sha256_of(labels)
    assert json.loads((run / "metrics.json").read_text())["n"] == (split.part == "test").sum()


@pytest.mark.parametrize("count", [5, 20])
def test_a_plain_csv_too_small_for_the_split_names_the_minimum(tmp_path, capsys, count):
    labels = rated_folder(tmp_path / "rated", count)
    code = train_cli.main(["--labels", str(labels), "--path-column", "photo", "--mos-column", "rating",
                           "--scale", "1-5", "--run-dir", str(tmp_path / "run"), *SMALL])
    err = capsys.readouterr().err
    assert code == 1 and re.search(rf"the set needs at least \d+ images \(it has {count}\)", err), err
    assert "validation part has" in err and "add images, or raise --val-fraction" in err


def test_plain_csv_fields_are_validated_together():
    with pytest.raises(ConfigError, match="mos_column"):
        TrainConfig(labels="x.csv", path_column="file")
    with pytest.raises(ConfigError, match="set labels"):
        TrainConfig(path_column="file", mos_column="mos", scale="1-5")
    with pytest.raises(ConfigError, match="scale"):
        TrainConfig(labels="x.csv", path_column="file", mos_column="mos", scale="5-1")


def test_a_finished_run_holds_its_weights_once_and_both_paths_evaluate(custom_run, tmp_path, capsys):
    _, run = custom_run
    model, best = run / "model.keras", run / "checkpoints" / "best.keras"
    assert os.path.samefile(model, best) and model.stat().st_nlink == 2
    # The best checkpoint of a run trained on a plain CSV evaluates its own held-out part.
    from kiqa.cli import evaluate as evaluate_cli

    out = tmp_path / "eval"
    assert evaluate_cli.main([str(best), "--part", "test", "--out", str(out), "--quiet"]) == 0
    split = pd.read_csv(run / "split.csv")
    assert json.loads((out / "metrics.json").read_text())["n"] == (split.part == "test").sum()


def test_where_hard_links_fail_both_files_stay(tmp_path, monkeypatch):
    from kiqa.fsutil import link_atomically

    source, target = tmp_path / "model.keras", tmp_path / "best.keras"
    source.write_bytes(b"weights")
    target.write_bytes(b"older copy")

    def refuse(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    assert link_atomically(source, target) is False
    assert target.read_bytes() == b"older copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.keras", "model.keras"]
