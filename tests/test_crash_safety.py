"""Crash safety: kill -9 in the middle of training and scoring, then rerun the same job.

- Training: a run killed mid-epoch resumes from the last completed epoch, ends with the
  configured number of epochs (history.csv holds each epoch once), keeps a best
  checkpoint that the restart cannot beat, and a backup file truncated by the kill does
  not wedge the resume.
- Scoring: the rows written before the kill stay valid, and a rerun scores the rest.
- Export: a kill mid-write leaves no numeric version directory; that is
  tests/test_export.py::test_kill_9_during_export_leaves_no_version.

The default tests kill `kiqa.train.train` with a small CNN backbone in a subprocess whose
input pipeline is slowed down and counts batches (a driver script: `kiqa-train` has no such
hook), so the kill lands inside an epoch. `kiqa-train` itself, with ConvNeXt-Tiny, is
the large test at the end: measured here at 2.5 minutes for three epochs of 32x32 demo
images (most of it tracing and compiling), too slow for the default run.
"""

import csv
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import demo_subset, make_tiny_run
from kiqa import train as kiqa_train
from kiqa.config import TrainConfig
from kiqa.evaluate import predict_paths
from kiqa.scoring.scorer import load_scorer
from kiqa.contract import MOS_SCALE
from kiqa.model import load_model, small_cnn
from kiqa.contract import CSV_COLUMNS
from kiqa.scoring.table import read_scores, score_paths

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# Seconds a subprocess may take to reach the point where it is killed.
DEADLINE = 300
EPOCHS = 3
CNN_WIDTHS = (8, 16)

# Runs kiqa.train.train(config) with a small CNN, as `kiqa-train` would run it, with a
# training pipeline that sleeps per batch and appends one line per batch to a file.
TRAIN_DRIVER = """
import sys, time
import tensorflow as tf
from kiqa import train as kiqa_train
from kiqa.config import TrainConfig
from kiqa.model import small_cnn

config_file, batches_file = sys.argv[1], sys.argv[2]
real_make_dataset = kiqa_train.make_dataset

def tick():
    with open(batches_file, "a") as handle:
        handle.write("batch\\n")
    time.sleep(0.4)
    return 0

def counted(*args, **kwargs):
    dataset = real_make_dataset(*args, **kwargs)
    def through(images, targets):
        done = tf.py_function(tick, [], tf.int32)
        with tf.control_dependencies([done]):
            return tf.identity(images), targets
    return dataset.map(through)

kiqa_train.make_dataset = counted
kiqa_train.train(TrainConfig.load(config_file), backbone=small_cnn({widths}), progress=False)
"""

# Runs `kiqa score` with each file's load slowed down, so a kill finds it mid-job.
SCORE_DRIVER = """
import sys, time
from kiqa.scoring import batches as score
from kiqa.cli import score as score_cli

real_load = score.load_pixels
def slow_load(*args, **kwargs):
    time.sleep(0.05)
    return real_load(*args, **kwargs)
score.load_pixels = slow_load
sys.exit(score_cli.main(sys.argv[1:]))
"""


def _environment():
    path = os.pathsep.join([str(TESTS), str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, TF_CPP_MIN_LOG_LEVEL="2")


def _kill_when(process, ready, what):
    """Polls `ready()` until it holds, then SIGKILLs `process`."""
    deadline = time.monotonic() + DEADLINE
    try:
        while not ready():
            if process.poll() is not None:
                pytest.fail(f"the job ended (code {process.returncode}) before {what}: "
                            f"{process.stderr.read().decode(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the job did not reach {what} within {DEADLINE} s")
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL


def _lines(path):
    return path.read_text().count("\n") if path.exists() else 0


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _weights_digest(path):
    """The weights of a .keras file, not its bytes: a finished run replaces
    checkpoints/best.keras by a hard link to model.keras, the same weights saved again."""
    digest = hashlib.sha256()
    for array in load_model(path).get_weights():
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _moved(run_dir, config, destination):
    """A copy of a killed run directory, its config pointing at the copy (the same run,
    moved: train() refuses a config.json that names another folder)."""
    shutil.copytree(run_dir, destination)
    moved = config.replace(run_dir=str(destination))
    moved.save(destination / "config.json")
    return moved


def _rerun(config, monkeypatch):
    """Reruns the job in this process; returns (result, epochs run by this rerun)."""
    epochs = []
    original = kiqa_train.ValidationMetrics.on_epoch_end

    def spy(self, epoch, logs=None):
        epochs.append(epoch)
        return original(self, epoch, logs)

    monkeypatch.setattr(kiqa_train.ValidationMetrics, "on_epoch_end", spy)
    return kiqa_train.train(config, backbone=small_cnn(CNN_WIDTHS), progress=False), epochs


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A small-CNN training run killed by SIGKILL in its second epoch.

    Returns:
        (config, run_dir, completed epochs per the backup, best.keras digest at the kill).
    """
    root = tmp_path_factory.mktemp("crash")
    labels = demo_subset(root, per_source=4)
    run_dir = root / "run"
    config = TrainConfig.demo(
        labels=str(labels), run_dir=str(run_dir), weights="none", image_size=(32, 32), batch_size=8,
        epochs=EPOCHS, patience=EPOCHS, monitor="val_loss", cache="none",
    )
    config_file = root / "config.json"
    config.save(config_file)
    driver, batches = root / "driver.py", root / "batches.txt"
    driver.write_text(TRAIN_DRIVER.format(widths=CNN_WIDTHS))
    history = run_dir / "history.csv"
    process = subprocess.Popen(
        [sys.executable, str(driver), str(config_file), str(batches)], cwd=root,
        env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    steps = {}

    def inside_second_epoch():
        # Epoch 0 is logged (CSVLogger runs after BackupAndRestore) and a batch of
        # epoch 1 has been drawn: the kill lands inside epoch 1.
        if _lines(history) < 2:
            return False
        steps.setdefault("per_epoch", _lines(batches))
        return _lines(batches) > steps["per_epoch"]

    _kill_when(process, inside_second_epoch, "the second epoch")
    backup = run_dir / "phase-finetune" / "backup"
    completed = json.loads((backup / "training_metadata.json").read_text())["epoch"]
    return config, run_dir, completed, _weights_digest(run_dir / "checkpoints" / "best.keras")


def test_killed_run_left_a_backup_of_its_completed_epochs(killed_run):
    config, run_dir, completed, _ = killed_run
    assert 1 <= completed < EPOCHS
    assert list(pd.read_csv(run_dir / "history.csv").epoch) == list(range(completed))
    assert not (run_dir / "model.keras").exists() and not (run_dir / "metrics.json").exists()
    assert (run_dir / "phase-finetune" / "backup" / "latest.weights.h5").is_file()


def test_rerun_resumes_from_the_last_completed_epoch(killed_run, tmp_path, monkeypatch):
    config, run_dir, completed, best_digest = killed_run
    config = _moved(run_dir, config, tmp_path / "run")
    history_csv = tmp_path / "run" / "history.csv"
    # The checkpoint saved before the kill is made unbeatable (val_loss 0 in the log
    # the restart reads its threshold from), so any save after the restart would be
    # a worse model overwriting a better one.
    before = pd.read_csv(history_csv)
    best_epoch = int(before.val_loss.idxmin())
    before.loc[best_epoch, "val_loss"] = 0.0
    before.to_csv(history_csv, index=False)

    result, epochs_run = _rerun(config, monkeypatch)

    assert epochs_run == list(range(completed, EPOCHS))  # nothing before the kill is redone
    history = pd.read_csv(history_csv)
    assert list(history.epoch) == list(range(EPOCHS))  # each epoch once
    pd.testing.assert_frame_equal(history.iloc[:completed], before)  # the earlier rows kept
    assert _weights_digest(tmp_path / "run" / "checkpoints" / "best.keras") == best_digest
    # The final model carries the best checkpoint's weights.
    best = load_model(tmp_path / "run" / "checkpoints" / "best.keras")
    final = load_model(result.model_path)
    for a, b in zip(best.get_weights(), final.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_the_rerun_starts_from_the_backups_optimizer_state(killed_run, tmp_path, monkeypatch):
    """Adam's step count and moments come back with the weights: a resumed run continues the
    optimizer of its last completed epoch instead of starting a fresh one. (Checked with Adam
    built at compile, `kiqa.train._compile`, and without: Keras restores it either way.)"""
    import h5py

    from kiqa import callbacks

    config, run_dir, completed, _ = killed_run
    config = _moved(run_dir, config, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "phase-finetune" / "backup" / "latest.weights.h5", "r") as backup:
        stored = backup["optimizer"]["vars"]
        saved = [np.asarray(stored[str(i)]) for i in range(len(stored))]
    restored = {}
    original = callbacks.ResumableBackup.on_train_begin

    def spy(self, logs=None):
        original(self, logs)
        restored["variables"] = [np.asarray(v) for v in self.model.optimizer.variables]

    monkeypatch.setattr(callbacks.ResumableBackup, "on_train_begin", spy)
    _rerun(config, monkeypatch)

    assert len(restored["variables"]) == len(saved) > 2  # step, learning rate, two moments per weight
    assert int(restored["variables"][0]) == int(saved[0]) > 0  # the steps of the completed epochs
    for got, want in zip(restored["variables"], saved):
        np.testing.assert_array_equal(got, want)


def test_a_truncated_backup_does_not_wedge_the_resume(killed_run, tmp_path, monkeypatch):
    config, run_dir, completed, _ = killed_run
    config = _moved(run_dir, config, tmp_path / "run")
    # What a kill while Keras rewrites the backup in place leaves behind.
    weights = tmp_path / "run" / "phase-finetune" / "backup" / "latest.weights.h5"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])

    result, epochs_run = _rerun(config, monkeypatch)

    assert epochs_run and epochs_run[-1] == EPOCHS - 1
    assert list(pd.read_csv(tmp_path / "run" / "history.csv").epoch) == list(range(EPOCHS))
    assert result.model_path.is_file()


def test_a_kill_in_the_first_epoch_leaves_nothing_that_wedges_the_rerun(tmp_path, monkeypatch):
    # Before, CSVLogger had created a 0-byte history.csv by then and every rerun stopped
    # with pandas' EmptyDataError.
    labels = demo_subset(tmp_path, per_source=4)
    run_dir = tmp_path / "run"
    config = TrainConfig.demo(
        labels=str(labels), run_dir=str(run_dir), weights="none", image_size=(32, 32), batch_size=8,
        epochs=2, patience=2, cache="none",
    )
    config_file = tmp_path / "config.json"
    config.save(config_file)
    driver, batches = tmp_path / "driver.py", tmp_path / "batches.txt"
    driver.write_text(TRAIN_DRIVER.format(widths=CNN_WIDTHS))
    process = subprocess.Popen(
        [sys.executable, str(driver), str(config_file), str(batches)], cwd=tmp_path,
        env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    _kill_when(process, lambda: _lines(batches) >= 2, "its second batch")
    history = run_dir / "history.csv"
    assert not history.exists() or history.stat().st_size > 0  # never a 0-byte file
    assert not list(run_dir.rglob(".*.tmp"))  # no temporary file left visible as a result

    lines = []
    epochs = []
    original = kiqa_train.ValidationMetrics.on_epoch_end
    monkeypatch.setattr(kiqa_train.ValidationMetrics, "on_epoch_end",
                        lambda self, epoch, logs=None: (epochs.append(epoch), original(self, epoch, logs))[1])
    result = kiqa_train.train(config, backbone=small_cnn(CNN_WIDTHS), progress=False, log=lines.append)
    assert epochs == [0, 1] and not lines  # nothing completed: a clean start, nothing to say
    assert list(pd.read_csv(history).epoch) == [0, 1] and result.model_path.is_file()


# ----------------------------------------------------------------------------- scoring


def _read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_killed_scoring_job_keeps_its_rows_and_a_rerun_completes_it(tmp_path):
    from PIL import Image

    run_dir = tmp_path / "run"
    make_tiny_run(run_dir)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(80):
        Image.fromarray(rng.integers(0, 256, (24 + i % 7, 36, 3), dtype=np.uint8)).save(photos / f"{i:03d}.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")  # a failed row among them
    out = tmp_path / "scores.csv"
    driver = tmp_path / "driver.py"
    driver.write_text(SCORE_DRIVER)
    process = subprocess.Popen(
        [sys.executable, str(driver), str(photos), "--model", str(run_dir), "--out", str(out),
         "--batch-size", "4", "--quiet"],
        cwd=tmp_path, env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    _kill_when(process, lambda: _lines(out) > 12, "its fourth batch")

    text = out.read_text()
    complete = text[: text.rfind("\n") + 1]  # a last line cut by the kill is not a row
    rows = list(csv.reader(complete.splitlines()))
    assert tuple(rows[0]) == CSV_COLUMNS and 12 <= len(rows) - 1 < 81
    for path, mos, error in rows[1:]:
        assert Path(path).parent == photos
        assert (mos and 0 <= float(mos) <= 100 and not error) or (not mos and error)
    written = {row[0]: row[1:] for row in rows[1:]}

    summary = score_paths([photos], load_scorer(run_dir), out, progress=False)

    assert summary.n_skipped == len(written) and summary.n_files == 81
    final = _read_rows(out)
    paths = [row[0] for row in final[1:]]
    assert len(paths) == len(set(paths)) == 81  # every file once
    assert {row[0]: row[1:] for row in final[1:] if row[0] in written} == written  # kept as written
    reference = tmp_path / "reference.csv"
    score_paths([photos], load_scorer(run_dir), reference, progress=False)
    assert read_scores(out) == read_scores(reference)  # the same as an uninterrupted job


# ----------------------------------------------------------------------------- kiqa-train (large)


@pytest.mark.large
def test_kiqa_train_killed_mid_epoch_resumes(tmp_path):
    labels = demo_subset(tmp_path, per_source=4)
    run_dir = tmp_path / "run"
    command = [
        str(Path(sys.executable).with_name("kiqa-train")), "--labels", str(labels), "--split", "random",
        "--weights", "none", "--image-size", "32", "32", "--epochs", str(EPOCHS), "--batch-size", "8",
        "--patience", str(EPOCHS), "--monitor", "val_loss", "--cache", "none", "--run-dir", str(run_dir),
    ]
    process = subprocess.Popen(command, cwd=tmp_path, env=_environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    history = run_dir / "history.csv"
    started = {}

    def inside_second_epoch():
        # Epoch 0 logged; then a quarter of the first epoch's duration into epoch 1.
        if _lines(history) < 2:
            return False
        started.setdefault("at", time.monotonic())
        return time.monotonic() - started["at"] > 2.0

    _kill_when(process, inside_second_epoch, "the second epoch")
    process.stdout.close()
    completed = json.loads((run_dir / "phase-finetune" / "backup" / "training_metadata.json").read_text())["epoch"]
    before = pd.read_csv(history)
    assert list(before.epoch) == list(range(completed))

    rerun = subprocess.run(command, cwd=tmp_path, env=_environment(), capture_output=True, text=True,
                           timeout=3600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    epochs_run = [int(n) - 1 for n in re.findall(r"^Epoch (\d+)/%d" % EPOCHS, rerun.stdout, re.M)]
    assert epochs_run == list(range(completed, EPOCHS))
    after = pd.read_csv(history)
    assert list(after.epoch) == list(range(EPOCHS))
    pd.testing.assert_frame_equal(after.iloc[:completed], before)
    # The best checkpoint is the model of the best logged epoch, over both processes:
    # its validation loss, recomputed, is the smallest in history.csv.
    config = TrainConfig.load(run_dir / "config.json")
    split = pd.read_csv(run_dir / "split.csv")
    val = split[split.part == "val"]
    paths = [str(labels.parent / "images" / name) for name in val.image_name]
    predicted = predict_paths(load_model(run_dir / "checkpoints" / "best.keras"), paths, config)
    val_loss = float(np.mean(((val.mos.to_numpy() - predicted) / MOS_SCALE) ** 2))
    assert val_loss == pytest.approx(after.val_loss.min(), rel=1e-4)


# ----------------------------------------------------------------------------- full disk


def _tmpfs(path, size):
    """Mounts a tmpfs of `size` at `path`; returns None or why it cannot be mounted here."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else (done.stderr.strip() or "mount failed")


def test_a_full_disk_stops_with_one_error_keeps_the_backup_and_resumes(tmp_path, monkeypatch):
    """On a real, small tmpfs: the space check refuses to start, naming the folder and
    the space needed; a disk that fills during training (ENOSPC at the second backup)
    stops with the same error and the first backup intact; freeing space resumes."""
    from kiqa.errors import DiskFullError

    disk = tmp_path / "disk"
    why = _tmpfs(disk, "3m")
    if why:
        pytest.skip(f"cannot mount a tmpfs here ({why}); the ENOSPC path is not tested")
    try:
        labels = demo_subset(tmp_path, per_source=4)
        config = TrainConfig.demo(
            labels=str(labels), run_dir=str(disk / "run"), weights="none", image_size=(32, 32), batch_size=8,
            epochs=2, patience=2, cache="none",
        )
        # 1. Too small from the start: refused before the first epoch, by the estimate.
        with pytest.raises(DiskFullError) as caught:
            kiqa_train.train(config, backbone=small_cnn((32, 64, 96)), progress=False)
        err = caught.value
        assert str(disk / "run") in str(err) and "needs about" in str(err) and err.needed > err.free
        # 2. The disk fills during training: the estimate passes (lowered), the second
        # epoch's backup hits ENOSPC for real (a filler file takes the space).
        monkeypatch.setattr(kiqa_train, "space_needed", lambda *args: 0)
        filler = disk / "filler"
        original = kiqa_train.ResumableBackup._save_model

        def fill_then_save(self):
            if self._current_epoch == 2:
                # Take what is left: unbuffered 64 KiB writes until the disk says it is full.
                with open(filler, "wb", buffering=0) as handle, pytest.raises(OSError) as full:
                    for _ in range(1000):  # 3 MB of disk is 48 writes; never endless
                        handle.write(b"\0" * 65536)
                assert full.value.errno == errno.ENOSPC
            original(self)

        monkeypatch.setattr(kiqa_train.ResumableBackup, "_save_model", fill_then_save)
        with pytest.raises(DiskFullError, match="ran out of space"):
            kiqa_train.train(config, backbone=small_cnn((8,)), progress=False)
        backup = disk / "run" / "phase-finetune" / "backup"
        assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == 1
        assert not list(backup.glob(".incoming*"))  # the cut-short backup was removed
        # 3. Space freed: the same command resumes from the kept backup.
        filler.unlink()
        monkeypatch.setattr(kiqa_train.ResumableBackup, "_save_model", original)
        lines = []
        result = kiqa_train.train(config, backbone=small_cnn((8,)), progress=False, log=lines.append)
        assert any("epoch 2 of 2 (1 completed)" in line for line in lines), lines
        assert list(pd.read_csv(disk / "run" / "history.csv").epoch) == [0, 1]
        assert result.model_path.is_file()
    finally:
        subprocess.run(["umount", str(disk)], check=False)
