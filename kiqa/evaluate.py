"""Evaluating a model on a labelled set: predictions, the field's metrics, plots."""

import os
import sys
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import pandas as pd

from kiqa import CallableModule
from kiqa.config import TrainConfig
from kiqa.data.pipeline import make_dataset
from kiqa.errors import ConfigError
from kiqa.fsutil import write_csv_atomically, write_json_atomically
from kiqa.metrics import cautions, evaluate_with_confidence
from kiqa.plots import plot_scatter


def predict_paths(model, paths, config, part="test"):
    """Predicted MOS for image files, aligned with `paths`.

    Runs the scorer's forward pass (`kiqa.scorer.Scorer.predict_pixels`) over the
    evaluation pipeline.

    Args:
        model: a `kiqa.scorer.Scorer`, or a Keras model with input `image` and output
            `mos` (scored at `config.image_size`).
        paths: image files (checked beforehand).
        config: `TrainConfig` (image_size, batch_size, cache, max_pixels).
        part: name for file caches.

    Returns:
        float64 array aligned with `paths`; NaN where a file failed to decode.
    """
    predictions = np.full(len(paths), np.nan)
    if not len(paths):
        return predictions
    scorer = as_scorer(model, config)
    dataset = make_dataset(paths, np.zeros(len(paths)), config, training=False, with_index=True, part=part)
    for features, _ in dataset:
        predictions[features["index"].numpy()] = scorer.predict_pixels(features["image"])
    return predictions


def as_scorer(model, config):
    """`model` if it is a `Scorer`, else a scorer over the Keras model at the config's size."""
    from kiqa.scorer import Scorer

    if isinstance(model, Scorer):
        return model
    return Scorer.from_keras_model(model, config.image_size, config.max_pixels)


def evaluate_frame(model, frame, config, out_dir=None, title="test set", part="test"):
    """Predicts a labelled table and scores the predictions.

    Args:
        model: a `kiqa.scorer.Scorer` or a Keras model (see `predict_paths`).
        frame: label table with `image_name`, `mos` and `path` columns.
        config: `TrainConfig`.
        out_dir: where to write `metrics.json`, `predictions.csv` and `scatter.png`;
            None writes nothing.
        title: plot title.
        part: name for file caches.

    Returns:
        (metrics, predictions): metrics dict (`kiqa.metrics.evaluate_with_confidence`:
        plcc, srcc, krcc, rmse, mae, plcc_logistic4, n, the PLCC/SRCC bootstrap
        intervals seeded with `config.seed`, failed) and a DataFrame image_name, mos,
        predicted_mos.
    """
    predicted = predict_paths(model, frame["path"].tolist(), config, part=part)
    table = pd.DataFrame(
        {"image_name": frame["image_name"], "mos": frame["mos"], "predicted_mos": predicted}
    )
    scored = table.dropna(subset=["predicted_mos"])
    metrics = evaluate_with_confidence(scored["mos"].to_numpy(), scored["predicted_mos"].to_numpy(), seed=config.seed)
    metrics["failed"] = int(len(table) - len(scored))
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_csv_atomically(table, out_dir / "predictions.csv", float_format="%.4f")
        write_json(out_dir / "metrics.json", metrics)
        plot_scatter(scored["mos"], scored["predicted_mos"], metrics, out_dir / "scatter.png", title=title)
    return metrics, table


def write_json(path, data):
    """Writes JSON with NaN as null (strict JSON readers reject NaN), atomically."""
    write_json_atomically(path, data)


def evaluate(
    model_ref: Union[str, os.PathLike], config: Optional[TrainConfig] = None, part: str = "test",
    out_dir: Optional[Union[str, os.PathLike]] = None, progress: bool = True, engine: str = "tf",
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

    Returns:
        (metrics, out_dir), as `evaluate_saved_model` returns them.

    Raises:
        ConfigError: no config was given and the model has no run config.
        ModelError: the model cannot be resolved or loaded.
    """
    from kiqa.run import resolve_model

    if config is None:
        config = resolve_model(model_ref).config()
        if config is None:
            raise ConfigError(f"{model_ref} has no run config.json naming its data; pass a TrainConfig")
        config = config.replace(cache="none")
    return evaluate_saved_model(model_ref, config, part=part, out_dir=out_dir, progress=progress, engine=engine)


def evaluate_saved_model(model_path, config, part="test", out_dir=None, progress=True, labelled=None,
                         safe_mode=True, engine="tf"):
    """Re-evaluates a saved model on a KonIQ-format set or any labelled CSV.

    Writes `metrics.json` (the metrics with their intervals, `cautions`, the `labels`
    read and the model's provenance under `model`), `predictions.csv` and `scatter.png`.

    Args:
        model_path: any model path `kiqa.scorer.load_scorer` takes (run folder, `.keras`
            file, SavedModel or ONNX export).
        config: `TrainConfig` naming the labels, images, split, seed and image size (an
            export is scored at its own size).
        part: "test", "val", "train" or "all" (a plain labelled CSV has no split: "all").
        out_dir: output folder; default `eval-<labels>-<part>` in the run folder, beside a
            bare `.keras` file, or beside an export's base path.
        progress: show progress bars.
        labelled: a `kiqa.data.labelled.LabelledCsv` to evaluate instead of reading
            `config.labels` as a KonIQ file; its images resolve under `config.images`
            (default: the CSV's folder).
        safe_mode: refuse models that can run arbitrary code (see `load_scorer`).
        engine: what runs the model (see `load_scorer`).

    Returns:
        (metrics, out_dir): `metrics` is the dict written to metrics.json.

    Raises:
        ConfigError: a part other than "all" for a plain labelled CSV.
    """
    from kiqa.data.koniq import make_splits
    from kiqa.data.validate import apply_bad_image_policy, find_bad_images, load_checked_labels
    from kiqa.provenance import report_entry
    from kiqa.run import resolve_model
    from kiqa.scorer import load_scorer

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
    out_dir = Path(out_dir) if out_dir else _default_out_dir(resolved) / f"eval-{labels_name}-{part}"
    metrics, _ = evaluate_frame(scorer, frame, config, out_dir=out_dir, title=f"{labels_name} {part}", part=part)
    metrics["rejected"] = int(len(rejects))
    metrics["labels"] = dict(
        file=str(config.labels) if config.labels else "demo",
        part=part,
        scores=labelled.describe() if labelled is not None else "KonIQ 0-100 MOS",
        notes=list(labelled.notes) if labelled is not None else [],
    )
    metrics["cautions"] = cautions(metrics)
    metrics["model"] = report_entry(scorer.provenance, scorer.source, **scorer.model_facts())
    write_json(out_dir / "metrics.json", metrics)
    return metrics, out_dir


def _default_out_dir(resolved):
    if resolved.run is not None:
        return resolved.run.path
    if resolved.kind == "keras":
        return resolved.model.parent
    # Beside the export's base path: TF Serving watches the base path itself.
    return resolved.version_dir.parent.parent


# `kiqa.evaluate(...)` calls `evaluate` above: the module is also the public function (kiqa/__init__.py).
sys.modules[__name__].__class__ = CallableModule
