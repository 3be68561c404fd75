"""Training or loading a run for a notebook, and the figures and tables of its results."""

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from kiqa.config import TrainConfig
from kiqa.data import koniq
from kiqa.errors import DataError, RunExistsError
from kiqa.notebook.labels import band_labels, quality_bands
from kiqa.run import RunDir


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
        RunExistsError: (a ConfigError) the run directory holds a finished run with
            another config; `changed` names the fields that differ.
        kiqa.errors.KiqaError: whatever training raises.
    """
    from kiqa.train import TrainResult, train

    run = RunDir(config.resolved_run_dir)
    if not overwrite and run.metrics_path.is_file() and run.config_path.is_file():
        previous = run.config()
        if previous != config:
            changed = config.changed_keys(previous)
            raise RunExistsError(
                f"{run.path} holds a finished run with other settings (changed: {changed})",
                run_dir=run.path, changed=changed,
            )
        rejects_csv = run.path / "rejects.csv"
        rejects = pd.read_csv(rejects_csv) if rejects_csv.is_file() else pd.DataFrame()
        return TrainResult(
            run.path, json.loads(run.metrics_path.read_text()),
            run.model_path if run.model_path.is_file() else None, rejects,
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
    run = RunDir(run_dir)
    needed = (run.config_path, run.metrics_path, run.predictions_path, run.model_path)
    missing = [path.name for path in needed if not path.is_file()]
    if missing:
        raise DataError(
            f"{run.path} is not a finished training run (missing {missing}); `kiqa train` "
            "or notebook 02 writes one"
        )
    return RunFiles(
        run_dir=run.path,
        config=run.config(),
        metrics=json.loads(run.metrics_path.read_text()),
        history=pd.read_csv(run.history_path) if run.history_path.is_file() else None,
        predictions=pd.read_csv(run.predictions_path, dtype={"image_name": object}),
        model_path=run.model_path,
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
