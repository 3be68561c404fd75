"""kiqa.plots: figures that show scores carry the provenance warning; axes that do not mislead."""

import pandas as pd
from PIL import Image

from kiqa import plots
from kiqa.provenance import UNKNOWN_WARNING


def test_loss_png_has_a_fixed_correlation_axis_a_best_epoch_and_the_warning(tmp_path, monkeypatch):
    # Issue 20.8: auto-scaled to 0.03-0.13, a flat validation SRCC looked like a climb.
    history = pd.DataFrame({"epoch": [0, 1, 2], "loss": [0.3, 0.2, 0.1], "val_loss": [0.2, 0.1, 0.15],
                            "val_srcc": [0.03, 0.13, 0.08], "val_plcc": [0.05, 0.1, 0.07]})
    figures = []
    original = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, warning=None: figures.append(fig) or original(fig, path, warning))
    path = plots.plot_history(history, tmp_path / "loss.png", warning=UNKNOWN_WARNING, best_epoch=1)
    loss_ax, corr_ax = figures[0].axes
    assert corr_ax.get_ylim() == (-1.0, 1.0)
    for ax in (loss_ax, corr_ax):
        assert any(list(line.get_xdata()) == [2, 2] for line in ax.get_lines())  # epoch 2 (1-based)
        assert "best epoch (2)" in [t.get_text() for t in ax.get_legend().get_texts()][-1]
        assert ax.get_legend().get_bbox_to_anchor().y0 < ax.get_window_extent().y0  # below the axes
    assert Image.open(path).text[plots.WARNING_KEY] == UNKNOWN_WARNING
    assert any("unknown provenance" in t.get_text() for t in figures[0].texts)  # drawn, not only stored


def test_scatter_png_carries_the_warning_only_when_there_is_one(tmp_path):
    metrics = {"plcc": 0.1, "srcc": 0.1, "rmse": 20.0, "n": 3}
    plots.plot_scatter([10, 50, 90], [40, 50, 60], metrics, tmp_path / "a.png", warning=UNKNOWN_WARNING)
    plots.plot_scatter([10, 50, 90], [40, 50, 60], metrics, tmp_path / "b.png")
    assert Image.open(tmp_path / "a.png").text[plots.WARNING_KEY] == UNKNOWN_WARNING
    assert Image.open(tmp_path / "b.png").text[plots.WARNING_KEY] == "none"
