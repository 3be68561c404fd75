"""What the notebooks call beside `import kiqa`: summaries, figures and the helpers they use.

The notebooks import only `kiqa` and this package (`from kiqa import notebook as nb`):

- `kiqa.notebook.labels`: figures and tables of a label set (bands, splits, samples);
- `kiqa.notebook.runs`: training or loading a run, and the tables and figures of its results;
- `kiqa.notebook.figures`: image grids and first-layer kernels;
- `kiqa.notebook.serving`: comparing the ways of scoring;
- re-exported from the library: KonIQ label reading and splits, the demo data, and
  (loaded on first use) the model, export, serving and scoring helpers.

Importing this package loads pandas, SciPy and matplotlib, not TensorFlow.
"""

from kiqa import load_lazy
from kiqa.data.koniq import default_image_root, official_split, random_split, read_labels, resolve_image_path
from kiqa.data.synthetic import demo_dataset
from kiqa.notebook.figures import first_conv_kernels, kernel_grid, plot_image_grid, plot_kernels, plot_quality_maps
from kiqa.notebook.labels import (
    BAND_EDGES,
    BAND_NAMES,
    band_labels,
    images_available,
    label_summary,
    labels_or_demo,
    plot_mos_histogram,
    plot_sd_vs_mos,
    plot_split_distributions,
    quality_bands,
    sample_by_band,
    split_table,
    spread_by_mos,
    subset_labels,
)
from kiqa.notebook.runs import (
    METRIC_LABELS,
    RunFiles,
    best_and_worst,
    load_run,
    metrics_table,
    plot_residuals_by_band,
    prediction_captions,
    residuals_by_band,
    run_image_root,
    train_or_load,
)
from kiqa.errors import RunExistsError
from kiqa.notebook.serving import score_differences

# Names that load TensorFlow: imported on first access (PEP 562).
_LAZY = {
    "caveats": ("kiqa.train", "caveats"),
    "load_model": ("kiqa.model", "load_model"),
    "DevServer": ("kiqa.serving.devserver", "DevServer"),
    "PARITY_TOLERANCE": ("kiqa.serving.export", "PARITY_TOLERANCE"),
    "read_export_metadata": ("kiqa.serving.savedmodel", "read_export_metadata"),
    "read_image_bytes": ("kiqa.image", "read_image_bytes"),
    "load_image": ("kiqa.image", "load_image"),
    "find_images": ("kiqa.scoring.files", "find_images"),
    "ServingClient": ("kiqa.serving.client", "ServingClient"),
    "rest_predict": ("kiqa.serving.client", "rest_predict"),
    "wait_until_available": ("kiqa.serving.client", "wait_until_available"),
}

__all__ = [
    "BAND_EDGES",
    "BAND_NAMES",
    "METRIC_LABELS",
    "RunExistsError",
    "RunFiles",
    "band_labels",
    "best_and_worst",
    "default_image_root",
    "demo_dataset",
    "first_conv_kernels",
    "images_available",
    "kernel_grid",
    "label_summary",
    "labels_or_demo",
    "load_run",
    "metrics_table",
    "official_split",
    "plot_image_grid",
    "plot_kernels",
    "plot_mos_histogram",
    "plot_quality_maps",
    "plot_residuals_by_band",
    "plot_sd_vs_mos",
    "plot_split_distributions",
    "prediction_captions",
    "quality_bands",
    "random_split",
    "read_labels",
    "residuals_by_band",
    "resolve_image_path",
    "run_image_root",
    "sample_by_band",
    "score_differences",
    "split_table",
    "spread_by_mos",
    "subset_labels",
    "train_or_load",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        return load_lazy(globals(), _LAZY, name)
    raise AttributeError(f"module 'kiqa.notebook' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
