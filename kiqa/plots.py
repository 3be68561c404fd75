"""PNG plots people would rather see than read: learning curves and predicted-vs-true.

Figures are `matplotlib.figure.Figure` objects made without pyplot: saving one renders
with Agg, headless, and the user's backend (a notebook's, a GUI's) is left as it was.
"""

import textwrap

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kiqa.contract import MOS_SCALE

# The PNG text key holding the provenance warning (besides the drawn one).
WARNING_KEY = "kiqa warning"
_WRAP = 150  # characters per line of the drawn warning at the figures' widths


def save_figure(fig, path, warning=None):
    """Lays out and saves a figure that shows scores, with the model's provenance warning.

    A figure shared alone must not read as a finding when the model's scores mean nothing:
    the warning is drawn across the bottom of the figure (and kept in the PNG's text
    chunk under `WARNING_KEY`). Every kiqa figure that shows scores is saved through here.

    Args:
        fig: a `matplotlib.figure.Figure` without pyplot.
        path: PNG file to write, or None to only add the warning (a notebook shows `fig`).
        warning: `kiqa.provenance.warning_for(record)`: the sentence, or None when the
            model's scores are meaningful.

    Returns:
        `path`.
    """
    bottom = 0.0
    if warning:
        wrapped = textwrap.fill(f"warning: {warning}", _WRAP * fig.get_figwidth() / 11)
        lines = wrapped.count("\n") + 1
        bottom = min(0.4, (lines * 0.17 + 0.1) / fig.get_figheight())
        fig.text(0.01, 0.01, wrapped, ha="left", va="bottom", fontsize=7.5, color="darkred")
    if fig.get_layout_engine() is None:
        fig.tight_layout(rect=(0, bottom, 1, 1))
    elif warning:
        fig.get_layout_engine().set(rect=(0, bottom, 1, 1 - bottom / 4))
    if path is not None:
        fig.savefig(path, dpi=110, metadata={WARNING_KEY: warning or "none"})
    return path


def legend_off_the_data(ax, columns=2):
    """A legend below the axes, where it hides no point, band or line."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=columns, fontsize=8, frameon=False)


def plot_history(history, path, title="Training", warning=None, best_epoch=None):
    """Loss curves (and validation PLCC/SRCC when logged) per epoch.

    The correlation panel spans the whole [-1, 1] range: auto-scaled, a flat line at
    0.03-0.13 looks like a climb.

    Args:
        history: DataFrame with an `epoch` column and Keras log columns
            (`loss`, `val_loss`, `val_srcc`, `val_plcc`).
        path: PNG file to write.
        title: figure title.
        warning: the model's provenance warning, drawn on the figure (`save_figure`).
        best_epoch: 0-based epoch whose weights were kept, marked on both panels.

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
    loss_ax.grid(alpha=0.3)
    if correlations:
        corr_ax = axes[0][1]
        for column in correlations:
            corr_ax.plot(epochs, history[column], marker="o", label=f"validation {column[4:].upper()}")
        corr_ax.axhline(0.0, color="grey", linewidth=1)
        corr_ax.set(xlabel="epoch", ylabel="correlation", title="validation PLCC / SRCC", ylim=(-1.0, 1.0))
        corr_ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        if best_epoch is not None:
            ax.axvline(best_epoch + 1, color="tab:green", linestyle=":", linewidth=1.5,
                       label=f"best epoch ({best_epoch + 1}), kept")
        legend_off_the_data(ax)
    fig.suptitle(title)
    return save_figure(fig, path, warning)


def plot_scatter(y_true, y_pred, metrics, path, title="Predicted vs true MOS", warning=None):
    """Predicted against true MOS with the identity line and the metrics in the title.

    Args:
        y_true: true MOS, 0-100.
        y_pred: predicted MOS, 0-100.
        metrics: dict from `kiqa.metrics.evaluate_scores`.
        path: PNG file to write.
        title: first title line.
        warning: the model's provenance warning, drawn on the figure (`save_figure`).

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
    return save_figure(fig, path, warning)


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
