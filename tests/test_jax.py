"""kiqa-train on the JAX backend: one process, and data-parallel over two processes on
127.0.0.1 (JAX on CPU, gloo collectives). Keras' backend is fixed when Keras loads, so
every JAX run is a subprocess (`python -m kiqa.cli.train --backend jax`); the exports
and the SavedModel checks run here, on the TensorFlow backend, as users run them.

Each run is bounded by a timeout and every subprocess is killed in a `finally`.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("jax", reason="the JAX backend tests need kiqa[jax] (pip install -e .[test,jax])")

from helpers import demo_subset  # noqa: E402
from kiqa.cli import export as export_cli  # noqa: E402
from kiqa.cli._common import EXIT_OK  # noqa: E402

WORKER = Path(__file__).with_name("jax_worker.py")
ROOT = Path(__file__).resolve().parents[1]
# One run: TF and JAX imports, XLA compiles and 2 epochs in each of 3 processes. Measured
# here over 10 minutes with 4 agents' tests sharing 2 cores (load average 9).
RUN_TIMEOUT = 1500


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    return demo_subset(tmp_path_factory.mktemp("jax"), per_source=4)


def train_args(labels, run_dir, *more):
    # 32 images: 8 test, 5 validation, 19 train (2 full batches of 8 an epoch). Adam at 0.01
    # (not the default 1e-4) so that 4 steps move the weights visibly.
    return ["--backend", "jax", "--labels", str(labels), "--split", "random", "--test-fraction", "0.25",
            "--val-fraction", "0.2", "--backbone", "small-cnn", "--image-size", "32", "32", "--epochs", "2",
            "--batch-size", "8", "--learning-rate", "0.01", "--cache", "none", "--quiet", "--run-dir", str(run_dir), *more]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args, log_name, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("KERAS_BACKEND", None)  # --backend jax must be enough
    log = open(Path(cwd) / log_name, "w+")
    proc = subprocess.Popen([sys.executable, "-m", "kiqa.cli.train", *args], stdout=log, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=str(cwd))
    proc.log = log
    return proc


def output(proc):
    proc.log.seek(0)
    return proc.log.read()


def finish(procs, timeout=RUN_TIMEOUT):
    """Waits for every process (one deadline for all); kills all that are left."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail("a JAX training process did not finish in time:\n" + "\n".join(output(p)[-2000:] for p in procs))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
    return [(proc.returncode, output(proc)) for proc in procs]


def two_processes(labels, run_dir, cwd, *more):
    address = f"127.0.0.1:{free_port()}"
    return [launch(train_args(labels, run_dir, "--strategy", "data-parallel", "--coordinator-address", address,
                              "--num-processes", "2", "--process-id", str(index), *more), f"p{index}.log", cwd)
            for index in range(2)]


@pytest.fixture(scope="module")
def runs(labels, tmp_path_factory):
    """A one-process data-parallel run and a two-process one, trained side by side."""
    cwd = tmp_path_factory.mktemp("runs")
    one_dir, two_dir = cwd / "one", cwd / "two"
    procs = [launch(train_args(labels, one_dir, "--strategy", "data-parallel", "--num-processes", "1"),
                    "one.log", cwd)]
    procs += two_processes(labels, two_dir, cwd)
    results = finish(procs)
    for code, text in results:
        assert code == 0, text[-3000:]
    return one_dir, two_dir, results


def pixels(seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)


def jax_predictions(model, tmp_path):
    np.save(tmp_path / "pixels.npy", pixels())
    done = subprocess.run([sys.executable, str(WORKER), "predict", str(model), str(tmp_path / "pixels.npy"),
                           str(tmp_path / "jax.npy")], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(tmp_path / "jax.npy")


def exported_predictions(run_dir, base):
    """`kiqa export` (TensorFlow backend, this process) and the SavedModel's pixel signature."""
    import tensorflow as tf

    assert export_cli.main([str(run_dir), "--base", str(base), "--version", "1"]) == EXIT_OK
    loaded = tf.saved_model.load(str(base / "1"))
    return loaded.signatures["score_pixels"](image=tf.constant(pixels()))["mos"].numpy().astype(np.float64)


@pytest.mark.large  # two imports of TF and JAX per process; minutes on a loaded 2-core machine
def test_a_jax_run_has_the_run_directory_and_exports_under_tensorflow_with_its_predictions(runs, tmp_path):
    one_dir, _, _ = runs
    for name in ("config.json", "history.csv", "metrics.json", "predictions.csv", "loss.png", "scatter.png",
                 "model.keras", "provenance.json", "checkpoints/best.keras", "phase-finetune/done"):
        assert (one_dir / name).is_file(), name
    assert len(pd.read_csv(one_dir / "history.csv")) == 2
    from_jax = jax_predictions(one_dir / "model.keras", tmp_path)
    from_saved_model = exported_predictions(one_dir, tmp_path / "kiqa")
    # Same float32 weights and pixels through XLA (JAX) and TF's CPU kernels: the sums run
    # in another order, a few float32 ulps of a ~50-point score (1e-5); 1e-3 MOS points
    # is far below anything a user could see and far above that rounding.
    np.testing.assert_allclose(from_saved_model, from_jax, atol=1e-3)
    # Adam at 0.01 for 4 steps moves the head: the images differ by more than the tolerance.
    assert np.ptp(from_jax) > 0.1


@pytest.mark.large
def test_two_processes_train_as_one_process_on_the_same_global_batch(runs):
    one_dir, two_dir, results = runs
    one, two = pd.read_csv(one_dir / "history.csv"), pd.read_csv(two_dir / "history.csv")
    assert list(two["epoch"]) == [0, 1]
    # Same initial weights (same seed), same global batches (each process feeds its half
    # of each): only the order of float32 sums differs (the gradient and BatchNorm means
    # are all-reduced over two devices instead of summed on one), a relative 1e-7 per
    # step; after 4 Adam steps the losses agree to well within 1e-4.
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-4)
    np.testing.assert_allclose(two["val_loss"], one["val_loss"], rtol=1e-4)
    # Only process 0 wrote the run directory; process 1 wrote its own scratch folder.
    scratch = [line.split("results in ", 1)[1].strip() for line in results[2][1].splitlines()
               if line.startswith("results in ")]
    assert scratch and Path(scratch[0]).parent == Path(tempfile.gettempdir()) / "kiqa-process-1"
    assert (Path(scratch[0]) / "phase-finetune" / "done").is_file()
    assert f"results in {two_dir}" in results[1][1]


@pytest.mark.large
def test_the_two_process_model_exports_and_scores_like_the_one_process_model(runs, tmp_path):
    one_dir, two_dir, _ = runs
    one = exported_predictions(one_dir, tmp_path / "one")
    two = exported_predictions(two_dir, tmp_path / "two")
    # Weights equal to float32 rounding (see the loss test): scores within 0.01 MOS points.
    np.testing.assert_allclose(two, one, atol=1e-2)
    a = pd.read_csv(one_dir / "predictions.csv")
    b = pd.read_csv(two_dir / "predictions.csv")
    np.testing.assert_allclose(b["predicted_mos"], a["predicted_mos"], atol=1e-2)


@pytest.mark.large
def test_killing_one_worker_fails_the_job_with_an_error_instead_of_a_hang(labels, tmp_path):
    procs = two_processes(labels, tmp_path / "run", tmp_path, "--epochs", "6", "--patience", "6")
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        history = tmp_path / "run" / "history.csv"
        while not history.is_file() and time.monotonic() < deadline and all(p.poll() is None for p in procs):
            time.sleep(1)
        assert history.is_file(), output(procs[0])[-3000:]  # both are training
        os.kill(procs[1].pid, signal.SIGKILL)
        started = time.monotonic()
        # JAX's coordination service misses the dead process' heartbeats within
        # kiqa.distribute.HEARTBEAT_TIMEOUT_SECONDS (30) and fails the survivor.
        procs[0].wait(timeout=180)
        waited = time.monotonic() - started
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
    text = output(procs[0])
    assert procs[0].returncode != 0, text[-3000:]
    assert waited < 180
    # Either kiqa's error (a collective step failed in Python) or JAX's own: its
    # coordination service ends the survivor from C++, which Python cannot catch.
    assert ("kiqa-train: error: the data-parallel job lost a process" in text
            or "This most likely indicates that another task died" in text), text[-3000:]
