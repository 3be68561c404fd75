"""PNG plots people would rather see than read: learning curves and predicted-vs-true.

Figures are `matplotlib.figure.Figure` objects made without pyplot: saving one renders
with Agg, headless, and the user's backend (a notebook's, a GUI's) is left as it was.
"""

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kiqa.contract import MOS_SCALE


def plot_history(history, path, title="Training"):
    """Loss curves (and validation PLCC/SRCC when logged) per epoch.

    Args:
        history: DataFrame with an `epoch` column and Keras log columns
            (`loss`, `val_loss`, `val_srcc`, `val_plcc`).
        path: PNG file to write.
        title: figure title.

    Returns:
        `path`.
    """
    correlations = [c for c in ("val_srcc", "val_plcc") if c in history.columns]
    fig = Figure(figsize=(11 if correlations else 6, 4))
    axes = fig.subplots(1, 2 if correlations else 1, squeeze=False)
    epochs = history["epoch"] + 1
    loss_ax = axes[0][0]
    for column, label in (("loss", "training"), ("val_loss", "validation")):
        if column in history.columns:
            loss_ax.plot(epochs, history[column], marker="o", label=label)
    loss_ax.set(xlabel="epoch", ylabel="MSE on MOS/100", title="loss")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    if correlations:
        corr_ax = axes[0][1]
        for column in correlations:
            corr_ax.plot(epochs, history[column], marker="o", label=f"validation {column[4:].upper()}")
        corr_ax.set(xlabel="epoch", ylabel="correlation", title="validation PLCC / SRCC")
        corr_ax.legend()
        corr_ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_scatter(y_true, y_pred, metrics, path, title="Predicted vs true MOS"):
    """Predicted against true MOS with the identity line and the metrics in the title.

    Args:
        y_true: true MOS, 0-100.
        y_pred: predicted MOS, 0-100.
        metrics: dict from `kiqa.metrics.evaluate_scores`.
        path: PNG file to write.
        title: first title line.

    Returns:
        `path`.
    """
    fig = Figure(figsize=(5.5, 5.5))
    ax = fig.subplots()
    ax.scatter(y_true, y_pred, s=12, alpha=0.6, edgecolors="none")
    low = float(min(np.min(y_true), np.min(y_pred), 0))
    high = float(max(np.max(y_true), np.max(y_pred), MOS_SCALE))
    ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1, label="y = x")
    ax.set(xlabel="true MOS (0-100)", ylabel="predicted MOS (0-100)", xlim=(low, high), ylim=(low, high))
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.set_title(
        f"{title}\nPLCC {metrics['plcc']:.3f}  SRCC {metrics['srcc']:.3f}  "
        f"RMSE {metrics['rmse']:.2f}  n={metrics['n']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_repeats(table, path, metrics=("plcc", "srcc", "krcc")):
    """Box plot of correlation metrics over repeated random splits.

    Args:
        table: DataFrame with one row per split and a column per metric.
        path: PNG file to write.
        metrics: columns to show.

    Returns:
        `path`.
    """
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    columns = [m for m in metrics if m in table.columns]
    ax.boxplot([table[m].dropna() for m in columns], tick_labels=[m.upper() for m in columns])
    ax.set(ylabel="test correlation", title=f"{len(table)} seeded splits")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
