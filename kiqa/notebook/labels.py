"""Figures and tables of a label set: MOS bands, distributions, splits, samples, subsets.

Figures are `matplotlib.figure.Figure` objects made without pyplot: nothing is left open
in pyplot's global registry (a notebook that loops over runs would otherwise hold every
figure in memory), and the caller decides whether to save or display each one.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from kiqa.contract import MOS_SCALE
from kiqa.data import koniq
from kiqa.errors import DataError


# Five equal bands of the 0-100 MOS. KonIQ's raters voted on a 5-point absolute
# category scale (bad, poor, fair, good, excellent); the 0-100 MOS is a rescaled
# z-score of those votes, so the names are a reading aid, not KonIQ's own bins.
BAND_EDGES = tuple(MOS_SCALE * k / 5 for k in range(6))  # 0, 20, ..., 100


BAND_NAMES = ("bad", "poor", "fair", "good", "excellent")


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
    ax.hist(frame["mos"], bins=bins, range=(0, MOS_SCALE), color="tab:blue", alpha=0.8)
    for edge in BAND_EDGES[1:-1]:
        ax.axvline(edge, color="grey", linewidth=0.8, linestyle=":")
    mean = float(frame["mos"].mean())
    ax.axvline(mean, color="tab:red", linewidth=1.2, label=f"mean {mean:.1f}")
    ax.set(xlabel="MOS (0-100, higher is better)", ylabel="images", xlim=(0, MOS_SCALE),
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
    edges = np.arange(0.0, MOS_SCALE + bin_width, bin_width)
    binned = data.groupby(pd.cut(data["mos"], edges), observed=True)["sd"].agg(["mean", "count"])
    centres = [interval.mid for interval in binned.index]
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.scatter(data["mos"], data["sd"], s=4, alpha=0.25, edgecolors="none", label="one image")
    ax.plot(centres, binned["mean"], color="tab:red", marker="o", markersize=3,
            label=f"mean per {bin_width:g}-point bin")
    ax.set(xlabel="MOS (0-100)", ylabel="SD of the votes (1-5 scale)", xlim=(0, MOS_SCALE),
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
                ax.hist(part["mos"], bins=bins, range=(0, MOS_SCALE), density=True, histtype="step",
                        linewidth=1.5, label=f"{name} ({len(part)})")
        ax.set(xlabel="MOS (0-100)", title=split.name, xlim=(0, MOS_SCALE))
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
