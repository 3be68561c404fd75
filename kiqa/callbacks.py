"""Keras callbacks of a training run, and how a trained model is called and saved.

Each callback makes a run resumable bit for bit after a kill or a full disk: the backup
rotates complete files by renames, the per-epoch log and the best checkpoint are written
whole, early stopping's patience survives a restart. `predictor` is what evaluation calls
for a model on either backend; `save_model_atomically` writes a model for inference.
"""

import json
import os
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from kiqa.contract import MOS_SCALE
from kiqa.distribute import keras_backend
from kiqa.evaluate import predict_paths
from kiqa.fsutil import write_atomically, write_csv_atomically
from kiqa.metrics import evaluate_scores
from kiqa.model import custom_objects
from kiqa.run import read_history


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


def monitor_mode(monitor):
    return "min" if monitor == "val_loss" else "max"


def best_so_far(history_csv, monitor):
    """The best monitored value logged before a restart, so a resumed run's checkpoint
    callback does not overwrite the best checkpoint with a worse one."""
    history = read_history(history_csv)
    if monitor not in history.columns or history[monitor].dropna().empty:
        return None
    values = history[monitor].dropna()
    return float(values.min() if monitor_mode(monitor) == "min" else values.max())


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
        self.better = np.less if monitor_mode(monitor) == "min" else np.greater

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not np.isfinite(value):
            return
        if self.best is None or self.better(value, self.best):
            self.best = float(value)
            save_model_atomically(self.model, self.path)


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
        self.values = ([host_value(v.value) for v in model.trainable_variables],
                       [host_value(v.value) for v in model.non_trainable_variables])
        self._forward = jax.jit(lambda trainable, other, images: model.stateless_call(
            trainable, other, images, training=False)[0]["mos"])

    def _predict(self, images):
        return np.asarray(self._forward(*self.values, images.numpy()), np.float32)

    def __call__(self, images, training=False):
        del training  # always inference
        mos = tf.py_function(self._predict, [images], tf.float32)
        mos.set_shape(images.shape[:1])
        return {"mos": mos}


def host_value(value):
    """A jax array as this process' numpy array (a replicated global array's local copy)."""
    if getattr(value, "is_fully_addressable", True):
        return np.asarray(value)
    return np.asarray(value.addressable_data(0))


def predictor(model):
    """What `kiqa.evaluate` should call for `model`: the model itself on TF, a `JaxPredictor` on JAX."""
    return JaxPredictor(model) if keras_backend() == "jax" else model


def inference_copy(model, force=False):
    """The model without optimizer state: a fresh, uncompiled copy (clone_model would
    compile it again), or the model itself when it has none (unless `force`)."""
    if getattr(model, "optimizer", None) is None and not force:
        return model
    copy = keras.Model.from_config(model.get_config(), custom_objects=custom_objects())
    if keras_backend() == "jax":  # this process' copy of replicated (data-parallel) weights
        copy.set_weights([host_value(v.value) for v in model.weights])
    else:
        copy.set_weights(model.get_weights())
    return copy


def save_model_atomically(model, path):
    """Saves the model for inference (no optimizer state: a third of the size), atomically."""
    inference = inference_copy(model)
    # Keras insists on the .keras suffix, so the temporary file carries it too.
    write_atomically(path, inference.save, suffix=".keras")
