"""Training runs end to end: run directory, resume/refusal rules, repeats, and proof it learns."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import demo_subset, small_cnn
from kiqa.config import TrainConfig
from kiqa.errors import ConfigError, DataError
from kiqa.model import load_model
from kiqa.train import FROM_SCRATCH_CAVEAT, caveats, train

TINY = dict(weights="none", image_size=(32, 32), batch_size=8, epochs=2, patience=2, cache="none")


@pytest.fixture(scope="module")
def subset_csv(tmp_path_factory):
    return demo_subset(tmp_path_factory.mktemp("data"), per_source=4)


@pytest.fixture(scope="module")
def finished_run(subset_csv, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    config = TrainConfig.demo(labels=str(subset_csv), run_dir=str(run_dir), **TINY)
    return config, train(config, backbone=small_cnn((8, 16)), progress=False)


def is_png(path):
    with Image.open(path) as image:
        return image.format == "PNG" and image.size[0] > 100


def test_run_directory_holds_everything(finished_run):
    config, result = finished_run
    run = result.run_dir
    assert TrainConfig.load(run / "config.json") == config
    history = pd.read_csv(run / "history.csv")
    assert list(history.epoch) == [0, 1]
    assert {"loss", "val_loss", "val_plcc", "val_srcc"} <= set(history.columns)
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"plcc", "srcc", "krcc", "rmse", "mae", "plcc_logistic4", "n"} <= set(metrics)
    assert metrics == pytest.approx(result.metrics, nan_ok=True)
    predictions = pd.read_csv(run / "predictions.csv")
    split = pd.read_csv(run / "split.csv")
    test_names = split[split.part == "test"].image_name
    assert sorted(predictions.image_name) == sorted(test_names) and metrics["n"] == len(test_names)
    assert predictions.predicted_mos.between(0, 100).all() or predictions.predicted_mos.notna().all()
    assert set(split.part) == {"train", "val", "test"}
    for plot in ("loss.png", "scatter.png"):
        assert is_png(run / plot)
    assert (run / "checkpoints" / "best.keras").is_file()
    assert any((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert pd.read_csv(run / "rejects.csv").empty


def test_saved_model_reproduces_the_reported_predictions(finished_run):
    from kiqa.evaluate import predict_paths

    config, result = finished_run
    model = load_model(result.model_path)
    predictions = pd.read_csv(result.run_dir / "predictions.csv")
    subset = pd.read_csv(config.labels)
    root = config.resolved_run_dir.parent
    paths = [str(__import__("pathlib").Path(config.labels).parent / "images" / n) for n in predictions.image_name]
    again = predict_paths(model, paths, config)
    np.testing.assert_allclose(again, predictions.predicted_mos, atol=1e-3)
    assert len(subset) > len(predictions) and root.exists()


def test_a_finished_run_is_not_overwritten_and_a_changed_config_is_refused(finished_run, tmp_path):
    config, result = finished_run
    with pytest.raises(ConfigError, match="finished run"):
        train(config, backbone=small_cnn((8, 16)), progress=False)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    config.replace(run_dir=str(unfinished)).save(unfinished / "config.json")
    with pytest.raises(ConfigError, match=r"changed: \['learning_rate'\]"):
        train(config.replace(run_dir=str(unfinished), learning_rate=0.5), progress=False)


def test_bad_images_are_listed_and_dropped_or_stop_the_run(subset_csv, tmp_path):
    frame = pd.read_csv(subset_csv)
    images = subset_csv.parent / "images"
    broken = tmp_path / "images"
    broken.mkdir()
    for name in frame.image_name:
        (broken / name).write_bytes((images / name).read_bytes())
    victim = frame.image_name.iloc[3]
    (broken / victim).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    missing = frame.image_name.iloc[5]
    (broken / missing).unlink()
    base = TrainConfig.demo(labels=str(subset_csv), images=str(broken), **TINY)

    with pytest.raises(DataError) as err:
        train(base.replace(run_dir=str(tmp_path / "stop"), on_bad_images="stop"), backbone=small_cnn((8,)), progress=False)
    assert victim in str(err.value) and missing in str(err.value)

    with pytest.raises(DataError, match="max_bad_fraction"):
        train(base.replace(run_dir=str(tmp_path / "frac"), max_bad_fraction=0.01), backbone=small_cnn((8,)), progress=False)

    result = train(base.replace(run_dir=str(tmp_path / "drop"), max_bad_fraction=0.1, epochs=1),
                   backbone=small_cnn((8,)), progress=False)
    rejects = pd.read_csv(result.run_dir / "rejects.csv")
    assert sorted(rejects.image_name) == sorted([victim, missing])
    split = pd.read_csv(result.run_dir / "split.csv")
    assert victim not in set(split.image_name) and len(split) == len(frame) - 2


def test_repeated_splits_report_median_and_spread(subset_csv, tmp_path):
    config = TrainConfig.demo(labels=str(subset_csv), run_dir=str(tmp_path / "rep"), split="repeated",
                              repeats=2, **dict(TINY, epochs=1))
    result = train(config, backbone=small_cnn((8,)), progress=False)
    table = pd.read_csv(result.run_dir / "repeats.csv")
    assert list(table.split) == ["repeat0-seed0", "repeat1-seed1"]
    summary = json.loads((result.run_dir / "metrics.json").read_text())["summary"]
    assert summary["srcc"]["median"] == pytest.approx(np.median(table.srcc), abs=1e-4)
    assert summary["srcc"]["min"] <= summary["srcc"]["max"]
    assert is_png(result.run_dir / "repeats.png")
    assert (result.run_dir / "repeat1-seed1" / "model.keras").is_file()


def test_from_scratch_runs_say_so():
    assert FROM_SCRATCH_CAVEAT in caveats(TrainConfig.demo(weights="none"))
    assert FROM_SCRATCH_CAVEAT not in caveats(TrainConfig(labels="k.csv"))
