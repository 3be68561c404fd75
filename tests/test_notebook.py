"""Tests for kiqa.notebook, the notebooks' summaries and figures (no ConvNeXt, no training)."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kiqa import notebook as nb
from kiqa.data import synthetic
from kiqa.config import TrainConfig
from kiqa.data import koniq
from kiqa.errors import ConfigError, DataError, ModelError, RunExistsError


def split_file(path, n_train=14, n_val=2, n_test=4, seed=0):
    """A small label file in the layout of koniq10k_distributions_sets.csv."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    frame = pd.DataFrame({
        "image_name": [f"{i:05d}.jpg" for i in range(n)],
        "c_total": rng.integers(90, 150, n),
        "MOS": rng.uniform(5, 95, n).round(4),
        "SD": rng.uniform(0.3, 0.8, n).round(4),
        "set": ["training"] * n_train + ["validation"] * n_val + ["test"] * n_test,
    })
    frame.to_csv(path, index=False)
    return path


def download_file(path, n=12, seed=0):
    """A small label file in the layout of koniq10k_scores_and_distributions.csv."""
    rng = np.random.default_rng(seed)
    mos = rng.uniform(5, 95, n).round(4)
    pd.DataFrame({
        "image_name": [f"{i:05d}.jpg" for i in range(n)],
        "MOS": (1 + 4 * mos / 100).round(4),
        "SD": rng.uniform(0.3, 0.8, n).round(4),
        "MOS_zscore": mos,
    }).to_csv(path, index=False)
    return path


def write_jpegs(folder, names, size=(24, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name in names:
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name, quality=90)
    return folder


def predictions_table():
    return pd.DataFrame({
        "image_name": ["a", "b", "c", "d", "e", "f"],
        "mos": [10.0, 15.0, 45.0, 50.0, 90.0, 70.0],
        "predicted_mos": [20.0, 35.0, 44.0, np.nan, 60.0, 71.0],
    })


def png_size(path):
    with Image.open(path) as image:
        image.load()
        return image.size


# ----------------------------------------------------------------------------- labels


def test_quality_bands_cover_0_to_100_with_inclusive_upper_edges():
    bands = nb.quality_bands([0.0, 20.0, 20.5, 59.9, 60.0, 100.0])
    assert list(bands) == [
        "bad (0-20)", "bad (0-20)", "poor (20-40)", "fair (40-60)", "fair (40-60)", "excellent (80-100)",
    ]
    assert list(bands.categories) == nb.band_labels()
    with pytest.raises(ValueError, match="names"):
        nb.quality_bands([50.0], names=("low", "high"))


def test_label_summary_describes_mos_sd_and_votes(tmp_path):
    frame = koniq.read_labels(split_file(tmp_path / "labels.csv"))
    summary = nb.label_summary(frame)
    assert list(summary.index) == ["mos", "sd", "votes"]
    assert summary.loc["mos", "count"] == len(frame)
    assert summary.loc["mos", "mean"] == pytest.approx(frame["mos"].mean())
    assert summary.loc["votes", "max"] == frame["votes"].max()


def test_split_table_compares_parts_of_several_splits(tmp_path):
    frame = koniq.read_labels(split_file(tmp_path / "labels.csv"))
    splits = [koniq.official_split(frame), koniq.random_split(frame, 0.25, 0.2, seed=3)]
    table = nb.split_table(splits)
    assert list(table["split"].unique()) == ["official", "random-seed3"]
    official = table[table["split"] == "official"].set_index("part")
    assert official["n"].to_dict() == {"train": 14, "val": 2, "test": 4}
    for _, rows in table.groupby("split"):
        assert rows["n"].sum() == len(frame)
        assert rows["share"].sum() == pytest.approx(1.0)
    assert (table.loc[table["part"] == "train", "ks_to_train"] == 0).all()
    test_mos = splits[0].test["mos"]
    assert official.loc["test", "mos_mean"] == pytest.approx(test_mos.mean())
    assert official.loc["test", "mos_max"] == pytest.approx(test_mos.max())
    band_columns = nb.band_labels()
    assert np.allclose(table[band_columns].sum(axis=1), 1.0)


def test_sample_by_band_takes_at_most_n_per_band_in_band_order(tmp_path):
    frame = koniq.read_labels(split_file(tmp_path / "labels.csv", n_train=40, n_val=5, n_test=5))
    sample = nb.sample_by_band(frame, per_band=2, seed=1)
    counts = sample["band"].value_counts()
    assert counts.max() <= 2
    assert set(sample["band"]) == set(nb.quality_bands(frame["mos"]))
    codes = sample["band"].cat.codes.to_numpy()
    assert (np.diff(codes) >= 0).all()
    assert set(sample["image_name"]) <= set(frame["image_name"])
    assert sample.equals(nb.sample_by_band(frame, per_band=2, seed=1))


def test_spread_by_mos_spans_lowest_to_highest():
    frame = pd.DataFrame({"image_name": list("abcdefghij"), "mos": [50, 3, 77, 12, 90, 41, 66, 8, 25, 59]})
    spread = nb.spread_by_mos(frame, 4)
    assert len(spread) == 4
    assert spread["mos"].iloc[0] == 3 and spread["mos"].iloc[-1] == 90
    assert spread["mos"].is_monotonic_increasing
    assert len(nb.spread_by_mos(frame, 20)) == len(frame)


def test_images_available_checks_the_named_files(tmp_path):
    frame = koniq.read_labels(split_file(tmp_path / "labels.csv"))
    assert not nb.images_available(frame, tmp_path)
    write_jpegs(tmp_path / "images", frame["image_name"])
    assert nb.images_available(frame, tmp_path / "images")


def test_label_figures_render_to_png(tmp_path):
    frame = koniq.read_labels(split_file(tmp_path / "labels.csv"))
    splits = [koniq.official_split(frame), koniq.random_split(frame, 0.25, 0.2, seed=0)]
    figures = {
        "hist": nb.plot_mos_histogram(frame),
        "sd": nb.plot_sd_vs_mos(frame),
        "splits": nb.plot_split_distributions(splits),
        "residuals": nb.plot_residuals_by_band(predictions_table()),
    }
    assert len(figures["splits"].axes) == 2
    for name, fig in figures.items():
        fig.savefig(tmp_path / f"{name}.png", dpi=50)
        width, height = png_size(tmp_path / f"{name}.png")
        assert width > 100 and height > 100


def test_sd_plot_needs_an_sd_column(tmp_path):
    frame = koniq.read_labels(split_file(tmp_path / "labels.csv")).drop(columns="sd")
    with pytest.raises(DataError, match="SD column"):
        nb.plot_sd_vs_mos(frame)


def test_image_grid_decodes_with_the_training_function(tmp_path):
    names = ["a.jpg", "b.jpg", "c.jpg"]
    folder = write_jpegs(tmp_path / "images", names)
    fig = nb.plot_image_grid([folder / n for n in names], ["one", "two", "three"],
                                  image_size=(32, 48), columns=2, title="t")
    images = [ax.get_images()[0].get_array() for ax in fig.axes if ax.get_images()]
    assert [im.shape for im in images] == [(32, 48, 3)] * 3
    assert [ax.get_title() for ax in fig.axes if ax.get_images()] == ["one", "two", "three"]
    with pytest.raises(ValueError, match="one title per image"):
        nb.plot_image_grid([folder / "a.jpg"], [])
    from kiqa.errors import ImageError

    with pytest.raises(ImageError, match="missing.jpg"):
        nb.plot_image_grid([folder / "missing.jpg"], ["x"])


# ----------------------------------------------------------------------------- subsets


def test_subset_keeps_official_proportions_and_layout(tmp_path):
    source = split_file(tmp_path / "labels.csv", n_train=70, n_val=10, n_test=20)
    out = nb.subset_labels(source, 10, tmp_path / "sub" / "subset.csv", seed=2)
    subset = koniq.read_labels(out)
    assert subset.attrs["format"] == koniq.SPLIT_FILE
    assert subset["set"].value_counts().to_dict() == {"train": 7, "val": 1, "test": 2}
    raw, copied = pd.read_csv(source).set_index("image_name"), pd.read_csv(out).set_index("image_name")
    pd.testing.assert_frame_equal(copied, raw.loc[copied.index])  # rows copied unchanged
    again = nb.subset_labels(source, 10, tmp_path / "again.csv", seed=2)
    assert again.read_text() == out.read_text()
    other = pd.read_csv(nb.subset_labels(source, 10, tmp_path / "other.csv", seed=3))
    assert set(other["image_name"]) != set(copied.index)


def test_subset_gives_every_official_set_an_image(tmp_path):
    source = split_file(tmp_path / "labels.csv", n_train=97, n_val=1, n_test=2)
    subset = koniq.read_labels(nb.subset_labels(source, 5, tmp_path / "s.csv"))
    assert len(subset) == 5
    assert set(subset["set"]) == {"train", "val", "test"}
    with pytest.raises(DataError, match="at least 3"):
        nb.subset_labels(source, 2, tmp_path / "s2.csv")


def test_subset_spreads_rows_over_source_photos(tmp_path):
    # 4 photos with 10, 10, 10 and 2 crops: 12 rows must come 3 + 3 + 3 + 2 + one more,
    # never 10 from one photo and 2 from another.
    sources = ["p0"] * 10 + ["p1"] * 10 + ["p2"] * 10 + ["p3"] * 2
    source = download_file(tmp_path / "scores.csv", n=len(sources))
    raw = pd.read_csv(source).assign(source_image=sources)
    raw.to_csv(source, index=False)
    subset = koniq.read_labels(nb.subset_labels(source, 12, tmp_path / "s.csv", seed=4))
    counts = subset["source_image"].value_counts().to_dict()
    assert counts["p3"] == 2
    assert sorted(counts[p] for p in ("p0", "p1", "p2")) == [3, 3, 4]


def test_subset_of_a_download_file_stays_a_download_file(tmp_path):
    source = download_file(tmp_path / "scores.csv", n=12)
    subset = koniq.read_labels(nb.subset_labels(source, 5, tmp_path / "s.csv"))
    assert subset.attrs["format"] == koniq.DOWNLOAD_FILE and len(subset) == 5
    everything = koniq.read_labels(nb.subset_labels(source, 50, tmp_path / "all.csv"))
    assert len(everything) == 12
    with pytest.raises(DataError, match="at least 1"):
        nb.subset_labels(source, 0, tmp_path / "none.csv")


# ----------------------------------------------------------------------------- results


def test_residuals_by_band_by_hand():
    table = nb.residuals_by_band(predictions_table())
    # bad: residuals +10, +20; fair: -1 (the NaN prediction is left out); good: +1; excellent: -30
    assert list(table.index) == ["bad (0-20)", "fair (40-60)", "good (60-80)", "excellent (80-100)"]
    assert table.loc["bad (0-20)", "n"] == 2
    assert table.loc["bad (0-20)", "mean_residual"] == pytest.approx(15.0)
    assert table.loc["bad (0-20)", "mae"] == pytest.approx(15.0)
    assert table.loc["bad (0-20)", "rmse"] == pytest.approx(np.sqrt((100 + 400) / 2))
    assert table.loc["fair (40-60)", "n"] == 1
    assert table.loc["excellent (80-100)", "mean_residual"] == pytest.approx(-30.0)


def test_best_and_worst_by_absolute_error():
    best, worst = nb.best_and_worst(predictions_table(), count=2)
    assert best["image_name"].tolist() == ["c", "f"]
    assert worst["image_name"].tolist() == ["e", "b"]
    assert worst["abs_error"].tolist() == [30.0, 20.0]
    assert nb.prediction_captions(best) == ["true 45.0 / predicted 44.0", "true 70.0 / predicted 71.0"]


def test_metrics_table_uses_the_literature_names():
    metrics = {"plcc": 0.9, "srcc": 0.8, "krcc": 0.6, "rmse": 7.5, "mae": 5.0, "plcc_logistic4": 0.91, "n": 20, "extra": 1}
    table = nb.metrics_table(metrics)
    assert table.loc["SRCC", "value"] == 0.8
    assert table.loc["PLCC after 4-parameter logistic", "value"] == 0.91
    assert "extra" not in table.index and len(table) == 7
    with_ci = nb.metrics_table({**metrics, "srcc_ci_low": 0.7, "srcc_ci_high": 0.85})
    assert with_ci.loc["SRCC 95% CI low (bootstrap over images)", "value"] == 0.7


def test_score_differences():
    table = pd.DataFrame({"keras": [50.0, 60.0], "served": [50.5, 59.0], "same": [50.0, 60.0]})
    diffs = nb.score_differences(table, "keras", ["served", "same"])
    assert diffs.loc["served", "max_abs_diff"] == pytest.approx(1.0)
    assert diffs.loc["served", "mean_abs_diff"] == pytest.approx(0.75)
    assert diffs.loc["same", "max_abs_diff"] == 0.0


# ----------------------------------------------------------------------------- runs


def fake_run(run_dir, config, metrics=None):
    """The files of a finished run, without training (model.keras is a placeholder)."""
    run_dir.mkdir(parents=True)
    config.save(run_dir / "config.json")
    (run_dir / "metrics.json").write_text(json.dumps(metrics or {"srcc": 0.5, "n": 6}))
    predictions_table().to_csv(run_dir / "predictions.csv", index=False)
    pd.DataFrame({"epoch": [0, 1], "loss": [0.2, 0.1]}).to_csv(run_dir / "history.csv", index=False)
    pd.DataFrame({"image_name": ["x.jpg"], "path": [""], "reason": ["broken"]}).to_csv(run_dir / "rejects.csv", index=False)
    (run_dir / "model.keras").write_bytes(b"placeholder")
    return run_dir


def test_load_run_reads_a_finished_run(tmp_path):
    config = TrainConfig.demo(run_dir=str(tmp_path / "run"), weights="none")
    run = nb.load_run(fake_run(tmp_path / "run", config))
    assert run.config == config
    assert run.metrics["srcc"] == 0.5
    assert run.history["loss"].tolist() == [0.2, 0.1]
    assert run.predictions["image_name"].tolist() == list("abcdef")
    assert run.model_path == tmp_path / "run" / "model.keras"


def test_load_run_names_the_missing_files(tmp_path):
    (tmp_path / "half").mkdir()
    TrainConfig.demo().save(tmp_path / "half" / "config.json")
    with pytest.raises(DataError, match=r"missing \['metrics.json', 'predictions.csv', 'model.keras'\]"):
        nb.load_run(tmp_path / "half")


def test_train_or_load_returns_a_finished_run_without_training(tmp_path):
    config = TrainConfig.demo(run_dir=str(tmp_path / "run"), weights="none", epochs=2)
    fake_run(tmp_path / "run", config, metrics={"srcc": 0.25})
    result = nb.train_or_load(config)
    assert result.metrics == {"srcc": 0.25}
    assert result.model_path == tmp_path / "run" / "model.keras"
    assert result.rejects["image_name"].tolist() == ["x.jpg"]
    with pytest.raises(RunExistsError, match=r"changed: \['epochs'\]") as raised:
        nb.train_or_load(config.replace(epochs=3))
    # A fact, not a notebook variable: notebook 02 phrases the remedy.
    assert isinstance(raised.value, ConfigError) and raised.value.changed == ("epochs",)
    assert "OVERWRITE" not in str(raised.value)


def test_run_image_root(tmp_path, monkeypatch):
    labels = split_file(tmp_path / "labels.csv")
    (tmp_path / "1024x768").mkdir()
    assert nb.run_image_root(TrainConfig(labels=str(labels))) == (tmp_path / "1024x768").resolve()
    assert str(nb.run_image_root(TrainConfig(labels=str(labels), images="/data/x"))) == "/data/x"
    # Demo runs (labels=None): the demo data's images/ folder, found through KIQA_HOME.
    monkeypatch.setenv("KIQA_HOME", str(tmp_path / "home"))
    demo = synthetic.default_demo_dir()
    (demo / "images").mkdir(parents=True)
    (demo / "labels.csv").write_text("image_name,MOS_zscore\n")
    assert nb.run_image_root(TrainConfig.demo()) == (demo / "images").resolve()


# ----------------------------------------------------------------------------- the model


def test_first_conv_kernels_finds_the_rgb_convolution_inside_nested_models():
    import keras

    stem = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(8, 4, strides=4, name="stem_conv")], name="stem")
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = stem(x)
    x = keras.layers.Conv2D(4, 3, name="second")(x)
    model = keras.Model(inputs, x)
    name, kernels = nb.first_conv_kernels(model)
    assert name == "stem_conv"
    assert kernels.shape == (4, 4, 3, 8)
    np.testing.assert_array_equal(kernels, keras.ops.convert_to_numpy(stem.layers[0].kernel))

    dense_only = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)], name="dense_only")
    with pytest.raises(ModelError, match="dense_only"):
        nb.first_conv_kernels(dense_only)


def test_kernel_grid_places_and_scales_each_kernel():
    kernels = np.zeros((2, 2, 3, 5), np.float32)
    kernels[..., 1] = np.arange(12, dtype=np.float32).reshape(2, 2, 3) * 10  # any range -> 0..1
    kernels[..., 3] = 7.0  # constant -> mid grey
    grid = nb.kernel_grid(kernels, columns=3, scale=2, gap=1)
    assert grid.shape == (2 * (4 + 1) - 1, 3 * (4 + 1) - 1, 3)
    tile1 = grid[0:4, 5:9]  # row 0, column 1
    assert tile1.min() == 0.0 and tile1.max() == 1.0
    np.testing.assert_allclose(tile1[::2, ::2], np.arange(12).reshape(2, 2, 3) / 11.0)
    np.testing.assert_array_equal(grid[5:9, 0:4], 0.5)  # kernel 3: row 1, column 0
    assert (grid[4, :] == 1.0).all()  # white gap between the rows
    fig = nb.plot_kernels(kernels, columns=3)
    assert "5 filters of 2x2x3" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match=r"\[height, width, 3, filters\]"):
        nb.kernel_grid(np.zeros((4, 4, 1, 8)))


# ----------------------------------------------------------------------------- serving


def test_labels_or_demo_says_when_it_falls_back(tmp_path, monkeypatch):
    from kiqa.data import synthetic

    monkeypatch.setenv("KIQA_HOME", str(tmp_path / "home"))
    synthetic.write_demo_dataset(synthetic.default_demo_dir(), crops_per_photo=1)
    present = tmp_path / "k.csv"
    present.write_text("image_name,MOS\n")
    assert nb.labels_or_demo(str(present)) == (present, None)
    assert nb.labels_or_demo(None) == (synthetic.default_demo_dir() / "labels.csv", None)
    path, note = nb.labels_or_demo(str(tmp_path / "absent.csv"))
    assert path == synthetic.default_demo_dir() / "labels.csv"
    assert "absent.csv" in note and "not KonIQ" in note and "kiqa fetch-koniq" in note
