"""Executes every notebook headless (nbclient) with small parameters and checks what it made.

Each notebook runs in a temporary working directory, with its `parameters` cell's defaults
followed by the test's values (what papermill's injected cell does). The kernel is this
interpreter: a kernelspec written to a temporary JUPYTER_PATH runs `sys.executable`, so the
test never picks up some other `python` on PATH.

Notebook 02 trains the small CNN (`BACKBONE = "small-cnn"`, weights "none") on 40 demo images
at 32x32 for one epoch; notebooks 03 and 04 read that run, as they do after 02 in real use.
ConvNeXt-Tiny trains through the same `kiqa.train.train` in tests/test_cli.py's `kiqa-train`
run; here it took another minute of the default run (docs/architecture.md).
"""

import ast
import base64
import http.server
import io
import json
import sys
import threading

import nbformat
import numpy as np
import pandas as pd
import pytest
from nbclient import NotebookClient
from PIL import Image

from conftest import PROJECT_ROOT
from helpers import send_json
from kiqa import notebook as nb_lib
from kiqa.data import koniq, synthetic
from kiqa.model import SMALL_CNN_VARIANT

NOTEBOOKS = PROJECT_ROOT / "notebooks"
NAMES = (
    "01_explore_koniq.ipynb",
    "02_train_and_evaluate.ipynb",
    "03_what_the_model_sees.ipynb",
    "04_serving.ipynb",
)
KERNEL = "kiqa-test-python"
CELL_TIMEOUT = 900  # seconds per cell: a bound for a loaded 2-core machine, not a target
TRAIN_IMAGES = 40


# ----------------------------------------------------------------------------- helpers


def read_notebook(name):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged 'parameters', found {len(cells)}"
    return cells[0]


def parameter_names(cell):
    return {target.id for node in ast.parse(cell.source).body for target in node.targets}


def run_notebook(name, workdir, **parameters):
    """Executes a notebook in `workdir` with `parameters` overriding its defaults."""
    nb = read_notebook(name)
    cell = parameters_cell(nb)
    unknown = set(parameters) - parameter_names(cell)
    assert not unknown, f"{name} has no parameters {sorted(unknown)}"
    injected = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    cell.source = f"{cell.source}\n\n# injected by tests/test_notebooks.py\n{injected}\n"
    workdir.mkdir(parents=True, exist_ok=True)
    client = NotebookClient(
        nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(workdir)}}
    )
    try:
        client.execute()
    finally:
        nbformat.write(nb, workdir / f"executed-{name}")  # kept for reading a failure
    return nb


def outputs(nb, cell_id=None):
    cells = [c for c in nb.cells if c.cell_type == "code" and (cell_id is None or c.id == cell_id)]
    assert cells, f"no code cell {cell_id!r}"
    return [out for cell in cells for out in cell.outputs]


def printed(nb, cell_id=None):
    return "".join(out.text for out in outputs(nb, cell_id) if out.output_type == "stream")


def figures(nb, cell_id=None):
    """The PNG images a notebook (or one cell) displayed, decoded."""
    found = []
    for out in outputs(nb, cell_id):
        data = out.get("data", {})
        if "image/png" in data:
            found.append(Image.open(io.BytesIO(base64.b64decode(data["image/png"]))))
    return found


def png(path):
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        return image.size


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def kernel_and_demo_home(tmp_path_factory):
    """A kernelspec running this interpreter, and a small demo data set as KIQA_HOME.

    The demo data (1 crop per photo: 8 x 16 = 128 images) stands in for the default 512 so that
    notebooks given `LABELS = None` stay quick; kiqa finds it through KIQA_HOME.
    """
    root = tmp_path_factory.mktemp("notebook-env")
    spec_dir = root / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "kiqa tests",
        "language": "python",
    }))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(root / "jupyter"))
        patch.setenv("KIQA_HOME", str(root / "kiqa-home"))
        patch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
        synthetic.write_demo_dataset(synthetic.default_demo_dir(), crops_per_photo=1)
        yield root


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Notebook 02 run once with tiny settings; notebooks 03 and 04 read its run."""
    workdir = tmp_path_factory.mktemp("nb02")
    nb = run_notebook(
        NAMES[1], workdir, LABELS=None, MAX_IMAGES=TRAIN_IMAGES, IMAGE_SIZE=(32, 32), EPOCHS=1,
        BATCH_SIZE=16, WEIGHTS="none", BACKBONE="small-cnn", RUN_DIR="runs/tiny",
    )
    return nb, workdir / "runs" / "tiny"


# ----------------------------------------------------------------------------- static


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_clean_with_one_parameters_cell(name):
    nb = read_notebook(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: cell {cell.id} has outputs"
    params = parameters_cell(nb)
    # papermill reads the defaults from plain assignments, one name each.
    assert all(isinstance(node, ast.Assign) and len(node.targets) == 1 for node in ast.parse(params.source).body)
    assert nb.cells.index(params) <= 1, "the parameters cell comes first (after the title)"
    # Logic lives in kiqa/: no cell longer than a screen.
    assert max(len(c.source.splitlines()) for c in nb.cells if c.cell_type == "code") <= 30


@pytest.mark.parametrize("name", NAMES)
def test_notebook_imports_only_kiqa_and_kiqa_notebook(name):
    source = "\n".join(c.source for c in read_notebook(name).cells if c.cell_type == "code")
    # IPython magics (%matplotlib) are not Python.
    tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith("%")))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module)
    assert {m for m in modules if m.split(".")[0] == "kiqa"} <= {"kiqa"}, modules
    assert all(m in ("kiqa", "pathlib", "json", "numpy", "pandas", "IPython.display") for m in modules), modules


# ----------------------------------------------------------------------------- 01


def test_explore_notebook_in_a_fresh_clone_falls_back_to_the_demo_data(tmp_path):
    """The default LABELS (the shared reference copy) is absent, as in a fresh clone (issue 15, item 7)."""
    default = parameters_cell(read_notebook(NAMES[0])).source.split("LABELS = ")[1].splitlines()[0].strip('"')
    assert not (tmp_path / default).exists()  # the notebook runs in tmp_path, where nothing is shared
    nb = run_notebook(NAMES[0], tmp_path, OUT_DIR="out", IMAGES_PER_BAND=3)
    assert f"no label file at {default}" in printed(nb) and "showing kiqa's built-in demo data" in printed(nb)
    out = tmp_path / "out"
    labels = pd.read_csv(synthetic.default_demo_dir() / "labels.csv")

    summary = pd.read_csv(out / "label_summary.csv", index_col=0)
    assert summary.loc["mos", "count"] == len(labels) == len(synthetic.PHOTOS) * (1 + 3 * synthetic.LEVELS)
    assert summary.loc["mos", "mean"] == pytest.approx(labels["MOS_zscore"].mean())

    splits = pd.read_csv(out / "split_statistics.csv")
    assert splits["split"].unique().tolist() == ["random-seed0"]  # no set column: no official split
    assert splits["n"].sum() == len(labels)
    assert "no official split" in printed(nb, "split-table")

    sample = pd.read_csv(out / "band_sample.csv")
    assert sample.groupby("band").size().max() <= 3
    assert sample["band"].tolist() == list(nb_lib.quality_bands(sample["mos"]))
    assert set(sample["image_name"]) <= set(labels["image_name"])

    for name in ("mos_histogram", "sd_vs_mos", "split_distributions", "images_by_band"):
        width, height = png(out / f"{name}.png")
        assert width > 300 and height > 200
    assert len(figures(nb)) == 4


def test_explore_notebook_on_the_real_koniq_labels(tmp_path, koniq_csv):
    nb = run_notebook(NAMES[0], tmp_path, LABELS=str(koniq_csv), OUT_DIR="out", IMAGES_PER_BAND=2)
    out = tmp_path / "out"
    raw = pd.read_csv(koniq_csv)

    summary = pd.read_csv(out / "label_summary.csv", index_col=0)
    assert summary.loc["mos", "count"] == len(raw)
    assert summary.loc["mos", "mean"] == pytest.approx(raw["MOS"].mean())
    assert summary.loc["votes", "min"] == raw["c_total"].min()

    splits = pd.read_csv(out / "split_statistics.csv").set_index(["split", "part"])
    official = splits.loc["official", "n"].to_dict()
    counts = raw["set"].value_counts()
    assert official == {"train": counts["training"], "val": counts["validation"], "test": counts["test"]}
    assert splits.loc["random-seed0", "n"].sum() == len(raw)
    assert splits.loc[("random-seed0", "test"), "n"] == round(0.2 * len(raw))
    test_mos = raw.loc[raw["set"] == "test", "MOS"]
    assert splits.loc[("official", "test"), "mos_mean"] == pytest.approx(test_mos.mean())

    # No KonIQ images beside the reference CSV: the gallery shows demo images and says so.
    assert "showing the demo data's instead" in printed(nb, "gallery")
    sample = pd.read_csv(out / "band_sample.csv")
    assert sample["image_name"].str.contains("_").all()  # demo names, not KonIQ's numeric ones
    assert len(figures(nb)) == 4


# ----------------------------------------------------------------------------- 02


def test_train_notebook_writes_a_run_and_shows_its_results(trained_run):
    nb, run_dir = trained_run
    config = json.loads((run_dir / "config.json").read_text())
    assert config["image_size"] == [32, 32] and config["weights"] == "none" and config["epochs"] == 1
    assert config["backbone"] == "small-cnn"
    subset = koniq.read_labels(config["labels"])
    assert config["labels"] == str(run_dir.parent.resolve() / f"tiny-labels-{TRAIN_IMAGES}-seed0.csv")
    assert len(subset) == TRAIN_IMAGES  # MAX_IMAGES made a subset file...
    assert config["images"] == str(koniq.default_image_root(synthetic.default_demo_dir() / "labels.csv"))

    history = pd.read_csv(run_dir / "history.csv")
    assert len(history) == 1 and np.isfinite(history["loss"]).all()

    split = pd.read_csv(run_dir / "split.csv")
    predictions = pd.read_csv(run_dir / "predictions.csv")
    assert sorted(split["image_name"]) == sorted(subset["image_name"])  # ...that was trained on
    assert sorted(predictions["image_name"]) == sorted(split.loc[split["part"] == "test", "image_name"])

    residuals = pd.read_csv(run_dir / "residuals_by_band.csv", index_col=0)
    assert residuals["n"].sum() == predictions["predicted_mos"].notna().sum()
    bands = nb_lib.quality_bands(predictions["mos"])
    for band, row in residuals.iterrows():
        error = (predictions["predicted_mos"] - predictions["mos"])[np.asarray(bands == band)]
        assert row["mae"] == pytest.approx(error.abs().mean())

    metrics = json.loads((run_dir / "metrics.json").read_text())
    table = outputs(nb, "metrics")[0]["data"]["text/plain"]
    assert "SRCC" in table and "PLCC after 4-parameter logistic" in table
    assert f"{metrics['rmse']:.4f}"[:-1] in table  # the table shows the run's own numbers
    notes = printed(nb, "config")
    assert "demo data" in notes and "random weights" in notes  # both caveats are shown
    assert png(run_dir / "residuals.png")[0] > 300
    assert len(figures(nb)) == 3  # learning curves, scatter, residuals


# ----------------------------------------------------------------------------- 03


def test_what_the_model_sees_notebook(trained_run, tmp_path):
    _, run_dir = trained_run
    nb = run_notebook(NAMES[2], tmp_path, RUN_DIR=str(run_dir), OUT_DIR="seen", GALLERY_IMAGES=4, EXTREMES=2)
    summary = json.loads((tmp_path / "seen" / "summary.json").read_text())
    # The small CNN's first convolution: 3x3 RGB kernels, as many as its first stage's width.
    assert summary["kernel_shape"] == [3, 3, 3, SMALL_CNN_VARIANT["widths"][0]]
    assert summary["kernel_layer"].startswith("conv2d")

    predictions = pd.read_csv(run_dir / "predictions.csv").set_index("image_name")
    gallery = predictions.loc[summary["gallery"], "mos"]
    assert len(gallery) == 4 and gallery.is_monotonic_increasing
    assert gallery.iloc[0] == predictions["mos"].min() and gallery.iloc[-1] == predictions["mos"].max()
    error = (predictions["predicted_mos"] - predictions["mos"]).abs()
    best = [row["abs_error"] for row in summary["best"]]
    worst = [row["abs_error"] for row in summary["worst"]]
    assert best[0] == pytest.approx(error.min()) and worst[0] == pytest.approx(error.max())
    assert max(best) <= min(worst)
    assert [error[r["image_name"]] for r in summary["worst"]] == pytest.approx(worst)

    width, height = png(tmp_path / "seen" / "kernels.png")
    assert width > 2 * height  # one row of 16 kernels
    for name in ("gallery", "best", "worst", "maps"):
        png(tmp_path / "seen" / f"{name}.png")
    assert len(summary["maps"]) == 4  # quality maps of the gallery: the mean is the score
    assert all(m["map_mean"] == pytest.approx(m["mos"], abs=1e-3) for m in summary["maps"])
    assert len(figures(nb)) == 5


# ----------------------------------------------------------------------------- 04


def check_served_scores(workdir, run_dir, n_images, columns):
    scores = pd.read_csv(workdir / "serving" / "scores.csv")
    assert list(scores.columns) == ["image", "keras"] + columns
    assert len(scores) == n_images and np.isfinite(scores[["keras"] + columns].to_numpy()).all()
    # The Keras model scores the run's test images as training's evaluation did.
    predictions = pd.read_csv(run_dir / "predictions.csv").head(n_images)
    assert scores["image"].tolist() == predictions["image_name"].tolist()
    np.testing.assert_allclose(scores["keras"], predictions["predicted_mos"], atol=1e-3)
    for column in columns:
        np.testing.assert_allclose(scores[column], scores["keras"], atol=0.05)
    differences = pd.read_csv(workdir / "serving" / "differences.csv", index_col=0)
    assert differences.index.tolist() == columns and differences["within_tolerance"].all()
    return scores


@pytest.mark.large  # slow: run with --run-large (kept out of the 15-minute default run)
def test_serving_notebook_with_the_local_dev_server(trained_run, tmp_path):
    _, run_dir = trained_run
    nb = run_notebook(NAMES[3], tmp_path, RUN_DIR=str(run_dir), EXPORT_BASE="export/kiqa-nb",
                      N_IMAGES=4, OUT_DIR="serving")
    version = tmp_path / "export" / "kiqa-nb" / "1"
    assert (version / "saved_model.pb").is_file()
    metadata = json.loads((version / "assets.extra" / "kiqa.json").read_text())
    assert metadata["image_size"] == [32, 32] and metadata["model_name"] == "kiqa-nb"
    check_served_scores(tmp_path, run_dir, 4, ["savedmodel", "grpc"])
    assert "local development server (not TF Serving)" in printed(nb, "serve")
    assert "all agree" in printed(nb, "compare")


class RestToGrpc(http.server.BaseHTTPRequestHandler):
    """TF Serving's REST predict in front of a gRPC server (the test's stand-in for port 8501)."""

    grpc_address = None
    requests = []

    def do_POST(self):  # noqa: N802 (http.server's method names)
        from kiqa.serving.client import ServingClient

        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        RestToGrpc.requests.append((self.path, body))
        # /v1/models/<name>[/versions/<v>]:predict
        parts = self.path.removesuffix(":predict").split("/")
        name, version = parts[3], (int(parts[5]) if len(parts) > 5 else None)
        contents = [base64.b64decode(item["b64"]) for item in body["instances"]]
        with ServingClient(self.grpc_address, model_name=name, version=version,
                           signature_name=body.get("signature_name", "serving_default")) as client:
            scores = client.score_bytes(contents)
        send_json(self, 200, {"predictions": [float(s) for s in scores]})

    def log_message(self, *args):
        pass


@pytest.mark.large
def test_serving_notebook_against_a_running_server_over_grpc_and_rest(trained_run, tmp_path):
    from kiqa.serving.devserver import DevServer

    _, run_dir = trained_run
    base = tmp_path / "export" / "watched"
    base.mkdir(parents=True)
    # A server already running and watching the base path, as TF Serving would be.
    with DevServer(base).start(poll_seconds=0.5) as server:
        RestToGrpc.grpc_address, RestToGrpc.requests = server.address, []
        rest = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RestToGrpc)
        threading.Thread(target=rest.serve_forever, daemon=True).start()
        try:
            nb = run_notebook(
                NAMES[3], tmp_path, RUN_DIR=str(run_dir), EXPORT_BASE=str(base), N_IMAGES=3,
                OUT_DIR="serving", SERVER=server.address, REST=f"http://127.0.0.1:{rest.server_address[1]}",
                WAIT_SECONDS=300,
            )
        finally:
            rest.shutdown()
            rest.server_close()
    scores = check_served_scores(tmp_path, run_dir, 3, ["savedmodel", "grpc", "rest"])
    np.testing.assert_allclose(scores["rest"], scores["grpc"], atol=1e-4)
    path, body = RestToGrpc.requests[-1]
    assert path == "/v1/models/watched/versions/1:predict" and body["signature_name"] == "serving_default"
    assert "local development server" not in printed(nb, "serve")


def test_parameter_comments_name_their_own_notebook():
    """Issue 20.8: a parameter cell's papermill line named a notebook that does not exist."""
    import json
    import re
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "notebooks"
    for notebook in sorted(folder.glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        source = "".join("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
        named = re.findall(r"papermill (\S+\.ipynb)", source)
        assert named and all(name == notebook.name for name in named), (notebook.name, named)
