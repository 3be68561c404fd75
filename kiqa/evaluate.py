"""Evaluating a model on a labelled set: predictions, the field's metrics, plots."""

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import pandas as pd

from kiqa import CallableModule
from kiqa.config import TrainConfig
from kiqa.contract import DIST_OUTPUT, MOS_SCALE, RATING_LEVELS, SD_OUTPUT, SHARE_COLUMNS
from kiqa.data.pipeline import make_dataset
from kiqa.errors import ConfigError, EvaluationExistsError
from kiqa.fsutil import refuse_foreign_outputs, sha256_of, write_csv_atomically, write_json_atomically
from kiqa.metrics import cautions, evaluate_with_confidence
from kiqa.plots import plot_scatter


def predict_paths(model, paths, config, part="test"):
    """Predicted MOS for image files, aligned with `paths`.

    Runs the scorer's forward pass (`kiqa.scoring.scorer.Scorer.predict_pixels`) over the
    evaluation pipeline.

    Args:
        model: a `kiqa.scoring.scorer.Scorer`, or a Keras model with input `image` and output
            `mos` (scored at `config.image_size`).
        paths: image files (checked beforehand).
        config: `TrainConfig` (image_size, batch_size, cache, max_pixels).
        part: name for file caches.

    Returns:
        float64 array aligned with `paths`; NaN where a file failed to decode.
    """
    return predict_path_outputs(model, paths, config, part)["mos"]


def predict_path_outputs(model, paths, config, part="test"):
    """Every output of the model for image files, aligned with `paths` (see `predict_paths`).

    Returns:
        dict `mos` [n] and, for a distribution model, `mos_sd` [n] and `dist` [n, 5];
        NaN rows where a file failed to decode.
    """
    scorer = as_scorer(model, config)
    shapes = {"mos": (), SD_OUTPUT: (), DIST_OUTPUT: (RATING_LEVELS,)} if scorer.distribution else {"mos": ()}
    predictions = {key: np.full((len(paths), *shape), np.nan) for key, shape in shapes.items()}
    if not len(paths):
        return predictions
    dataset = make_dataset(paths, np.zeros(len(paths)), config, training=False, with_index=True, part=part)
    for features, _ in dataset:
        outputs = scorer.predict_outputs(features["image"])
        for key in predictions:
            predictions[key][features["index"].numpy()] = outputs[key]
    return predictions


# What evaluate writes into its output folder; predictions.csv's first line is kiqa's mark.
OUTPUT_NAMES = ("predictions.csv", "metrics.json", "scatter.png")
PREDICTIONS_HEADER = b"image_name,mos,predicted_mos"


def _has_line(path, line):
    """Whether `path` is a file whose first line is `line` (bytes)."""
    try:
        with open(path, "rb") as handle:
            return handle.readline().rstrip(b"\r\n") == line
    except OSError:
        return False


def as_scorer(model, config):
    """`model` if it is a `Scorer`, else a scorer over the Keras model at the config's size."""
    from kiqa.scoring.scorer import Scorer

    if isinstance(model, Scorer):
        return model
    return Scorer.from_keras_model(model, config.image_size, config.max_pixels)


def evaluate_frame(model, frame, config, out_dir=None, title="test set", part="test", warning=None):
    """Predicts a labelled table and scores the predictions.

    Args:
        model: a `kiqa.scoring.scorer.Scorer` or a Keras model (see `predict_paths`).
        frame: label table with `image_name`, `mos` and `path` columns.
        config: `TrainConfig`.
        out_dir: where to write `metrics.json`, `predictions.csv` and `scatter.png`;
            None writes nothing.
        title: plot title.
        part: name for file caches.
        warning: the model's provenance warning, drawn on scatter.png.

    Returns:
        (metrics, predictions): metrics dict (`kiqa.metrics.evaluate_with_confidence`:
        plcc, srcc, krcc, rmse, mae, plcc_logistic4, n, the PLCC/SRCC bootstrap
        intervals seeded with `config.seed`, failed) and a DataFrame image_name, mos,
        predicted_mos.
    """
    outputs = predict_path_outputs(model, frame["path"].tolist(), config, part=part)
    table = pd.DataFrame(
        {"image_name": frame["image_name"], "mos": frame["mos"], "predicted_mos": outputs["mos"]}
    )
    if DIST_OUTPUT in outputs:
        table[f"predicted_{SD_OUTPUT}"] = outputs[SD_OUTPUT]
        for k, name in enumerate(SHARE_COLUMNS):
            table[f"predicted_{name}"] = outputs[DIST_OUTPUT][:, k]
    scored = table.dropna(subset=["predicted_mos"])
    metrics = evaluate_with_confidence(scored["mos"].to_numpy(), scored["predicted_mos"].to_numpy(), seed=config.seed)
    metrics["failed"] = int(len(table) - len(scored))
    judged = _judge_distributions(frame, outputs)
    if judged is not None:
        metrics["distribution"] = judged
    if out_dir is not None:
        out_dir = Path(out_dir)
        # A folder the user names: kiqa's mark is its own predictions.csv header.
        refuse_foreign_outputs(out_dir, OUTPUT_NAMES, ours=_has_line(out_dir / OUTPUT_NAMES[0], PREDICTIONS_HEADER))
        out_dir.mkdir(parents=True, exist_ok=True)
        write_csv_atomically(table, out_dir / "predictions.csv", float_format="%.4f")
        write_json(out_dir / "metrics.json", metrics)
        plot_scatter(scored["mos"], scored["predicted_mos"], metrics, out_dir / "scatter.png", title=title,
                     warning=warning)
        if judged is not None and judged["n"]:
            from kiqa.distribution import plot_reliability

            plot_reliability(judged, out_dir / "reliability.png", title=f"{title}: interval calibration",
                             warning=warning)
    return metrics, table


def _judge_distributions(frame, outputs):
    """`kiqa.distribution.evaluate_distributions` on the scored rows, when the model
    predicts distributions and the labels have c1..c5; else None."""
    from kiqa.distribution import evaluate_distributions, label_shares

    true_shares = label_shares(frame)
    if DIST_OUTPUT not in outputs or true_shares is None:
        return None
    ok = np.isfinite(outputs["mos"]) & np.isfinite(true_shares).all(1)
    return evaluate_distributions(true_shares[ok], frame["mos"].to_numpy()[ok], outputs[DIST_OUTPUT][ok],
                                  outputs[SD_OUTPUT][ok])


def write_json(path, data):
    """Writes JSON with NaN as null (strict JSON readers reject NaN), atomically."""
    write_json_atomically(path, data)


def evaluate(
    model_ref: Union[str, os.PathLike], config: Optional[TrainConfig] = None, part: str = "test",
    out_dir: Optional[Union[str, os.PathLike]] = None, progress: bool = True, engine: str = "tf",
    overwrite: bool = False,
) -> Tuple[dict, Path]:
    """Evaluates a model on its run's test set, or on the labelled set `config` names.

    Args:
        model_ref: any model path `kiqa.load_scorer` takes.
        config: the `TrainConfig` naming the labels, images and split; None takes the
            run's own config.json (a run folder or a `.keras` file in one).
        part: "test", "val", "train" or "all".
        out_dir: where metrics.json, predictions.csv and scatter.png go (default: see
            `evaluate_saved_model`).
        progress: show progress bars.
        engine: what runs the model (see `kiqa.load_scorer`).
        overwrite: replace an evaluation in `out_dir` made with other labels, settings
            or weights (see `evaluate_saved_model`).

    Returns:
        (metrics, out_dir), as `evaluate_saved_model` returns them.

    Raises:
        ConfigError: no config was given and the model has no run config.
        EvaluationExistsError: (a ConfigError) `out_dir` holds another evaluation.
        ModelError: the model cannot be resolved or loaded.
    """
    from kiqa.run import resolve_model

    if config is None:
        config = resolve_model(model_ref).config()
        if config is None:
            raise ConfigError(f"{model_ref} has no run config.json naming its data; pass a TrainConfig")
        config = config.replace(cache="none")
    return evaluate_saved_model(model_ref, config, part=part, out_dir=out_dir, progress=progress, engine=engine,
                                overwrite=overwrite)


def evaluate_saved_model(model_path, config, part="test", out_dir=None, progress=True, labelled=None,
                         safe_mode=True, engine="tf", overwrite=False):
    """Re-evaluates a saved model on a KonIQ-format set or any labelled CSV.

    Writes `metrics.json` (the metrics with their intervals, `cautions`, the `labels`
    read: file, sha256, columns, scale, part, split and seed; the model's provenance and
    weights fingerprint under `model`), `predictions.csv` and `scatter.png`.

    An earlier evaluation is never replaced silently: the default folder is named after
    the label file, the part and a short hash of the label file's contents and the
    settings, and a folder holding an evaluation of other labels, settings or weights is
    refused unless `overwrite`. When the model's run trained or validated on some of the
    evaluated images (its `split.csv`), `overlap` counts them, a caution says so, and
    `held_out` holds the metrics of the other images alone.

    Args:
        model_path: any model path `kiqa.scoring.scorer.load_scorer` takes (run folder, `.keras`
            file, SavedModel or ONNX export).
        config: `TrainConfig` naming the labels, images, split, seed and image size (an
            export is scored at its own size).
        part: "test", "val", "train" or "all" (a plain labelled CSV has no split: "all").
        out_dir: output folder; default `eval-<labels>-<part>-<8 hex digits of the label
            file's sha256 and the settings>` in the run folder, beside a
            bare `.keras` file, or beside an export's base path.
        progress: show progress bars.
        labelled: a `kiqa.data.labelled.LabelledCsv` to evaluate instead of reading
            `config.labels` as a KonIQ file; its images resolve under `config.images`
            (default: the CSV's folder).
        safe_mode: refuse models that can run arbitrary code (see `load_scorer`).
        engine: what runs the model (see `load_scorer`).
        overwrite: replace an evaluation of other labels, settings or weights in `out_dir`.

    Returns:
        (metrics, out_dir): `metrics` is the dict written to metrics.json.

    Raises:
        ConfigError: a part other than "all" for a plain labelled CSV.
        EvaluationExistsError: (a ConfigError) `out_dir` holds another evaluation and
            `overwrite` is False.
    """
    from kiqa.data.koniq import make_splits
    from kiqa.data.validate import apply_bad_image_policy, find_bad_images, load_checked_labels
    from kiqa.provenance import report_entry, warning_for
    from kiqa.run import resolve_model
    from kiqa.scoring.scorer import load_scorer

    resolved = resolve_model(model_path)
    keras_size = config.image_size if resolved.kind == "keras" else None
    scorer = load_scorer(resolved.model, image_size=keras_size, safe_mode=safe_mode, engine=engine)
    # Decode as the model was trained or exported: at its size and pixel cap.
    config = config.replace(image_size=tuple(scorer.image_size), max_pixels=scorer.max_pixels)
    if labelled is not None:
        if part != "all":
            raise ConfigError(f"a plain labelled CSV ({config.labels}) has no split; evaluate it whole (part 'all')")
        root = Path(config.images) if config.images else Path(config.labels).parent
        paths, rejects = find_bad_images(labelled.frame, root, config, progress=progress)
        frame = apply_bad_image_policy(labelled.frame, paths, rejects, config)
    else:
        frame, rejects = load_checked_labels(config, progress=progress)
        if part != "all":
            frame = getattr(make_splits(frame, config)[0], part)
    labels_name = Path(config.labels).stem if config.labels else "demo"
    labels = _labels_record(config, part, labelled)
    identity = scorer.identity()
    if not out_dir:
        out_dir = _default_out_dir(resolved) / f"eval-{labels_name}-{part}-{_settings_tag(labels)}"
    out_dir = Path(out_dir)
    _refuse_another_evaluation(out_dir, labels, identity, overwrite)
    metrics, table = evaluate_frame(scorer, frame, config, out_dir=out_dir, title=f"{labels_name} {part}", part=part,
                                    warning=warning_for(scorer.provenance))
    metrics["rejected"] = int(len(rejects))
    metrics["labels"] = labels
    metrics["cautions"] = cautions(metrics) + metrics.get("distribution", {}).get("cautions", [])
    _report_overlap(metrics, frame, table, resolved, config.seed)
    metrics["model"] = report_entry(scorer.provenance, scorer.source,
                                    **{k: v for k, v in identity.items() if k != "source"},
                                    **scorer.model_facts())
    write_json(out_dir / "metrics.json", metrics)
    return metrics, out_dir


def _labels_record(config, part, labelled):
    """What metrics.json says about the labels: enough to tell two evaluations apart."""
    record = dict(
        file=str(config.labels) if config.labels else "demo",
        sha256=sha256_of(config.labels) if config.labels else None,
        part=part,
        scores=labelled.describe() if labelled is not None else "KonIQ 0-100 MOS",
        notes=list(labelled.notes) if labelled is not None else [],
    )
    if labelled is not None:
        record.update(columns=[labelled.path_column, labelled.mos_column],
                      scale=[labelled.scale.low, labelled.scale.high])
    else:
        columns = list(pd.read_csv(config.labels, nrows=0).columns) if config.labels else ["image_name", "mos"]
        record.update(columns=columns, scale=[0.0, MOS_SCALE], split=config.split, seed=config.seed)
    return record


def _settings_tag(labels):
    """8 hex digits naming a label file's contents and the settings it was read with."""
    keys = ("file", "sha256", "part", "columns", "scale", "split", "seed")
    text = json.dumps({k: labels.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _refuse_another_evaluation(out_dir, labels, identity, overwrite):
    """An evaluation folder holds one evaluation: the same labels, settings and weights
    may be redone (same result), anything else replaces it only when asked."""
    from kiqa.provenance import same_model

    try:
        previous = json.loads((out_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return
    if overwrite or not isinstance(previous, dict):
        return
    before = previous.get("labels") or {}
    keys = ("sha256", "part", "columns", "scale", "split", "seed")
    same_labels = all(before.get(k) == labels.get(k) for k in keys)
    if same_labels and same_model(previous.get("model"), identity):
        return
    what = "the labels or settings" if not same_labels else "the model's weights"
    raise EvaluationExistsError(
        f"{out_dir} holds an evaluation of {before.get('file', 'unknown labels')} (part "
        f"{before.get('part')}) whose {what} differ from this one; it is left untouched. "
        f"Write to another folder, or replace it (overwrite=True)",
        out_dir=str(out_dir), previous={"labels": before, "model": previous.get("model")},
        current={"labels": labels, "model": identity},
    )


def run_parts(run_config, split_csv):
    """Which images a run trained and validated on, by real path, from its `split.csv`.

    Args:
        run_config: the run's `TrainConfig` (its labels and image folder).
        split_csv: the run's `split.csv` (image_name, mos, part).

    Returns:
        dict real path -> part ("train", "val" or "test"); empty when unreadable.
    """
    from kiqa.data import koniq, synthetic

    labels = Path(run_config.labels) if run_config.labels else synthetic.default_demo_dir() / "labels.csv"
    root = Path(run_config.images) if run_config.images else koniq.default_image_root(labels)
    try:
        split = pd.read_csv(split_csv, usecols=["image_name", "part"])
    except (OSError, ValueError):
        return {}
    return {os.path.realpath(root / name): part for name, part in zip(split["image_name"], split["part"])}


def _report_overlap(metrics, frame, table, resolved, seed):
    """Counts evaluated images the run trained or validated on; scores the rest alone."""
    run = resolved.run
    run_config = resolved.config() if run is not None else None
    split_csv = Path(run.path) / "split.csv" if run is not None else None
    if run_config is None or split_csv is None or not split_csv.is_file():
        return
    parts = run_parts(run_config, split_csv)
    seen = np.array([parts.get(os.path.realpath(p)) for p in frame["path"]], dtype=object)
    counts = {name: int((seen == name).sum()) for name in ("train", "val")}
    held_out = ~np.isin(seen, ["train", "val"])
    counts["held_out"] = int(held_out.sum())
    metrics["overlap"] = counts
    if not counts["train"] and not counts["val"]:
        return
    kept = table[held_out].dropna(subset=["predicted_mos"])
    metrics["held_out"] = (
        evaluate_with_confidence(kept["mos"].to_numpy(), kept["predicted_mos"].to_numpy(), seed=seed)
        if len(kept) >= 3 else None
    )
    metrics["cautions"].insert(0, (
        f"{counts['train']} of these images trained the model and {counts['val']} chose its "
        f"best epoch (its run's split.csv); only {counts['held_out']} are held out, and the "
        f"metrics over all of them overstate what it does on new photos (see 'held_out')"
    ))


def _default_out_dir(resolved):
    if resolved.run is not None:
        return resolved.run.path
    if resolved.kind == "keras":
        return resolved.model.parent
    # Beside the export's base path: TF Serving watches the base path itself.
    return resolved.version_dir.parent.parent


# `kiqa.evaluate(...)` calls `evaluate` above: the module is also the public function (kiqa/__init__.py).
sys.modules[__name__].__class__ = CallableModule
