"""Training: the KonCept-style recipe made into a resumable, inspectable run.

A run directory holds everything (see `docs/training.md`, "The run directory"): the resolved
config, the checked images and their split, Keras checkpoints, a backup for resuming,
CSV and TensorBoard logs, the test metrics, predictions and plots. Rerunning the same
command after a crash or a kill resumes from the last completed epoch.
"""

import dataclasses
import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from kiqa import CallableModule, provenance
from kiqa.config import TrainConfig
from kiqa.contract import MOS_SCALE
from kiqa.data import koniq
from kiqa.data.pipeline import make_dataset, steps_per_epoch
from kiqa.data.prepared import default_prepared_dir, inspect_prepared, open_prepared
from kiqa.data.validate import apply_bad_image_policy, check_image_folder, check_labels
from kiqa.distribute import Cluster, JaxStrategy, keras_backend, make_strategy, writable_run_dir
from kiqa.errors import (
    ClusterError, ConfigError, DataError, DiskFullError, OutputIsInputError, RunExistsError, SetTooSmallError,
    StrategyError,
)
from kiqa.fsutil import (
    PANDAS_READ_TEXT, link_atomically, write_atomically, write_csv_atomically, write_text_atomically,
)
from kiqa.evaluate import evaluate_frame, predict_paths, write_json
from kiqa.metrics import evaluate_scores, summarize_repeats
from kiqa.model import build_model, custom_objects, mos_loss, set_backbone_trainable
from kiqa.plots import plot_history, plot_repeats

# PLCC/SRCC need a few points; fewer makes every epoch's validation metric meaningless.
MIN_PART_SIZE = 3
FROM_SCRATCH_CAVEAT = (
    "ConvNeXt is being trained from random weights (weights \"none\"). Measured on "
    "demo-like data, a ConvNeXt trained from scratch on a few hundred images learns next "
    "to nothing about quality (held-out SRCC stays near 0: it memorises the training "
    "photos). Treat this run's test numbers as a check that the pipeline runs, not as a "
    "result. ImageNet weights (weights \"imagenet\", or a local weights file) are what make "
    "ConvNeXt work for quality."
)
MULTI_WORKER_UNSUPPORTED = (
    "Keras 3's model.fit cannot train under tf.distribute.MultiWorkerMirroredStrategy on TF "
    "2.21: its train step hands a PerReplica value to an op that wants a tensor (open "
    "upstream: keras-team/keras issue 20585, tensorflow/tensorflow issue 72388). On one host "
    "the mirrored strategy uses every local GPU; several hosts train with the data-parallel "
    "strategy on the JAX backend (keras.distribution)."
)
SMALL_CNN_CAVEAT = (
    "Training the small CNN (backbone \"small-cnn\"), kiqa's backbone for offline teaching and "
    "testing: a plain ReLU CNN from random weights. It learns the demo distortions in minutes, "
    "but its scores are not meaningful quality predictions; the real model is ConvNeXt from "
    "ImageNet weights."
)
DEMO_CAVEAT = (
    "Training on kiqa's built-in demo data: sample photos with synthetic blur, noise and "
    "JPEG artefacts and made-up scores. It is not KonIQ-10k; give a KonIQ label file (labels) to train on KonIQ."
)


@dataclasses.dataclass
class TrainResult:
    """What a finished run produced.

    Attributes:
        run_dir: the run directory.
        metrics: test metrics (for repeated splits: the per-metric median/spread summary).
        model_path: the final `.keras` model (best weights), or None for repeated splits
            (each split's model is in its own subfolder).
        rejects: images that were rejected before training.
        prepared_dir: the prepared set training read its images from, or None.
    """

    run_dir: Path
    metrics: Dict[str, Any]
    model_path: Optional[Path]
    rejects: pd.DataFrame
    prepared_dir: Optional[Path] = None


def caveats(config, backbone=None):
    """Plain-language warnings about what a run's numbers mean (printed by the CLI)."""
    notes = []
    if config.labels is None:
        notes.append(DEMO_CAVEAT)
    if config.backbone == "small-cnn" and backbone is None:
        notes.append(SMALL_CNN_CAVEAT)
    elif config.weights == "none" and backbone is None:
        notes.append(FROM_SCRATCH_CAVEAT)
    return notes


class ResumableBackup(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` whose backup survives a kill or a full disk at any moment.

    Each save writes the weights and the epoch to temporary files first and only then
    rotates them in by renames (latest -> previous, new -> latest), so the folder
    always holds a complete latest or previous backup. `restore_backup` picks the
    newest one that loads before `model.fit` starts (Keras' own restore then loads the
    same files).
    """

    def __init__(self, backup_dir):
        super().__init__(backup_dir, save_freq="epoch", double_checkpoint=True)

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        if os.path.exists(self._weights_path):
            # The latest backup is complete: the previous one can go first, so the disk
            # holds at most two copies (latest + the one being written), never three.
            for previous in (self._prev_weights_path, self._prev_training_metadata_path):
                if os.path.exists(previous):
                    os.remove(previous)
        pending = []
        try:
            # Keras wants the .weights.h5 suffix on the temporary file too.
            pending.append((os.path.join(self.backup_dir, ".incoming.weights.h5"), self._weights_path))
            pending.append((os.path.join(self.backup_dir, ".incoming.json"), self._training_metadata_path))
            self.model.save_weights(filepath=pending[0][0], overwrite=True)
            Path(pending[1][0]).write_text(json.dumps({
                "epoch": self._current_epoch, "batch": self._last_batch_seen,
                "seed_states": [np.asarray(v.numpy()).tolist() for v in _seed_states(self.model)],
            }))
            for current, previous in ((self._weights_path, self._prev_weights_path),
                                      (self._training_metadata_path, self._prev_training_metadata_path)):
                if os.path.exists(current):
                    os.replace(current, previous)
            for tmp, final in pending:
                os.replace(tmp, final)
        finally:
            for tmp, _ in pending:
                if os.path.exists(tmp):
                    os.remove(tmp)


def _seed_states(model):
    """The state variables of the model's random-number generators (dropout masks).

    Keras' `save_weights` leaves them out, so a resumed run would draw other dropout
    masks than an uninterrupted one; the backup's metadata carries them instead.
    """
    return [generator.state for layer in model._flatten_layers() for generator in getattr(layer, "_seed_generators", [])]


def restore_backup(model, backup_dir):
    """Loads the newest readable backup of a phase into `model` before `model.fit`.

    Tries the latest backup, then the previous one (a kill or a full disk may have cut
    the latest short); the one that loads is made the latest, so Keras' own restore at
    the start of `fit` loads the same state. When none loads, the folder is removed and
    the phase starts again.

    Args:
        model: the compiled model.
        backup_dir: the phase's backup folder.

    Returns:
        (completed epochs, None) or (0, why the backup could not be used).
    """
    backup_dir = Path(backup_dir)
    if not backup_dir.exists():
        return 0, None
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)  # its variables must exist to load them
    errors = []
    for weights, metadata in (("latest.weights.h5", "training_metadata.json"),
                              ("latest.weights.h5.bkp", "training_metadata.json.bkp")):
        try:
            saved = json.loads((backup_dir / metadata).read_text())
            epoch = int(saved["epoch"])
            model.load_weights(backup_dir / weights)
        except (OSError, ValueError, KeyError, TypeError) as err:
            errors.append(f"{weights}: {err}")
            continue
        states = saved.get("seed_states")
        if states is not None and len(states) == len(_seed_states(model)):
            for variable, value in zip(_seed_states(model), states):
                variable.assign(np.asarray(value, dtype=variable.dtype))
        if weights != "latest.weights.h5":
            shutil.copyfile(backup_dir / weights, backup_dir / "latest.weights.h5")
            shutil.copyfile(backup_dir / metadata, backup_dir / "training_metadata.json")
        return epoch, None
    shutil.rmtree(backup_dir)
    return 0, "; ".join(errors) if errors else "it is empty"


class ValidationMetrics(keras.callbacks.Callback):
    """Adds val_loss, val_plcc and val_srcc to the epoch logs from one validation pass.

    Keras' own `validation_data` pass would predict the validation set a second time
    for the loss alone; this computes the same loss (`mos_loss`, MSE on MOS/100) from
    the predictions it needs for the correlations anyway.

    Must come before EarlyStopping, ModelCheckpoint and CSVLogger in the callback list,
    since Keras calls callbacks in order with the same logs dict.
    """

    def __init__(self, paths, mos, config, strategy=None):
        super().__init__()
        self.paths, self.mos, self.config = list(paths), np.asarray(mos, float), config
        self.strategy = strategy

    def on_epoch_end(self, epoch, logs=None):
        # Under data-parallel, every process predicts the (small) validation set alone,
        # from its copy of the replicated weights (see `predictor`): the same weights and
        # images give the same numbers everywhere, so every process' early stopping and
        # best checkpoint decide alike.
        predicted = predict_paths(predictor(self.model), self.paths, self.config, part="val")
        ok = np.isfinite(predicted)
        scores = evaluate_scores(self.mos[ok], predicted[ok])
        if logs is not None:
            logs["val_loss"] = float(np.mean(((self.mos[ok] - predicted[ok]) / MOS_SCALE) ** 2))
            logs["val_plcc"] = scores["plcc"]
            logs["val_srcc"] = scores["srcc"]


def _monitor_mode(monitor):
    return "min" if monitor == "val_loss" else "max"


def read_history(history_csv):
    """The per-epoch log of a run, tolerant of what a kill or a full disk leaves behind.

    Returns:
        A DataFrame with one row per epoch (the last row written for an epoch wins),
        empty when the file is missing, empty, truncated to nothing or unreadable.
    """
    history_csv = Path(history_csv)
    try:
        history = pd.read_csv(history_csv, **PANDAS_READ_TEXT)
    except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        return pd.DataFrame({"epoch": pd.Series(dtype=int)})
    if "epoch" not in history.columns:
        return pd.DataFrame({"epoch": pd.Series(dtype=int)})
    history = history[pd.to_numeric(history["epoch"], errors="coerce").notna()]
    history = history.astype({"epoch": int})
    # A kill between the CSV row and the backup repeats an epoch on resume: keep the last.
    return history.drop_duplicates(subset="epoch", keep="last").reset_index(drop=True)


def _best_so_far(history_csv, monitor):
    """The best monitored value logged before a restart, so a resumed run's checkpoint
    callback does not overwrite the best checkpoint with a worse one."""
    history = read_history(history_csv)
    if monitor not in history.columns or history[monitor].dropna().empty:
        return None
    values = history[monitor].dropna()
    return float(values.min() if _monitor_mode(monitor) == "min" else values.max())


class EpochLog(keras.callbacks.Callback):
    """history.csv, rewritten whole through a temporary file and a rename every epoch.

    Replaces `keras.callbacks.CSVLogger`, whose appends leave a 0-byte or half-written
    file after a kill. Epochs are numbered across phases (the fine-tuning phase
    continues after the warm-up's epochs), and a repeated epoch replaces its row.
    Comes before the backup in the callback list: a kill between the two repeats the
    epoch on resume, which rewrites its row (never loses one).
    """

    def __init__(self, path, offset=0):
        super().__init__()
        self.path, self.offset = Path(path), offset

    def on_epoch_end(self, epoch, logs=None):
        number = self.offset + epoch
        history = read_history(self.path)
        row = {"epoch": number, **{k: float(v) for k, v in sorted((logs or {}).items())}}
        history = pd.concat([history[history["epoch"] < number], pd.DataFrame([row])], ignore_index=True)
        write_csv_atomically(history, self.path)


class BestCheckpoint(keras.callbacks.Callback):
    """checkpoints/best.keras: the best epoch by the monitor, without optimizer state.

    Replaces `keras.callbacks.ModelCheckpoint`, which keeps Adam's two moments (two
    thirds of the file) and writes in place. Resuming uses the backup, not this file,
    so the optimizer state is not needed here; the file is written atomically.
    """

    def __init__(self, path, monitor, initial_value=None):
        super().__init__()
        self.path, self.monitor, self.best = Path(path), monitor, initial_value
        self.better = np.less if _monitor_mode(monitor) == "min" else np.greater

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not np.isfinite(value):
            return
        if self.best is None or self.better(value, self.best):
            self.best = float(value)
            _save_model_atomically(self.model, self.path)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping whose patience count survives a restart (read from history.csv).

    Without it a resumed run would wait `patience` epochs afresh and could train longer
    than an uninterrupted one. The best weights of epochs before a restart are not in
    memory; `train_split` loads the best checkpoint at the end in every case.
    """

    def __init__(self, history_csv, offset, **kwargs):
        super().__init__(**kwargs)
        self.history_csv, self.offset = Path(history_csv), offset

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        start = getattr(self.model, "_initial_epoch", 0) or 0
        history = read_history(self.history_csv)
        history = history[(history["epoch"] >= self.offset) & (history["epoch"] < self.offset + start)]
        if self.monitor not in history.columns:
            return
        for epoch, value in zip(history["epoch"] - self.offset, history[self.monitor]):
            if self._is_improvement(value, self.best):
                self.best, self.best_epoch, self.wait = float(value), int(epoch), 0
            else:
                self.wait += 1


class JaxPredictor:
    """A JAX-backend model callable where `kiqa.evaluate.predict_paths` calls a model.

    `predict_paths` runs the model inside a `tf.function`, which only a TF-backend model
    can join; this object hands the images out of the graph (`tf.py_function`) to one
    jitted JAX forward pass. The weights are read once, when it is made, as this
    process' own arrays: under data-parallel they are replicated over all processes, and
    a forward pass on the distributed arrays would need every process in every step.

    Args:
        model: a JAX-backend kiqa model (output dict with "mos").
    """

    def __init__(self, model):
        import jax

        self.model = model
        self.values = ([_host_value(v.value) for v in model.trainable_variables],
                       [_host_value(v.value) for v in model.non_trainable_variables])
        self._forward = jax.jit(lambda trainable, other, images: model.stateless_call(
            trainable, other, images, training=False)[0]["mos"])

    def _predict(self, images):
        return np.asarray(self._forward(*self.values, images.numpy()), np.float32)

    def __call__(self, images, training=False):
        del training  # always inference
        mos = tf.py_function(self._predict, [images], tf.float32)
        mos.set_shape(images.shape[:1])
        return {"mos": mos}


def _host_value(value):
    """A jax array as this process' numpy array (a replicated global array's local copy)."""
    if getattr(value, "is_fully_addressable", True):
        return np.asarray(value)
    return np.asarray(value.addressable_data(0))


def predictor(model):
    """What `kiqa.evaluate` should call for `model`: the model itself on TF, a `JaxPredictor` on JAX."""
    return JaxPredictor(model) if keras_backend() == "jax" else model


def _is_multi_process(strategy):
    return isinstance(strategy, JaxStrategy) and strategy.num_processes > 1


def _inference_copy(model, force=False):
    """The model without optimizer state: a fresh, uncompiled copy (clone_model would
    compile it again), or the model itself when it has none (unless `force`)."""
    if getattr(model, "optimizer", None) is None and not force:
        return model
    copy = keras.Model.from_config(model.get_config(), custom_objects=custom_objects())
    if keras_backend() == "jax":  # this process' copy of replicated (data-parallel) weights
        copy.set_weights([_host_value(v.value) for v in model.weights])
    else:
        copy.set_weights(model.get_weights())
    return copy


def _save_model_atomically(model, path):
    """Saves the model for inference (no optimizer state: a third of the size), atomically."""
    inference = _inference_copy(model)
    # Keras insists on the .keras suffix, so the temporary file carries it too.
    write_atomically(path, inference.save, suffix=".keras")


def _losses(config):
    """(loss, loss_weights) for the config's head: MSE on MOS/100, or for the distribution
    head the squared EMD of the shares plus `mos_loss_weight` times that MSE."""
    if config.head != "distribution":
        return {"mos": mos_loss}, None
    from kiqa.distribution import emd_loss

    return {"mos": mos_loss, "dist": emd_loss}, {"mos": config.mos_loss_weight, "dist": 1.0}


def _compile(model, config):
    loss, loss_weights = _losses(config)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate, epsilon=config.epsilon),
        loss=loss,
        loss_weights=loss_weights,
        # On JAX, XLA is the only compiled path: jit_compile=False runs every op eagerly
        # (Keras' JAX trainer then skips jax.jit), many times slower. On TF it is a GPU switch.
        jit_compile=config.jit_compile or keras_backend() == "jax",
    )


def _nbytes(variables):
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)


def space_needed(model, run_dir, backup_dir):
    """Bytes a phase still needs free in `run_dir`, as an estimate with a 10% margin.

    At the peak the backup folder holds two backups (weights + Adam's two moments: the
    complete latest one and the one being written), and checkpoints/ two copies of the
    weights (best.keras and its replacement); model.keras adds one more at the end.
    Files already there are counted as space that will be reused.
    """
    weights = _nbytes(model.weights)
    backup = weights + 2 * _nbytes(model.trainable_weights)
    peak = 2 * backup + 3 * weights
    present = sum(
        path.stat().st_size for path in (
            Path(backup_dir) / "latest.weights.h5", Path(backup_dir) / "latest.weights.h5.bkp",
            Path(run_dir) / "checkpoints" / "best.keras", Path(run_dir) / "model.keras",
        ) if path.is_file()
    )
    return max(0, int(1.1 * peak) - present)


def _megabytes(n):
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


def check_free_space(model, run_dir, backup_dir, cause=None):
    """Raises DiskFullError when `run_dir` has less free space than `space_needed`.

    Args:
        model: the compiled model.
        run_dir: the run directory.
        backup_dir: the phase's backup folder.
        cause: an OSError (ENOSPC) that already happened: always raise, chained to it.

    Raises:
        DiskFullError: naming the folder, the space needed and the space free.
    """
    needed, free = space_needed(model, run_dir, backup_dir), shutil.disk_usage(run_dir).free
    if cause is None and free >= needed:
        return
    happened = "ran out of space" if cause is not None else "has too little free space"
    error = DiskFullError(
        f"{run_dir} {happened}: training needs about {_megabytes(needed)} free there for its backup and "
        f"checkpoints, {_megabytes(free)} is free. The last complete backup is kept: free some space "
        "and rerun the same command to resume",
        folder=str(run_dir), needed=needed, free=free,
    )
    if cause is not None:
        raise error from cause
    raise error


def _is_disk_full(err):
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err)


PHASE_NAMES = {"phase-warmup": "warm-up", "phase-finetune": "fine-tuning"}


def _fit_phase(model, dataset_for, callbacks_for, phase_dir, epochs, verbose, log, strategy=None):
    """One `model.fit` call with its own backup folder; skipped if already completed.

    The backup is restored here, before the training data is built, so the data can
    start at the epoch the run resumes from (see `kiqa.data.pipeline.make_dataset`).
    """
    done = phase_dir / "done"
    if done.exists():
        return
    phase_dir.mkdir(parents=True, exist_ok=True)
    run_dir, phase = phase_dir.parent, PHASE_NAMES.get(phase_dir.name, phase_dir.name)
    backup_dir = phase_dir / "backup"
    completed, why = restore_backup(model, backup_dir)
    if _is_multi_process(strategy):
        _check_same_epoch(strategy, completed, phase)
    if why:
        log(f"restarting {run_dir} ({phase}) from epoch 1 of {epochs}: its backup cannot be read ({why})")
    elif completed:
        log(f"resuming {run_dir} ({phase}): epoch {completed + 1} of {epochs} ({completed} completed)")
    check_free_space(model, run_dir, backup_dir)
    dataset, steps = dataset_for(completed, epochs)
    try:
        # shuffle=False: the dataset shuffles itself (Keras would only warn that it ignores True).
        model.fit(dataset, epochs=epochs, steps_per_epoch=steps, callbacks=callbacks_for(phase_dir),
                  verbose=verbose, shuffle=False)
    except OSError as err:
        if _is_disk_full(err):
            check_free_space(model, run_dir, backup_dir, cause=err)
        raise
    except Exception as err:
        if _is_multi_process(strategy) and type(err).__name__ in ("JaxRuntimeError", "XlaRuntimeError"):
            # A peer died or cannot be reached: JAX's collectives or its coordination
            # service fail this process (within HEARTBEAT_TIMEOUT_SECONDS) instead of hanging.
            raise ClusterError(
                f"the data-parallel job lost a process: process {strategy.process_id} of "
                f"{strategy.num_processes} stopped at a collective step ({_first_line(err)}); the last "
                "complete backups are kept: rerun the same commands on every process to resume"
            ) from err
        if not isinstance(err, ValueError):
            raise
        if "PerReplica" in str(err) and isinstance(
            tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy
        ):
            raise StrategyError(MULTI_WORKER_UNSUPPORTED, "multi-worker", "tensorflow", alternative="mirrored") from err
        raise
    write_text_atomically(done, "completed\n")


def _first_line(err, limit=300):
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _check_same_epoch(strategy, completed, phase):
    """Refuses to resume when the processes' backups are at different epochs.

    Every process restores its own backup (process 0's in the run directory, the others'
    in their scratch folders); a process whose backup is gone (a new host, a cleaned /tmp)
    would start over while the others resume, and the job would train on mixed weights.

    Raises:
        ConfigError: naming each process' completed epochs.
    """
    epochs = strategy.agree(completed)
    if len(set(epochs)) > 1:
        raise ConfigError(
            f"the processes cannot resume the {phase} together: their backups hold "
            + ", ".join(f"process {i}: {n} completed epoch(s)" for i, n in enumerate(epochs))
            + "; every process must resume from the same epoch (start the run again in a new run directory)"
        )


def check_parts(split, config=None):
    """Refuses a split with a part too small for correlations, before anything is trained.

    Args:
        split: a `kiqa.data.koniq.Split`.
        config: its `TrainConfig`; for a random split, the fractions give the minimum
            size of the whole set, which the message states.

    Raises:
        SetTooSmallError: (a DataError) naming the part, its size and the set's minimum.
    """
    n_images = len(split.train) + len(split.val) + len(split.test)
    for name, part in (("training", split.train), ("validation", split.val), ("test", split.test)):
        if len(part) < MIN_PART_SIZE:
            facts = (f"split {split.name!r}: the {name} part has {len(part)} image(s); it needs at least "
                     f"{MIN_PART_SIZE} for correlations")
            raise _set_too_small(facts, name, len(part), n_images, config)


def check_set_size(frame, config):
    """Refuses a set too small for a random split's fractions, before it is split.

    A random split of a few images fails in rounding (an empty part) before any part can
    be measured; this names the minimum instead, for any label file.

    Args:
        frame: the label table, bad images already dropped.
        config: its `TrainConfig` (a random or repeated split).

    Raises:
        SetTooSmallError: (a DataError) naming the short part, its size and the set's minimum.
    """
    if config.split == "official" or koniq.GROUP_COLUMN in frame.columns:
        return  # a grouped split's parts are counted once it is made (check_parts)
    n = len(frame)
    n_test = int(round(n * config.test_fraction))  # koniq.random_split's rounding
    n_val = int(round((n - n_test) * config.val_fraction))
    for part, size in (("training", n - n_test - n_val), ("validation", n_val), ("test", n_test)):
        if size < MIN_PART_SIZE:
            facts = (f"a {config.split} split of {n} image(s): the {part} part has {size} image(s); it "
                     f"needs at least {MIN_PART_SIZE} for correlations")
            raise _set_too_small(facts, part, size, n, config)


def _set_too_small(facts, part, size, n_images, config):
    """The `SetTooSmallError` for a short part (or a whole set, `part` None)."""
    minimum = None
    if config is not None and config.split != "official":
        minimum = minimum_images(config.test_fraction, config.val_fraction)
    need = (f"; at test_fraction={config.test_fraction:g} and val_fraction={config.val_fraction:g} "
            f"that takes at least {minimum} images (this set has {n_images}): add images, or "
            f"raise the fraction of the part that is short") if minimum else (
            " (use more images, or larger fractions)")
    return SetTooSmallError(f"{facts}{need}", part=part, size=size, n_images=n_images,
                            minimum=minimum, facts=facts)


def minimum_images(test_fraction, val_fraction, limit=100_000):
    """The smallest set whose random split (`kiqa.data.koniq.random_split`'s rounding) gives
    every part at least `MIN_PART_SIZE` images (a grouped split may need more)."""
    for n in range(3 * MIN_PART_SIZE, limit):
        n_test = int(round(n * test_fraction))
        n_val = int(round((n - n_test) * val_fraction))
        if min(n_test, n_val, n - n_test - n_val) >= MIN_PART_SIZE:
            return n
    return None


def _no_log(message):
    del message


def train_split(split, config, run_dir, backbone=None, verbose="auto", strategy=None, prepared=None, log=None):
    """Trains and evaluates on one split; writes everything into `run_dir`.

    Args:
        split: `kiqa.data.koniq.Split` whose frames carry a `path` column.
        config: `TrainConfig`.
        run_dir: output folder.
        backbone: optional Keras model replacing ConvNeXt (tests use a small CNN), or a
            function returning one (needed with a distribution strategy, whose scope
            must create the variables).
        verbose: Keras verbosity ("auto" shows progress bars).
        strategy: a `tf.distribute.Strategy`, or a `kiqa.distribute.JaxStrategy` on the
            JAX backend; None uses the default one.
        prepared: a `kiqa.data.prepared.Prepared` set to read training images from
            instead of decoding the files every epoch (used when it holds them all).
        log: function taking one line for the user (resuming, restarting a phase).

    Returns:
        (metrics, model_path).

    Raises:
        DiskFullError: too little free space for the backup and checkpoints.
    """
    log = log or _no_log
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_parts(split)
    write_csv_atomically(
        pd.concat([part.assign(part=name)[["image_name", "mos", "part"]]
                   for name, part in (("train", split.train), ("val", split.val), ("test", split.test))]),
        run_dir / "split.csv",
    )

    if strategy is None:
        strategy = JaxStrategy() if keras_backend() == "jax" else tf.distribute.get_strategy()
    keras.utils.set_random_seed(config.seed)
    previous_policy = keras.mixed_precision.global_policy()
    if config.mixed_precision:
        # Keras 3's policy names are the backends' own: "mixed_float16" (float16 compute,
        # float32 variables, loss scaling by Keras' optimizer) on TF and on JAX alike.
        # bfloat16 ("mixed_bfloat16") would suit TPUs and recent GPUs, but needs no loss
        # scaling and changes numerics: not chosen silently.
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with strategy.scope():
            if backbone is not None and not isinstance(backbone, keras.Model):
                backbone = backbone()  # a factory: variables must be made inside the scope
            model = build_model(config, backbone=backbone)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    unusable = prepared.check_names(split.train["image_name"]) if prepared is not None else None
    if unusable and config.prepared:  # a set the user named must serve, not be skipped
        raise DataError(unusable)
    use_prepared = prepared is not None and unusable is None

    # The distribution head's targets: the shares of votes per level (checked row by row).
    dist = koniq.require_shares(split.train) if config.head == "distribution" else None

    def dataset_for(first_epoch, epochs):
        # Epoch k's order and flips come from (seed, k): a resumed run sees what an
        # uninterrupted one would have seen.
        if use_prepared:
            dataset = prepared.dataset(split.train["image_name"], split.train["mos"], config, training=True,
                                       epochs=epochs, first_epoch=first_epoch, dist=dist)
        else:
            dataset = make_dataset(split.train["path"], split.train["mos"], config, training=True, part="train",
                                   epochs=epochs, first_epoch=first_epoch, dist=dist)
        if isinstance(strategy, JaxStrategy) and strategy.distribution is not None:
            # keras.distribution steps every process together on equal global batches:
            # each epoch's short last batch is dropped (see JaxStrategy.shard).
            steps = len(split.train) // config.batch_size
            if steps == 0:
                raise DataError(
                    f"split {split.name!r}: {len(split.train)} training image(s) make no full batch of "
                    f"{config.batch_size}, which data-parallel training needs"
                )
            return strategy.shard(dataset, config.batch_size), steps
        return dataset, steps_per_epoch(len(split.train), config)

    history_csv = run_dir / "history.csv"
    best_path = run_dir / "checkpoints" / "best.keras"
    best_path.parent.mkdir(exist_ok=True)
    mode = _monitor_mode(config.monitor)

    def callbacks_for(phase_dir):
        # Order matters: Keras calls them in turn with one logs dict. The validation
        # metrics first; the log and the best checkpoint before the backup, so a kill
        # between them repeats the epoch (rewriting its row) instead of losing it.
        offset = config.warmup_epochs if phase_dir.name == "phase-finetune" else 0
        return [
            ValidationMetrics(split.val["path"], split.val["mos"], config, strategy),
            ResumableEarlyStopping(
                history_csv, offset, monitor=config.monitor, mode=mode, patience=config.patience,
                restore_best_weights=True,
            ),
            BestCheckpoint(best_path, config.monitor, initial_value=_best_so_far(history_csv, config.monitor)),
            EpochLog(history_csv, offset),
            ResumableBackup(str(phase_dir / "backup")),
            keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False),
        ]

    with strategy.scope():
        if config.warmup_epochs:
            # Head-only warm-up: a freshly initialised head would send large gradients
            # into the pretrained backbone in the first steps.
            set_backbone_trainable(model, False)
            _compile(model, config)
            _fit_phase(model, dataset_for, callbacks_for, run_dir / "phase-warmup",
                       config.warmup_epochs, verbose, log, strategy)
            set_backbone_trainable(model, True)
        _compile(model, config)
        _fit_phase(model, dataset_for, callbacks_for, run_dir / "phase-finetune",
                   config.epochs, verbose, log, strategy)

    # The best checkpoint spans restarts; EarlyStopping's restored weights do not.
    if _is_multi_process(strategy):
        with strategy.local():  # a copy on this process alone, for evaluating and saving
            model = _inference_copy(model, force=True)
    else:
        model = _inference_copy(model)
    if best_path.exists():
        model.load_weights(best_path)
    model_path = run_dir / "model.keras"
    _save_model_atomically(model, model_path)
    if best_path.exists():
        # model.keras now holds the best epoch's weights, as best.keras does: one copy on
        # disk (~107 MB for ConvNeXt-Tiny), both paths still load. Where the file system
        # has no hard links the two files stay.
        link_atomically(model_path, best_path)

    history = read_history(history_csv)
    # The warning provenance.json will carry (it depends on the data and the backbone, not the metrics).
    warning = provenance.for_training(config, None, len(split.train), len(split.train),
                                      custom_backbone=backbone is not None).warning()
    if len(history):
        write_csv_atomically(history, history_csv)
        plot_history(history, run_dir / "loss.png", title=f"{config.name}: {split.name}", warning=warning,
                     best_epoch=_best_epoch(history, config.monitor, mode))
    metrics, _ = evaluate_frame(predictor(model), split.test, config, out_dir=run_dir,
                                title=f"{config.name} {split.name} test", warning=warning)
    return metrics, model_path


def _best_epoch(history, monitor, mode):
    """The 0-based epoch whose weights early stopping kept, or None when not logged."""
    if monitor not in history.columns or history[monitor].dropna().empty:
        return None
    values = history.set_index("epoch")[monitor].dropna()
    return int(values.idxmin() if mode == "min" else values.idxmax())


def _prepared_set(config):
    """The prepared set (`kiqa prepare`) training reads from, or None.

    The default folder beside the label file is used when it matches the config; a
    folder named in `config.prepared` must match.

    Raises:
        ConfigError: `config.prepared` names a folder that cannot be used (the reason).
    """
    if not config.labels:
        return None
    if not config.prepared:
        return open_prepared(default_prepared_dir(config.labels, config.image_size), config)
    prepared, why = inspect_prepared(Path(config.prepared), config)
    if prepared is None:
        raise ConfigError(f"the prepared set {config.prepared} cannot be used: {why}")
    return prepared


def _write_provenance(run_dir, config, metrics, frame, rejects, backbone):
    """provenance.json beside model.keras (and, for repeats, in every split's folder)."""
    record = provenance.for_training(
        config, metrics, n_images=len(frame), n_labelled=len(frame) + len(rejects),
        custom_backbone=backbone is not None,
    )
    provenance.write(run_dir, record)
    for split_dir in run_dir.iterdir():
        if split_dir.is_dir() and (split_dir / "model.keras").is_file():
            provenance.write(split_dir, record)
    return record


def completed_epochs(run_dir):
    """Epochs a run directory holds a record of (history rows and backups), 0 for none."""
    run_dir = Path(run_dir)
    count = max([len(read_history(h)) for h in run_dir.glob("**/history.csv")], default=0)
    for metadata in run_dir.glob("**/backup/training_metadata.json*"):
        try:
            count = max(count, int(json.loads(metadata.read_text())["epoch"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return count


def _is_run_dir(folder):
    """Whether `folder` holds a kiqa run: a config.json that loads as a `TrainConfig`, or
    only the rejects.csv of a run whose image checks stopped it before its config."""
    if {child.name for child in folder.iterdir()} <= {"rejects.csv"}:
        return True
    try:
        TrainConfig.load(folder / "config.json")
    except ConfigError:
        return False
    return True


def _check_run_dir(run_dir, config, overwrite, log):
    """Refuses to mix runs: a finished run, or a different config in a run that trained.

    A run that failed before its first completed epoch (a wrong label file, a part too
    small, a full disk at the first backup) holds nothing worth keeping: it is replaced.
    """
    if overwrite and run_dir.exists():
        # Only a run folder is removed: `--run-dir ~/photos --overwrite` must not delete photos.
        if run_dir.is_symlink() or not run_dir.is_dir() or (any(run_dir.iterdir()) and not _is_run_dir(run_dir)):
            raise OutputIsInputError(
                f"{run_dir} is not a kiqa run folder (no readable config.json of a run in it), so it is "
                f"not replaced; it is left untouched: choose another run folder", path=str(run_dir))
        shutil.rmtree(run_dir)
    if (run_dir / "metrics.json").exists():
        raise RunExistsError(f"{run_dir} already holds a finished run (metrics.json)", run_dir, changed=())
    saved = run_dir / "config.json"
    if saved.exists():
        previous = TrainConfig.load(saved)
        if previous != config:
            changed = config.changed_keys(previous)
            if completed_epochs(run_dir) == 0:
                log(f"replacing {run_dir}: its earlier run completed no epoch (changed: {changed})")
                shutil.rmtree(run_dir)
                return
            raise RunExistsError(
                f"{run_dir} holds an unfinished run started with a different config "
                f"(changed: {changed}); rerun with the same settings to resume it",
                run_dir, changed, finished=False,
            )


def train(
    config: TrainConfig, backbone: Optional[keras.Model] = None, overwrite: bool = False, progress: bool = True,
    log: Optional[Callable[[str], None]] = None, cluster: Optional[Cluster] = None,
) -> TrainResult:
    """Runs a whole training job: data checks, split(s), training, evaluation, plots.

    The run's config.json is written only once the data are checked and split, so a run
    that fails before that leaves no config to lock its folder; rejects.csv is written
    as soon as the images are checked, also when the checks stop the run.

    Args:
        config: `TrainConfig`. `labels=None` trains on the built-in demo data.
        backbone: optional Keras model replacing ConvNeXt (tests).
        overwrite: delete an existing run directory first.
        progress: show progress bars.
        log: function taking one line for the user (resuming, restarting, replacing).
        cluster: where this process stands in a multi-process JAX run
            (`kiqa.distribute.Cluster`); None reads it from the environment.

    Returns:
        A `TrainResult`.

    Raises:
        ImageFolderError: most images are missing from the image folder.
        BadImagesError: the bad-image policy stops the run (see `on_bad_images`).
        RunExistsError: the run folder holds a finished run, or one with another config.
        WeightsError: the backbone's weights cannot be had.
        DiskFullError: the run folder's disk is full.
        KiqaError: another unusable label file, config or cluster set-up (a subclass
            naming it).
    """
    log = log or _no_log
    # First, before any other TF op: multi-worker collectives must be set up at start-up.
    strategy = make_strategy(config.strategy, cluster)
    run_dir = writable_run_dir(config.resolved_run_dir, strategy)
    _check_run_dir(run_dir, config, overwrite, log)

    frame, paths, rejects, root = check_labels(config, progress=progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Written before the checks can stop the run: every reject, also when they do.
    write_csv_atomically(rejects, run_dir / "rejects.csv")
    check_image_folder(frame, rejects, root)
    frame = apply_bad_image_policy(frame, paths, rejects, config)

    check_set_size(frame, config)
    splits = koniq.make_splits(frame, config)
    for split in splits:
        check_parts(split, config)
    config.save(run_dir / "config.json")
    verbose = "auto" if progress else 0
    prepared = _prepared_set(config)
    if len(splits) == 1:
        metrics, model_path = train_split(splits[0], config, run_dir, backbone, verbose, strategy, prepared, log)
        _write_provenance(run_dir, config, metrics, frame, rejects, backbone)
        return TrainResult(run_dir, metrics, model_path, rejects, prepared and prepared.path)

    rows = []
    for index, split in enumerate(splits):
        split_dir = run_dir / split.name
        if (split_dir / "metrics.json").exists():
            metrics = json.loads((split_dir / "metrics.json").read_text())
        else:
            metrics, _ = train_split(
                split, config.replace(seed=config.seed + index), split_dir, backbone, verbose, strategy, prepared, log
            )
        rows.append(dict(split=split.name, **{k: v for k, v in metrics.items() if k != "split"}))
    table = pd.DataFrame(rows)
    write_csv_atomically(table, run_dir / "repeats.csv", float_format="%.4f")
    summary = summarize_repeats([{k: v for k, v in r.items() if k != "split"} for r in rows])
    plot_repeats(table, run_dir / "repeats.png")
    write_json(run_dir / "metrics.json", {"protocol": f"{len(splits)} seeded random splits", "summary": summary, "splits": rows})
    _write_provenance(run_dir, config, summary, frame, rejects, backbone)
    return TrainResult(run_dir, summary, None, rejects, prepared and prepared.path)


# `kiqa.train(...)` calls `train` above: the module is also the public function (kiqa/__init__.py).
sys.modules[__name__].__class__ = CallableModule
