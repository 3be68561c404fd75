"""Summaries and figures the notebooks show (`notebooks/`), as plain functions.

A notebook cell longer than a screen belongs here, where it has a docstring and a test.
Figures are `matplotlib.figure.Figure` objects made without pyplot: nothing is left
open in pyplot's global registry (a notebook that loops over runs would otherwise hold
every figure in memory), and the caller decides whether to save or display each one
(in Jupyter a Figure returned as a cell's last value is drawn once, after
`%matplotlib inline` has registered matplotlib's display formatters).

Images are read with `kiqa.image.load_image`, the function training uses, so a gallery
shows the pixels the model saw (EXIF orientation applied, whole image, no crop).
TensorFlow is imported only by the functions that decode images or look into a model,
so the label-file summaries stay cheap.
"""

import base64
import dataclasses
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from kiqa.config import TrainConfig
from kiqa.data import koniq
from kiqa.errors import ConfigError, DataError, ModelError, ServingError

# Five equal bands of the 0-100 MOS. KonIQ's raters voted on a 5-point absolute
# category scale (bad, poor, fair, good, excellent); the 0-100 MOS is a rescaled
# z-score of those votes, so the names are a reading aid, not KonIQ's own bins.
BAND_EDGES = (0.0, 20.0, 40.0, 60.0, 80.0, 100.0)
BAND_NAMES = ("bad", "poor", "fair", "good", "excellent")

# Metric names as the paper tables print them.
METRIC_LABELS = {
    "plcc": "PLCC",
    "srcc": "SRCC",
    "krcc": "KRCC",
    "rmse": "RMSE (MOS points)",
    "mae": "MAE (MOS points)",
    "plcc_ci_low": "PLCC 95% CI low (bootstrap over images)",
    "plcc_ci_high": "PLCC 95% CI high",
    "srcc_ci_low": "SRCC 95% CI low (bootstrap over images)",
    "srcc_ci_high": "SRCC 95% CI high",
    "plcc_logistic4": "PLCC after 4-parameter logistic",
    "n": "images",
    "failed": "images that failed to decode",
}


# ----------------------------------------------------------------------------- labels


def band_labels(edges=BAND_EDGES, names=BAND_NAMES):
    """The band labels, e.g. "fair (40-60)", in order from worst to best.

    Args:
        edges: increasing band edges on the 0-100 scale.
        names: one name per band (len(edges) - 1).

    Returns:
        A list of strings.
    """
    return [f"{name} ({lo:g}-{hi:g})" for name, lo, hi in zip(names, edges[:-1], edges[1:])]


def quality_bands(mos, edges=BAND_EDGES, names=BAND_NAMES):
    """Assigns each MOS to a quality band.

    Args:
        mos: MOS values on 0-100.
        edges: increasing band edges; the lowest band includes its lower edge.
        names: one name per band.

    Returns:
        An ordered `pandas.Categorical` of band labels (see `band_labels`), aligned
        with `mos`.

    Raises:
        ValueError: `names` does not have one entry per band.
    """
    if len(names) != len(edges) - 1:
        raise ValueError(f"{len(edges) - 1} bands need {len(edges) - 1} names, got {len(names)}")
    return pd.cut(
        np.asarray(mos, dtype=float), bins=list(edges), labels=band_labels(edges, names),
        include_lowest=True, ordered=True,
    )


def labels_or_demo(labels):
    """The label file a notebook explores, falling back to the demo data when it is absent.

    A fresh clone has no KonIQ file at the notebooks' default path (the reference copy in
    ../../shared/data), and KonIQ is a separate download; the notebook should still run.

    Args:
        labels: a label CSV path, or None for the demo data.

    Returns:
        (path, note): the label file to read, and None or a sentence saying that the demo
        data (not KonIQ) is shown instead of a missing file.
    """
    from kiqa.data import synthetic

    if labels is None:
        return synthetic.demo_dataset(), None
    if Path(labels).is_file():
        return Path(labels), None
    return synthetic.demo_dataset(), (
        f"no label file at {labels} (KonIQ is a separate download: `kiqa fetch-koniq data/koniq`): "
        "showing kiqa's built-in demo data instead (synthetic distortions and made-up scores, not "
        "KonIQ); set LABELS to a KonIQ label file"
    )


def label_summary(frame):
    """Count, mean, spread and quartiles of the label table's numeric columns.

    Args:
        frame: a table from `kiqa.data.koniq.read_labels`.

    Returns:
        DataFrame indexed by column (`mos` on 0-100; `sd` of the raw 1-5 votes and
        `votes` per image where the file has them) with count, mean, std, min, 25%,
        50%, 75%, max.
    """
    columns = [c for c in ("mos", "mos_raw", "sd", "votes") if c in frame.columns]
    return frame[columns].describe().T


def plot_mos_histogram(frame, bins=50):
    """Histogram of the 0-100 MOS, with the quality bands and the mean marked.

    Args:
        frame: label table with a `mos` column.
        bins: histogram bins.

    Returns:
        A `matplotlib.figure.Figure`.
    """
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.hist(frame["mos"], bins=bins, range=(0, 100), color="tab:blue", alpha=0.8)
    for edge in BAND_EDGES[1:-1]:
        ax.axvline(edge, color="grey", linewidth=0.8, linestyle=":")
    mean = float(frame["mos"].mean())
    ax.axvline(mean, color="tab:red", linewidth=1.2, label=f"mean {mean:.1f}")
    ax.set(xlabel="MOS (0-100, higher is better)", ylabel="images", xlim=(0, 100),
           title=f"MOS distribution, {len(frame)} images")
    ax.legend()
    return fig


def plot_sd_vs_mos(frame, bin_width=5.0):
    """Rater disagreement (SD of the votes) against MOS, with the binned mean.

    Raters agree most on clearly bad and clearly good images and least in the middle,
    so the curve is an arch; its height says how noisy a single label is.

    Args:
        frame: label table with `mos` and `sd` columns.
        bin_width: MOS width of the bins of the mean curve.

    Returns:
        A `matplotlib.figure.Figure`.

    Raises:
        DataError: the label file has no SD column.
    """
    if "sd" not in frame.columns:
        raise DataError(
            f"{frame.attrs.get('path', 'the label table')} has no SD column; vote SD needs "
            "KonIQ's label files (koniq10k_distributions_sets.csv has one)"
        )
    data = frame[["mos", "sd"]].dropna()
    edges = np.arange(0.0, 100.0 + bin_width, bin_width)
    binned = data.groupby(pd.cut(data["mos"], edges), observed=True)["sd"].agg(["mean", "count"])
    centres = [interval.mid for interval in binned.index]
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.scatter(data["mos"], data["sd"], s=4, alpha=0.25, edgecolors="none", label="one image")
    ax.plot(centres, binned["mean"], color="tab:red", marker="o", markersize=3,
            label=f"mean per {bin_width:g}-point bin")
    ax.set(xlabel="MOS (0-100)", ylabel="SD of the votes (1-5 scale)", xlim=(0, 100),
           title="rater disagreement against quality")
    ax.legend()
    return fig


def split_table(splits):
    """Size and MOS statistics of each part of each split, side by side.

    Args:
        splits: `kiqa.data.koniq.Split` objects (e.g. official and random).

    Returns:
        DataFrame with one row per (split, part): n, share of the split's images,
        MOS mean / std / min / median / max, the two-sample Kolmogorov-Smirnov
        statistic of the part's MOS against the training part's (0 = same
        distribution), and the share of each quality band.
    """
    rows = []
    for split in splits:
        parts = {"train": split.train, "val": split.val, "test": split.test}
        total = sum(len(p) for p in parts.values())
        for name, part in parts.items():
            mos = part["mos"].to_numpy(dtype=float)
            row = dict(split=split.name, part=name, n=len(part), share=len(part) / total if total else np.nan)
            if len(mos):
                row.update(
                    mos_mean=mos.mean(), mos_std=mos.std(ddof=1) if len(mos) > 1 else np.nan,
                    mos_min=mos.min(), mos_median=np.median(mos), mos_max=mos.max(),
                    ks_to_train=stats.ks_2samp(mos, split.train["mos"]).statistic if len(split.train) else np.nan,
                )
                shares = pd.Series(quality_bands(mos)).value_counts(normalize=True, sort=False)
                row.update({label: float(shares.get(label, 0.0)) for label in band_labels()})
            rows.append(row)
    return pd.DataFrame(rows)


def plot_split_distributions(splits, bins=40):
    """MOS histograms (as densities) of train / val / test, one panel per split.

    Args:
        splits: `kiqa.data.koniq.Split` objects.
        bins: histogram bins over 0-100.

    Returns:
        A `matplotlib.figure.Figure`.
    """
    fig = Figure(figsize=(5 * len(splits), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(splits), sharey=True))
    for ax, split in zip(axes, splits):
        for name, part in (("train", split.train), ("val", split.val), ("test", split.test)):
            if len(part):
                ax.hist(part["mos"], bins=bins, range=(0, 100), density=True, histtype="step",
                        linewidth=1.5, label=f"{name} ({len(part)})")
        ax.set(xlabel="MOS (0-100)", title=split.name, xlim=(0, 100))
        ax.legend()
    axes[0].set_ylabel("density")
    return fig


def images_available(frame, root, check=20):
    """Whether a label table's images are present under `root` (checks the first few).

    Args:
        frame: label table.
        root: image folder.
        check: how many names to try.

    Returns:
        True if every one of the first `check` names resolves to a file.
    """
    try:
        for name in frame["image_name"].head(check):
            koniq.resolve_image_path(root, name)
    except DataError:
        return False
    return len(frame) > 0


def sample_by_band(frame, per_band=4, seed=0):
    """A seeded sample of images from every quality band, worst band first.

    Args:
        frame: label table with `image_name` and `mos`.
        per_band: images per band (fewer where a band has fewer).
        seed: sampling seed.

    Returns:
        The sampled rows with a `band` column, ordered by band, then MOS.
    """
    banded = frame.assign(band=quality_bands(frame["mos"]))
    picked = [
        group.sample(min(per_band, len(group)), random_state=seed)
        for _, group in banded.groupby("band", observed=True)
    ]
    if not picked:
        return banded.iloc[:0]
    return pd.concat(picked).sort_values(["band", "mos"]).reset_index(drop=True)


def spread_by_mos(frame, count, column="mos"):
    """`count` rows spread evenly over the range of `column` (lowest to highest).

    Args:
        frame: a table with `column`.
        count: rows wanted.
        column: the column to spread over.

    Returns:
        Up to `count` distinct rows, ordered by `column`.
    """
    ordered = frame.sort_values(column).reset_index(drop=True)
    if len(ordered) <= count:
        return ordered
    positions = np.unique(np.round(np.linspace(0, len(ordered) - 1, count)).astype(int))
    return ordered.iloc[positions].reset_index(drop=True)


def plot_image_grid(paths, titles, image_size=(192, 256), columns=4, title=None):
    """Images in a grid with a caption under each, decoded as training decodes them.

    Args:
        paths: image files.
        titles: one caption per image.
        image_size: (height, width) each image is resized to (whole image, no crop).
        columns: images per row.
        title: figure title.

    Returns:
        A `matplotlib.figure.Figure`.

    Raises:
        ValueError: `paths` is empty or `titles` does not match it.
        ImageError: an image cannot be read or decoded (named).
    """
    from kiqa.image import load_image  # TensorFlow: only when images are shown

    paths, titles = list(paths), list(titles)
    if not paths or len(paths) != len(titles):
        raise ValueError(f"need one title per image and at least one image; got {len(paths)} images, {len(titles)} titles")
    columns = min(columns, len(paths))
    rows = -(-len(paths) // columns)
    height, width = image_size
    cell = 3.2
    fig = Figure(figsize=(cell * columns, cell * height / width * rows + 0.5 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, path, caption in zip(axes, paths, titles):
        pixels = np.asarray(load_image(path, image_size)).astype(np.uint8)
        ax.imshow(pixels)
        ax.set_title(caption, fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


# ----------------------------------------------------------------------------- training


def subset_labels(labels, max_images, out_csv, seed=0):
    """Writes a seeded subset of a label file, in the file's own layout, for quick runs.

    Rows are copied unchanged, so `read_labels` detects the same layout. When the file
    has KonIQ's `set` column the subset keeps the official proportions (each set gets
    its share, at least one image), so the official split still has all three parts.
    When it has a `source_image` column (the demo data: crops of one photo), the rows
    are spread evenly over the source photos, which random splits keep together.

    Args:
        labels: a KonIQ-format label CSV.
        max_images: rows to keep; the whole file if it has no more.
        out_csv: the CSV to write (its folder is created).
        seed: sampling seed.

    Returns:
        The `Path` of `out_csv`.

    Raises:
        DataError: the label file is unusable, or `max_images` is below 1 (or below
            the number of official sets).
    """
    koniq.read_labels(labels)  # validates the file and its layout, naming the problem
    raw = pd.read_csv(labels, dtype={"image_name": object})
    if max_images < 1:
        raise DataError(f"max_images must be at least 1, got {max_images}")
    if len(raw) > max_images:
        rng = np.random.default_rng(seed)
        if "set" in raw.columns:
            groups = raw.groupby("set", sort=True)
            if max_images < groups.ngroups:
                raise DataError(
                    f"max_images={max_images} cannot keep one image of each of the "
                    f"{groups.ngroups} official sets of {labels}; ask for at least {groups.ngroups}"
                )
            sizes = groups.size()
            wanted = np.maximum(1, np.floor(sizes / len(raw) * max_images)).astype(int)
            # Largest remainder: hand out what flooring left over to the biggest sets.
            for key in (sizes / len(raw) * max_images - wanted).sort_values(ascending=False).index:
                if wanted.sum() >= max_images:
                    break
                wanted[key] += 1
            while wanted.sum() > max_images:  # the "at least one" rule overshot
                wanted[wanted.idxmax()] -= 1
            keep = np.concatenate([
                rng.choice(group.index.to_numpy(), size=int(wanted[key]), replace=False)
                for key, group in groups
            ])
        elif koniq.GROUP_COLUMN in raw.columns:
            # Round-robin over source photos (in random order within each): random splits
            # keep a photo's crops together, so a subset drawn row by row could leave a
            # split part with one photo, or none.
            shuffled = raw.loc[rng.permutation(raw.index.to_numpy())]
            turn = shuffled.groupby(koniq.GROUP_COLUMN, sort=False).cumcount()
            keep = shuffled.assign(_turn=turn.to_numpy()).sort_values("_turn", kind="stable").index[:max_images]
        else:
            keep = rng.choice(raw.index.to_numpy(), size=max_images, replace=False)
        raw = raw.loc[np.sort(keep)]
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    raw.to_csv(out_csv, index=False)
    return out_csv


def train_or_load(config, backbone=None, overwrite=False, progress=True):
    """Trains a run, or returns the finished run already in its run directory.

    Re-executing a notebook should not retrain a finished run; an unfinished one is
    resumed by `kiqa.train.train`.

    Args:
        config: `kiqa.config.TrainConfig`.
        backbone: passed to `kiqa.train.train`.
        overwrite: delete the run directory and train again.
        progress: show progress bars.

    Returns:
        A `kiqa.train.TrainResult`.

    Raises:
        ConfigError: the run directory holds a finished run with another config
            (change the run directory, or overwrite it).
        kiqa.errors.KiqaError: whatever training raises.
    """
    from kiqa.train import TrainResult, train

    run_dir = config.resolved_run_dir
    if not overwrite and (run_dir / "metrics.json").is_file() and (run_dir / "config.json").is_file():
        previous = TrainConfig.load(run_dir / "config.json")
        if previous != config:
            changed = sorted(k for k, v in config.to_dict().items() if previous.to_dict().get(k) != v)
            raise ConfigError(
                f"{run_dir} holds a finished run with other settings (changed: {changed}); "
                "set OVERWRITE = True to train again, or choose another RUN_DIR"
            )
        rejects_csv = run_dir / "rejects.csv"
        rejects = pd.read_csv(rejects_csv) if rejects_csv.is_file() else pd.DataFrame()
        model_path = run_dir / "model.keras"
        return TrainResult(
            run_dir, json.loads((run_dir / "metrics.json").read_text()),
            model_path if model_path.is_file() else None, rejects,
        )
    return train(config, backbone=backbone, overwrite=overwrite, progress=progress)


@dataclasses.dataclass
class RunFiles:
    """A finished training run, read back from its run directory.

    Attributes:
        run_dir: the run directory.
        config: the run's `TrainConfig`.
        metrics: test metrics from `metrics.json`.
        history: per-epoch log from `history.csv` (None if absent).
        predictions: test predictions (image_name, mos, predicted_mos).
        model_path: the final `.keras` model.
    """

    run_dir: Path
    config: TrainConfig
    metrics: dict
    history: Optional[pd.DataFrame]
    predictions: pd.DataFrame
    model_path: Path


def load_run(run_dir):
    """Reads a finished single-split run (written by `kiqa.train.train`).

    Args:
        run_dir: the run directory.

    Returns:
        A `RunFiles`.

    Raises:
        DataError: a file of a finished run is missing (the run is unfinished, or the
            folder is not a run directory).
    """
    run_dir = Path(run_dir)
    needed = ("config.json", "metrics.json", "predictions.csv", "model.keras")
    missing = [name for name in needed if not (run_dir / name).is_file()]
    if missing:
        raise DataError(
            f"{run_dir} is not a finished training run (missing {missing}); train one first "
            "(notebook 02, or kiqa-train --run-dir DIR) and point RUN_DIR at it"
        )
    history_csv = run_dir / "history.csv"
    return RunFiles(
        run_dir=run_dir,
        config=TrainConfig.load(run_dir / "config.json"),
        metrics=json.loads((run_dir / "metrics.json").read_text()),
        history=pd.read_csv(history_csv) if history_csv.is_file() else None,
        predictions=pd.read_csv(run_dir / "predictions.csv", dtype={"image_name": object}),
        model_path=run_dir / "model.keras",
    )


def run_image_root(config):
    """The folder a run's `image_name` values are relative to.

    Args:
        config: the run's `TrainConfig`.

    Returns:
        `config.images`, else the default folder beside the label file (for the demo
        data: its `images/` folder).
    """
    if config.images:
        return Path(config.images)
    if config.labels:
        return koniq.default_image_root(config.labels)
    from kiqa.data import synthetic

    return koniq.default_image_root(synthetic.demo_dataset())


def metrics_table(metrics):
    """Test metrics as a two-column table with the names the literature prints.

    Args:
        metrics: dict from `kiqa.metrics.evaluate_with_confidence` (a run's metrics.json).

    Returns:
        DataFrame indexed by metric label with one column, `value`.
    """
    rows = [(METRIC_LABELS.get(key, key), value) for key, value in metrics.items() if key in METRIC_LABELS]
    return pd.DataFrame(rows, columns=["metric", "value"]).set_index("metric")


def residuals_by_band(predictions):
    """Prediction error per quality band of the true MOS.

    A model that regresses to the mean over-predicts bad images and under-predicts
    good ones: the mean residual falls from positive to negative across the bands.

    Args:
        predictions: table with `mos` and `predicted_mos` (rows with a NaN
            prediction, images that failed to decode, are left out).

    Returns:
        DataFrame with one row per band that has images: n, mean_residual
        (predicted - true), mae and rmse, all in MOS points.
    """
    scored = predictions.dropna(subset=["predicted_mos"])
    residual = scored["predicted_mos"] - scored["mos"]
    table = pd.DataFrame({"band": quality_bands(scored["mos"]), "residual": residual})
    grouped = table.groupby("band", observed=True)["residual"]
    return pd.DataFrame({
        "n": grouped.size(),
        "mean_residual": grouped.mean(),
        "mae": grouped.apply(lambda r: float(np.mean(np.abs(r)))),
        "rmse": grouped.apply(lambda r: float(np.sqrt(np.mean(np.square(r))))),
    })


def plot_residuals_by_band(predictions):
    """Box plots of the residual (predicted - true MOS) per band of the true MOS.

    Args:
        predictions: table with `mos` and `predicted_mos`.

    Returns:
        A `matplotlib.figure.Figure`.
    """
    scored = predictions.dropna(subset=["predicted_mos"])
    bands = quality_bands(scored["mos"])
    residual = (scored["predicted_mos"] - scored["mos"]).to_numpy()
    present = [label for label in band_labels() if (bands == label).any()]
    fig = Figure(figsize=(7.5, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.boxplot([residual[np.asarray(bands == label)] for label in present],
               tick_labels=[f"{label}\nn={int((bands == label).sum())}" for label in present])
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set(xlabel="true MOS band", ylabel="predicted - true MOS", title="residuals by quality band")
    ax.tick_params(axis="x", labelsize=8)
    return fig


def best_and_worst(predictions, count=4):
    """The best and worst predicted images by absolute error.

    Args:
        predictions: table with `image_name`, `mos` and `predicted_mos`.
        count: images in each list.

    Returns:
        (best, worst): DataFrames with an `abs_error` column, smallest error first
        in `best`, largest first in `worst`.
    """
    scored = predictions.dropna(subset=["predicted_mos"])
    scored = scored.assign(abs_error=(scored["predicted_mos"] - scored["mos"]).abs())
    ordered = scored.sort_values(["abs_error", "image_name"], kind="stable")
    best = ordered.head(count).reset_index(drop=True)
    worst = ordered.iloc[::-1].head(count).reset_index(drop=True)
    return best, worst


def prediction_captions(frame):
    """Captions "true 61.2 / predicted 58.0" for a table with `mos` and `predicted_mos`."""
    return [f"true {t:.1f} / predicted {p:.1f}" for t, p in zip(frame["mos"], frame["predicted_mos"])]


# ----------------------------------------------------------------------------- the model


def first_conv_kernels(model):
    """The kernels of the first convolution that sees the RGB pixels.

    For ConvNeXt this is the stem: a 4x4 convolution with stride 4 and 96 (Tiny,
    Small) to 256 (XLarge) filters; the paper's Figure 5 shows these.

    Args:
        model: a `keras.Model` (nested models are searched in layer order).

    Returns:
        (layer name, float32 array [height, width, 3, filters]).

    Raises:
        ModelError: the model has no convolution with 3 input channels.
    """
    import keras  # TensorFlow and Keras: only when a model is inspected

    def walk(layer):
        if isinstance(layer, keras.layers.Conv2D) and layer.built and layer.kernel.shape[2] == 3:
            return layer
        for child in getattr(layer, "layers", []):
            found = walk(child)
            if found is not None:
                return found
        return None

    layer = walk(model)
    if layer is None:
        raise ModelError(
            f"model {model.name!r} has no Conv2D layer with 3 input channels; pass a kiqa "
            "ConvNeXt model (kiqa.model.load_model on a run's model.keras)"
        )
    return layer.name, np.asarray(keras.ops.convert_to_numpy(layer.kernel), dtype=np.float32)


def kernel_grid(kernels, columns=16, scale=8, gap=2):
    """Tiles RGB convolution kernels into one image, each kernel stretched to 0..1.

    Each kernel is min-max scaled on its own (the usual way to show first-layer
    filters: it shows each filter's pattern and colour, not its magnitude), then
    enlarged `scale` times with nearest-neighbour pixels.

    Args:
        kernels: array [height, width, 3, filters].
        columns: kernels per row.
        scale: screen pixels per kernel pixel.
        gap: white pixels between kernels.

    Returns:
        float32 array [rows * (h * scale + gap) - gap, columns * (w * scale + gap) - gap, 3]
        in 0..1; kernel `i` is at row `i // columns`, column `i % columns`.

    Raises:
        ValueError: `kernels` is not [height, width, 3, filters].
    """
    kernels = np.asarray(kernels, dtype=np.float32)
    if kernels.ndim != 4 or kernels.shape[2] != 3:
        raise ValueError(f"expected kernels of shape [height, width, 3, filters], got {list(kernels.shape)}")
    height, width, _, count = kernels.shape
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    tile_h, tile_w = height * scale, width * scale
    grid = np.ones((rows * (tile_h + gap) - gap, columns * (tile_w + gap) - gap, 3), np.float32)
    for index in range(count):
        kernel = kernels[..., index]
        low, high = float(kernel.min()), float(kernel.max())
        kernel = (kernel - low) / (high - low) if high > low else np.full_like(kernel, 0.5)
        tile = np.repeat(np.repeat(kernel, scale, axis=0), scale, axis=1)
        top, left = (index // columns) * (tile_h + gap), (index % columns) * (tile_w + gap)
        grid[top:top + tile_h, left:left + tile_w] = tile
    return grid


def plot_kernels(kernels, columns=16, title=None):
    """First-layer kernels as an image grid (see `kernel_grid`).

    Args:
        kernels: array [height, width, 3, filters].
        columns: kernels per row.
        title: figure title; default names the kernel shape.

    Returns:
        A `matplotlib.figure.Figure`.
    """
    grid = kernel_grid(kernels, columns=columns)
    width = min(14.0, 0.6 * min(columns, kernels.shape[3]) + 1.0)
    fig = Figure(figsize=(width, width * grid.shape[0] / grid.shape[1] + 0.6), layout="constrained")
    ax = fig.subplots()
    ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    h, w, c, n = kernels.shape
    ax.set_title(title or f"first-layer kernels: {n} filters of {h}x{w}x{c}")
    return fig


# ----------------------------------------------------------------------------- serving


def rest_predict(address, contents, model_name="kiqa", version=None,
                 signature_name="serving_default", timeout=30.0):
    """Scores encoded images through TF Serving's REST API (port 8501 by default).

    Sends `{"signature_name": ..., "instances": [{"b64": ...}, ...]}` to
    `POST /v1/models/<name>[/versions/<v>]:predict`: the bytes signature has a single
    input, so each instance is the base64-encoded file, as TF Serving's REST API
    requires for binary strings. TF Serving answers `{"predictions": [mos, ...]}`
    (one named output, so no names), or `{"error": ...}` with an HTTP error status.

    Args:
        address: "http://host:port" (a bare "host:port" gets "http://").
        contents: list of encoded image bytes.
        model_name: the served model's name.
        version: a version number, or None for the latest.
        signature_name: the bytes signature kiqa exports.
        timeout: seconds for the whole request.

    Returns:
        float32 numpy array of MOS, one per image.

    Raises:
        ServingError: no server, an HTTP error (with TF Serving's message), or an
            answer without one prediction per image.
    """
    base = address if "://" in address else f"http://{address}"
    url = f"{base.rstrip('/')}/v1/models/{model_name}"
    if version is not None:
        url += f"/versions/{int(version)}"
    url += ":predict"
    body = json.dumps({
        "signature_name": signature_name,
        "instances": [{"b64": base64.b64encode(bytes(c)).decode("ascii")} for c in contents],
    }).encode("utf-8")
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as err:
        detail = err.read().decode("utf-8", errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except (ValueError, AttributeError):
            pass
        raise ServingError(f"REST predict at {url} failed with HTTP {err.code}: {detail}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ServingError(
            f"no REST answer from {url} ({reason}); TF Serving's REST port is 8501 by default "
            "(--rest_api_port), its gRPC port 8500"
        ) from err
    except ValueError as err:
        raise ServingError(f"REST predict at {url} did not answer JSON: {err}") from err
    predictions = answer.get("predictions") if isinstance(answer, dict) else None
    if not isinstance(predictions, list) or len(predictions) != len(contents):
        raise ServingError(
            f"REST predict at {url} answered {str(answer)[:200]!r}; expected "
            f"{{\"predictions\": [...]}} with {len(contents)} scores"
        )
    return np.asarray(predictions, dtype=np.float32).reshape(-1)


def wait_until_available(client, version, timeout=60.0, poll=1.0):
    """Waits until a served model reports `version` AVAILABLE (TF Serving loads new
    versions from its base path on its own schedule, once a second by default).

    Args:
        client: a `kiqa.serving.client.ServingClient`.
        version: the version number to wait for.
        timeout: seconds to wait.
        poll: seconds between status calls.

    Returns:
        The list of `VersionStatus` once `version` is AVAILABLE.

    Raises:
        ServingError: the version failed to load (its error), or `timeout` passed.
    """
    deadline = time.monotonic() + timeout
    last = "no status yet"
    while True:
        try:
            statuses = client.model_status()
        except ServingError as err:
            statuses, last = [], str(err)
        for status in statuses:
            if status.version == int(version):
                if status.state == "AVAILABLE":
                    return statuses
                if status.state == "END" and status.error_message:
                    raise ServingError(
                        f"version {version} of {client.model_name!r} at {client.server} failed to load: "
                        f"{status.error_message}"
                    )
                last = f"version {version} is {status.state}"
        if time.monotonic() >= deadline:
            raise ServingError(
                f"version {version} of {client.model_name!r} at {client.server} was not AVAILABLE "
                f"after {timeout:g} s ({last}); is the server watching the export base path?"
            )
        time.sleep(poll)


def score_differences(table, reference, columns):
    """How far each way of scoring is from a reference, in MOS points.

    Args:
        table: one row per image, one column of MOS per way of scoring.
        reference: the reference column (e.g. the Keras model's scores).
        columns: the columns to compare with it.

    Returns:
        DataFrame indexed by column with max_abs_diff and mean_abs_diff.
    """
    rows = {}
    for column in columns:
        diff = (table[column] - table[reference]).abs()
        rows[column] = dict(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()))
    return pd.DataFrame.from_dict(rows, orient="index")
