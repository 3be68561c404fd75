"""Comparing folders of images without references (e.g. the outputs of two SR models).

Each folder is scored with `kiqa.scoring.table` (one resumable CSV per folder), images are paired
by their path relative to their folder, and the per-image MOS differences are summarised:
mean and median difference, how often each side scores higher, a Wilcoxon signed-rank
test (scipy) and a seeded percentile-bootstrap confidence interval of the mean
difference. Differences are always first folder minus second: positive means the first
scores higher (better). With more than two folders, a ranking table (mean MOS per folder
and pairwise win rates) is written as well.

All statistics use the images scored in every folder, so the pairs and the ranking
describe one and the same set of images. Images present in only some folders, or failed
in one, are listed in `unpaired.csv`.

Outputs in `out_dir`: `scores-<label>.csv` per folder, `per_image.csv`, `unpaired.csv`,
`compare.json` (its `model` key holds the model's provenance), `compare.png`, `model.json` (the model that scored the CSVs; a rerun with
another model refuses to mix its scores in) and, for more than two folders, `ranking.csv`.
"""

import dataclasses
import itertools
import json
import os
import re
import textwrap
import warnings
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from kiqa import provenance
from kiqa.contract import DEFAULT_MAX_BYTES
from kiqa.errors import ConfigError, DataError, ScoresFromAnotherModelError
from kiqa.fsutil import csv_frame, refuse_foreign_outputs, write_json_atomically
from kiqa.plots import legend_off_the_data, save_figure
from kiqa.scoring.batches import DEFAULT_BATCH_SIZE
from kiqa.scoring.files import find_images
from kiqa.scoring.table import read_scores, score_files

DEFAULT_BOOTSTRAP = 10_000
# Resampled indices held at once by the bootstrap (int64: 8 bytes each).
_BOOTSTRAP_CHUNK_ELEMENTS = 2_000_000
MODEL_FILE = "model.json"  # which model scored the per-folder CSVs (checked on resume)
# The fixed names compare writes in its output folder (besides scores-<label>.csv, which are
# refused one by one unless they are kiqa scores CSVs).
OUTPUT_NAMES = (MODEL_FILE, "per_image.csv", "unpaired.csv", "ranking.csv", "compare.json", "compare.png")


@dataclasses.dataclass(frozen=True)
class CompareResult:
    """What `compare_folders` found and wrote.

    Attributes:
        out_dir: the output folder.
        labels: one short label per folder (folder names, made unique).
        folders: the folders, in the order given.
        n_common: images scored in every folder (the compared set).
        pairs: one dict per folder pair (see `paired_stats`), first folders first.
        ranking: for more than two folders, one dict per folder, best mean MOS first;
            None for two folders.
        n_unpaired: images left out because they are missing or failed in another folder.
        n_failed: files that could not be scored (in any folder).
        files: name -> path of every file written.
        summaries: the `ScoreSummary` of each folder.
        extension_pairable: (label, relative path) of the unpaired images that would pair
            if extensions were ignored ("x.png" here, "x.jpg" there); empty when
            `ignore_extension` was set.
    """

    out_dir: str
    labels: Tuple[str, ...]
    folders: Tuple[str, ...]
    n_common: int
    pairs: Tuple[dict, ...]
    ranking: Optional[Tuple[dict, ...]]
    n_unpaired: int
    n_failed: int
    files: dict
    summaries: tuple
    extension_pairable: tuple = ()


def folder_labels(folders):
    """Short, unique, file-name-safe labels from folder names ("sr_a", "sr_a-2", ...)."""
    labels = []
    for folder in folders:
        name = Path(os.path.abspath(folder)).name or "root"
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "folder"
        label, n = name, 2
        while label in labels:
            label, n = f"{name}-{n}", n + 1
        labels.append(label)
    return labels


def wilcoxon_test(diff):
    """Two-sided Wilcoxon signed-rank test of per-image differences against zero.

    Zero differences are dropped (scipy's zero_method="wilcox", Wilcoxon's own rule).

    Args:
        diff: 1-D array of paired differences.

    Returns:
        dict with `statistic`, `p_value` (None when the test cannot run) and `note`.
    """
    diff = np.asarray(diff, dtype=np.float64)
    method = "Wilcoxon signed-rank, two-sided, zero differences dropped"
    if diff.size < 2:
        return dict(method=method, statistic=None, p_value=None,
                    note=f"needs at least 2 pairs, got {diff.size}")
    if not np.any(diff):
        # scipy divides by zero here; identical scores are no evidence of a difference.
        return dict(method=method, statistic=0.0, p_value=1.0, note="all differences are zero")
    with warnings.catch_warnings():
        # Small samples with ties fall back to the normal approximation; scipy warns.
        warnings.simplefilter("ignore", UserWarning)
        result = stats.wilcoxon(diff, zero_method="wilcox", alternative="two-sided")
    return dict(method=method, statistic=float(result.statistic), p_value=float(result.pvalue), note="")


def bootstrap_mean_ci(diff, n_resamples=DEFAULT_BOOTSTRAP, confidence=0.95, seed=0):
    """Percentile-bootstrap confidence interval of the mean (`scipy.stats.bootstrap`), seeded.

    Args:
        diff: 1-D array.
        n_resamples: bootstrap resamples.
        confidence: interval level, e.g. 0.95.
        seed: numpy random seed (same seed, same interval).

    Returns:
        (low, high), or (None, None) for an empty array.
    """
    diff = np.asarray(diff, dtype=np.float64)
    if diff.size == 0:
        return None, None
    if diff.size == 1:  # scipy refuses one observation; every resample is that value
        return float(diff[0]), float(diff[0])
    result = stats.bootstrap(
        (diff,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
        vectorized=True, batch=max(1, _BOOTSTRAP_CHUNK_ELEMENTS // diff.size), rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def win_rate(a, b):
    """Share of images where `a` scores higher than `b`, ties counted half
    (so win_rate(a, b) + win_rate(b, a) == 1)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size == 0:
        return None
    return float(np.mean(a > b) + 0.5 * np.mean(a == b))


def paired_stats(a, b, label_a="A", label_b="B", n_resamples=DEFAULT_BOOTSTRAP, confidence=0.95, seed=0):
    """Summarises paired MOS of two systems on the same images.

    Args:
        a: MOS of the first system, one per image.
        b: MOS of the second, aligned with `a`.
        label_a: name of the first system.
        label_b: name of the second.
        n_resamples: bootstrap resamples for the interval.
        confidence: interval level.
        seed: bootstrap seed.

    Returns:
        dict: `a`, `b`, `n`, `mean_a`, `mean_b`, `mean_diff` (mean of a - b; positive
        means `a` scores higher), `median_diff`, `std_diff`, `ci_low`, `ci_high`,
        `ci_level`, `ci_method`, `a_better_fraction`, `b_better_fraction`,
        `tie_fraction`, `win_rate_a` (ties count half) and `wilcoxon` (see
        `wilcoxon_test`). Means are None when there are no pairs.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = a - b
    n = int(diff.size)

    def stat(func, values):
        return float(func(values)) if values.size else None

    low, high = bootstrap_mean_ci(diff, n_resamples, confidence, seed)
    return dict(
        a=label_a,
        b=label_b,
        n=n,
        mean_a=stat(np.mean, a),
        mean_b=stat(np.mean, b),
        mean_diff=stat(np.mean, diff),
        median_diff=stat(np.median, diff),
        std_diff=float(np.std(diff, ddof=1)) if n > 1 else None,
        ci_low=low,
        ci_high=high,
        ci_level=confidence,
        ci_method=f"percentile bootstrap of the mean difference, {n_resamples} resamples, seed {seed}",
        a_better_fraction=stat(np.mean, diff > 0),
        b_better_fraction=stat(np.mean, diff < 0),
        tie_fraction=stat(np.mean, diff == 0),
        win_rate_a=win_rate(a, b),
        wilcoxon=wilcoxon_test(diff),
    )


def _pairing_key(relative, ignore_extension):
    return os.path.splitext(relative)[0] if ignore_extension else relative


def _folder_scores(folder, files, table, ignore_extension):
    """key -> MOS of the scored images, plus (key, relative path, reason) left out."""
    scored, left_out, seen = {}, [], {}
    for path, _ in files:
        relative = os.path.relpath(path, folder)
        key = _pairing_key(relative, ignore_extension)
        mos, error = table.get(path, (None, "missing from the scores CSV"))
        if key in seen:
            left_out.append((key, relative, f"same name without extension as {seen[key]}"))
            if scored.pop(key, None) is not None:
                left_out.append((key, seen[key], f"same name without extension as {relative}"))
            continue
        seen[key] = relative
        if mos is None:
            left_out.append((key, relative, f"could not be scored: {error}"))
        else:
            scored[key] = mos
    return scored, left_out


def pairable_without_extension(labels, per_folder, common):
    """Unpaired images that would pair if extensions were ignored.

    Args:
        labels: one label per folder.
        per_folder: one dict per folder, pairing key (relative path) -> MOS.
        common: keys scored in every folder (already paired).

    Returns:
        Tuple of (label, relative path), in folder order then path order.
    """
    stems = [{os.path.splitext(key)[0] for key in scored} for scored in per_folder]
    everywhere = set.intersection(*stems)
    common = set(common)
    return tuple(
        (label, key)
        for label, scored in zip(labels, per_folder)
        for key in sorted(set(scored) - common)
        if os.path.splitext(key)[0] in everywhere
    )


def compare_folders(
    dirs,
    scorer,
    out_dir,
    batch_size=DEFAULT_BATCH_SIZE,
    skip_existing=True,
    progress=True,
    max_bytes=DEFAULT_MAX_BYTES,
    follow_links_outside=False,
    ignore_extension=False,
    n_resamples=DEFAULT_BOOTSTRAP,
    confidence=0.95,
    seed=0,
):
    """Scores two or more folders and compares them image by image.

    Args:
        dirs: two or more folders holding the same images (same relative paths),
            e.g. the outputs of different restoration models.
        scorer: a `kiqa.scoring.scorer.Scorer`.
        out_dir: output folder (created).
        batch_size: images per model call.
        skip_existing: resume the per-folder score CSVs in `out_dir` (False rescores).
            Resuming with another model than the one that wrote them is refused.
        progress: tqdm progress bars.
        max_bytes: per-file byte cap.
        follow_links_outside: follow symbolic links leaving each folder.
        ignore_extension: pair "x.png" with "x.jpg" (relative paths without extension).
        n_resamples: bootstrap resamples.
        confidence: confidence level of the interval.
        seed: bootstrap seed.

    Returns:
        A `CompareResult`.

    Raises:
        ConfigError: fewer than two folders, a bad confidence level or resample count, or `out_dir`
            holds scores of another model (and skip_existing is set).
        DataError: a folder is missing, empty of images, given twice, or no image is
            scored in all folders.
        ModelError: the model rejected a batch.
    """
    folders = _check_folders(dirs, confidence, n_resamples)
    labels = folder_labels(folders)
    out = Path(out_dir)
    # Fixed names in a folder the user picks: never over files kiqa did not put there.
    refuse_foreign_outputs(out, OUTPUT_NAMES, ours=_is_compare_folder(out))
    out.mkdir(parents=True, exist_ok=True)
    _check_same_model(out / MODEL_FILE, scorer, skip_existing)
    files = {}
    per_folder, left_out, summaries = [], [], []
    for folder, label in zip(folders, labels):
        scored, excluded, summary = _score_folder(
            folder, out / f"scores-{label}.csv", scorer, batch_size, skip_existing, progress, max_bytes,
            follow_links_outside, ignore_extension,
        )
        per_folder.append(scored)
        left_out += [(label, relative, reason) for _, relative, reason in excluded]
        summaries.append(summary)
        files[f"scores-{label}"] = str(out / f"scores-{label}.csv")

    common, pairable, n_unpaired = _pair_images(labels, folders, per_folder, left_out, ignore_extension, out, files)
    matrix = np.array([[scored[key] for key in common] for scored in per_folder])  # [folders, images]
    pairs = tuple(
        paired_stats(matrix[i], matrix[j], labels[i], labels[j], n_resamples, confidence, seed)
        for i, j in itertools.combinations(range(len(folders)), 2)
    )
    record = getattr(scorer, "provenance", None)
    for pair in pairs:
        pair["context"] = effect_context(pair["mean_diff"], record)
    ranking = _ranking(labels, folders, matrix) if len(folders) > 2 else None
    spreads = None
    if getattr(scorer, "distribution", False):
        spreads = _predicted_spreads(files, folders, labels, common, ignore_extension)
        pairs = _judge_against_spread(labels, matrix, pairs, spreads)
    _write_tables(out, files, labels, common, matrix, pairs, ranking, provenance.warning_for(record), spreads)
    result = CompareResult(
        out_dir=str(out),
        labels=tuple(labels),
        folders=tuple(folders),
        n_common=len(common),
        pairs=pairs,
        ranking=ranking,
        n_unpaired=n_unpaired,
        n_failed=sum(s.n_failed for s in summaries),
        files=files,
        summaries=tuple(summaries),
        extension_pairable=pairable,
    )
    files["json"] = str(out / "compare.json")
    _write_json(result, scorer, files["json"])
    return result


def _check_folders(dirs, confidence, n_resamples):
    """The folders, normalised, once each checked to exist; the statistics' settings checked."""
    folders = [os.path.normpath(os.fspath(d)) for d in dirs]
    if len(folders) < 2:
        raise ConfigError(f"compare needs at least two folders, got {len(folders)}")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be between 0 and 1, got {confidence}")
    if n_resamples < 1:
        raise ConfigError(f"bootstrap resamples must be at least 1, got {n_resamples}")
    for folder in folders:
        if not os.path.isdir(folder):
            raise DataError(f"{folder} is not a folder; compare takes folders of images with the same names")
    real = [os.path.realpath(f) for f in folders]
    if len(set(real)) < len(real):
        raise DataError(f"the same folder is given twice ({', '.join(folders)}); give different folders")
    return folders


def _score_folder(folder, csv_path, scorer, batch_size, skip_existing, progress, max_bytes,
                  follow_links_outside, ignore_extension):
    """Scores one folder into `csv_path`: (key -> MOS, left-out entries, its ScoreSummary)."""
    files = find_images([folder], follow_links_outside=follow_links_outside)
    if not files:
        raise DataError(f"no image files found in {folder}; check the folder")
    summary = score_files(files, scorer, csv_path, batch_size, skip_existing, progress, max_bytes)
    table = read_scores(csv_path, paths=[path for path, _ in files])
    scored, excluded = _folder_scores(folder, files, table, ignore_extension)
    return scored, excluded, summary


def _pair_images(labels, folders, per_folder, left_out, ignore_extension, out, files):
    """The keys scored in every folder; writes `unpaired.csv` with everything else.

    Returns:
        (sorted common keys, extension-pairable images, number without a counterpart).

    Raises:
        DataError: no image is scored in every folder (with `extension_pairable` set).
    """
    common = sorted(set.intersection(*(set(scored) for scored in per_folder)))
    for label, scored in zip(labels, per_folder):
        for key in sorted(set(scored) - set(common)):
            missing = [other for other, s in zip(labels, per_folder) if key not in s]
            left_out.append((label, key, f"no scored counterpart in {', '.join(missing)}"))
    pairable = () if ignore_extension else pairable_without_extension(labels, per_folder, common)
    unpaired = pd.DataFrame(left_out, columns=["folder", "path", "reason"])
    files["unpaired"] = str(out / "unpaired.csv")
    csv_frame(unpaired).to_csv(files["unpaired"], index=False, errors="surrogateescape")
    if not common:
        examples = "; ".join(
            f"{label}: {min(scored, default='(none scored)')}" for label, scored in zip(labels, per_folder)
        )
        error = DataError(
            f"no image is scored in all of {', '.join(folders)} under the same relative path "
            f"(e.g. {examples}); the folders must hold the same file names"
            + (f" ({len(pairable)} of the unpaired images differ only by their extension, e.g. {pairable[0][0]}: "
               f"{pairable[0][1]})" if pairable else "")
            + f"; see {files['unpaired']}"
        )
        error.extension_pairable = pairable
        raise error
    return common, pairable, int(unpaired["reason"].str.startswith("no scored counterpart").sum())


def effect_context(mean_diff, record):
    """A mean difference beside the model's own error, so a small shift does not read as a finding.

    Args:
        mean_diff: mean MOS difference between two folders (0-100 points).
        record: the model's `kiqa.provenance.Provenance`, or None.

    Returns:
        {"test_rmse": the model's held-out RMSE in MOS points or None when unknown,
        "ratio": |mean_diff| / test_rmse or None, "text": one sentence}.
    """
    rmse = (record.test_metrics or {}).get("rmse") if record is not None else None
    if not rmse:
        return dict(test_rmse=None, ratio=None, text=(
            f"{mean_diff:+.2f} MOS; the model's own test error is unknown (no RMSE in its provenance), "
            f"so the size of this difference cannot be weighed against it"))
    ratio = abs(mean_diff) / rmse
    return dict(test_rmse=float(rmse), ratio=float(ratio), text=(
        f"{mean_diff:+.2f} MOS is {ratio:.2f}x the model's test RMSE ({rmse:.2f} MOS points)"
        + ("; smaller than the model's own error on one image" if ratio < 1 else "")))


def _write_tables(out, files, labels, common, matrix, pairs, ranking, warning=None, spreads=None):
    """Writes per_image.csv, ranking.csv (more than two folders) and compare.png.

    `spreads` (a distribution model's predicted mos_sd, [folders, images]) adds the
    `mos_sd_<label>` columns, and for two folders `diff_in_spreads`.
    """
    per_image = pd.DataFrame({"path": common})
    for label, row in zip(labels, matrix):
        per_image[f"mos_{label}"] = row
    if len(labels) == 2:
        per_image["diff"] = matrix[0] - matrix[1]
    if spreads is not None:
        for label, row in zip(labels, spreads):
            per_image[f"mos_sd_{label}"] = row
        if len(labels) == 2:
            per_image["diff_in_spreads"] = (matrix[0] - matrix[1]) / _pair_spread(spreads[0], spreads[1])
    files["per_image"] = str(out / "per_image.csv")
    csv_frame(per_image).to_csv(files["per_image"], index=False, float_format="%.4f", errors="surrogateescape")
    if ranking is not None:
        files["ranking"] = str(out / "ranking.csv")
        csv_frame(pd.DataFrame(ranking)).to_csv(files["ranking"], index=False, float_format="%.4f",
                                                errors="surrogateescape")
    files["plot"] = str(out / "compare.png")
    if len(labels) == 2:
        _plot_pair(matrix[0], matrix[1], pairs[0], files["plot"], warning)
    else:
        _plot_ranking(labels, matrix, files["plot"], warning)


def _is_compare_folder(out):
    """Whether `out` holds kiqa compare's mark: its MODEL_FILE with a model identity in it."""
    try:
        mark = json.loads((out / MODEL_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(mark, dict) and {"source", "kind", "image_size"} <= set(mark)


def spread_stats(a, b, sd_a, sd_b):
    """Paired differences judged against the predicted spread of people's ratings.

    The spread of one image is the root mean square of its two predicted `mos_sd`s
    (0-100 points): how far apart two raters of the pair typically are. A difference
    smaller than that is one raters would disagree about.

    Args:
        a, b: MOS of the two systems per image.
        sd_a, sd_b: their predicted mos_sd per image.

    Returns:
        dict `mean_spread` (mean per-image spread), `mean_diff_in_spreads` (mean of
        (a - b) / spread) and `beyond_spread_fraction` (share of images whose |a - b|
        exceeds their spread).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    spread = _pair_spread(sd_a, sd_b)
    in_spreads = (a - b) / spread
    return dict(
        mean_spread=float(spread.mean()) if spread.size else None,
        mean_diff_in_spreads=float(in_spreads.mean()) if spread.size else None,
        beyond_spread_fraction=float(np.mean(np.abs(a - b) > spread)) if spread.size else None,
    )


def _pair_spread(sd_a, sd_b):
    """The spread of a pair per image: the root mean square of the two predicted mos_sd
    (kept above zero, so differences can be divided by it)."""
    sd_a, sd_b = np.asarray(sd_a, np.float64), np.asarray(sd_b, np.float64)
    return np.maximum(np.sqrt((sd_a ** 2 + sd_b ** 2) / 2), 1e-9)


def _predicted_spreads(files, folders, labels, common, ignore_extension):
    """A distribution model's mos_sd per folder and paired image, [folders, images], read
    from the folders' score CSVs."""
    spreads = []
    for folder, label in zip(folders, labels):
        table = pd.read_csv(files[f"scores-{label}"], encoding="utf-8", encoding_errors="surrogateescape",
                            keep_default_na=False, na_values=[""], dtype={"path": object})
        by_key = {_pairing_key(os.path.relpath(p, folder), ignore_extension): sd
                  for p, sd in zip(table["path"], table["mos_sd"])}
        spreads.append([float(by_key[key]) for key in common])
    return np.array(spreads)


def _judge_against_spread(labels, matrix, pairs, spreads):
    """Every pair with its `spread_stats` added (distribution models)."""
    judged = []
    for pair in pairs:
        i, j = labels.index(pair["a"]), labels.index(pair["b"])
        judged.append(dict(pair, spread=spread_stats(matrix[i], matrix[j], spreads[i], spreads[j])))
    return tuple(judged)


def _check_same_model(path, scorer, skip_existing):
    """Resumed score CSVs must come from the same model: scores of two models mixed in
    one comparison would look like a difference between the folders."""
    identity = scorer.identity()  # the weights' fingerprint: an export of the same run matches
    if skip_existing and path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, ValueError):
            previous = None
        if not provenance.same_model(previous, identity):
            raise ScoresFromAnotherModelError(
                f"{path.parent} holds scores from another model or image size ({previous}); use a "
                f"new output folder, or rescore everything (skip_existing=False) with {scorer.source}",
                folder=str(path.parent), previous=previous, current=identity,
            )
    write_json_atomically(path, identity)


def _ranking(labels, folders, matrix):
    means = matrix.mean(axis=1)
    order = np.argsort(-means, kind="stable")
    rows = []
    for rank, i in enumerate(order, start=1):
        row = dict(rank=rank, label=labels[i], folder=folders[i], n=int(matrix.shape[1]),
                   mean_mos=float(means[i]), median_mos=float(np.median(matrix[i])))
        others = [j for j in range(len(labels)) if j != i]
        row["mean_win_rate"] = float(np.mean([win_rate(matrix[i], matrix[j]) for j in others]))
        for j in others:
            row[f"win_rate_vs_{labels[j]}"] = win_rate(matrix[i], matrix[j])
        rows.append(row)
    return tuple(rows)


def _plot_pair(a, b, pair, path, warning=None):
    fig = Figure(figsize=(11, 4.8))  # no pyplot: the user's backend is left alone
    scatter, hist = fig.subplots(1, 2)
    low = float(min(a.min(), b.min()))
    high = float(max(a.max(), b.max()))
    margin = max(1.0, 0.05 * (high - low))
    scatter.scatter(a, b, s=14, alpha=0.6)
    line = [low - margin, high + margin]
    scatter.plot(line, line, color="grey", linewidth=1, label="equal MOS")
    scatter.set(xlim=line, ylim=line, xlabel=f"MOS {pair['a']} (0-100)", ylabel=f"MOS {pair['b']} (0-100)",
                title=f"{pair['n']} paired images: {pair['a']} higher on {pair['a_better_fraction']:.0%}")
    legend_off_the_data(scatter, columns=1)
    scatter.grid(alpha=0.3)

    diff = a - b
    hist.hist(diff, bins=min(40, max(5, diff.size // 3)), color="tab:blue", alpha=0.75)
    hist.axvline(0.0, color="grey", linewidth=1)
    hist.axvline(pair["mean_diff"], color="tab:red", linewidth=1.5, label=f"mean {pair['mean_diff']:+.2f}")
    hist.axvspan(pair["ci_low"], pair["ci_high"], color="tab:red", alpha=0.15,
                 label=f"{pair['ci_level']:.0%} CI [{pair['ci_low']:+.2f}, {pair['ci_high']:+.2f}]")
    p_value = pair["wilcoxon"]["p_value"]
    p_text = "n/a" if p_value is None else f"{p_value:.3g}"
    context = pair.get("context") or effect_context(pair["mean_diff"], None)
    hist.set(xlabel=f"MOS {pair['a']} - MOS {pair['b']}", ylabel="images")
    hist.set_title(f"difference per image (Wilcoxon p = {p_text})\n{textwrap.fill(context['text'], 70)}",
                   fontsize=9)
    legend_off_the_data(hist)
    hist.grid(alpha=0.3)
    save_figure(fig, path, warning)


def _plot_ranking(labels, matrix, path, warning=None):
    k = len(labels)
    fig = Figure(figsize=(6 + 1.2 * k, 4.8))
    box, heat = fig.subplots(1, 2)
    box.boxplot(list(matrix), showmeans=True)
    box.set_xticks(range(1, k + 1), labels, rotation=30, ha="right")
    box.set(ylabel="MOS (0-100)", title=f"MOS per folder ({matrix.shape[1]} images in all)")
    box.grid(alpha=0.3)
    rates = np.full((k, k), np.nan)
    for i, j in itertools.permutations(range(k), 2):
        rates[i, j] = win_rate(matrix[i], matrix[j])
    image = heat.imshow(rates, vmin=0.0, vmax=1.0, cmap="RdBu")
    for i, j in itertools.product(range(k), range(k)):
        if i != j:
            heat.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=9)
    heat.set_xticks(range(k), labels, rotation=30, ha="right")
    heat.set_yticks(range(k), labels)
    heat.set(title="win rate of row over column")
    fig.colorbar(image, ax=heat, fraction=0.046)
    save_figure(fig, path, warning)


def _write_json(result, scorer, path):
    data = dict(
        model=provenance.report_entry(
            getattr(scorer, "provenance", None), scorer.source, kind=scorer.kind,
            image_size=list(scorer.image_size),
        ),
        folders=[
            dict(label=label, folder=folder, scores_csv=result.files[f"scores-{label}"],
                 n_files=s.n_files, n_scored=s.n_scored, n_failed=s.n_failed)
            for label, folder, s in zip(result.labels, result.folders, result.summaries)
        ],
        n_common=result.n_common,
        n_unpaired=result.n_unpaired,
        n_failed=result.n_failed,
        difference="first minus second folder of each pair; positive means the first scores higher (better)",
        pairs=list(result.pairs),
        ranking=None if result.ranking is None else list(result.ranking),
        files=result.files,
    )
    write_json_atomically(path, data)
