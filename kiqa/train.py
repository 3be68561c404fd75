"""Training: the KonCept-style recipe made into a resumable, inspectable run.

A run directory holds everything (see `README.md`, "The run directory"): the resolved
config, the checked images and their split, Keras checkpoints, a backup for resuming,
CSV and TensorBoard logs, the test metrics, predictions and plots. Rerunning the same
command after a crash or a kill resumes from the last completed epoch.
"""

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from kiqa import provenance
from kiqa.config import TrainConfig
from kiqa.data import koniq
from kiqa.data.pipeline import make_dataset
from kiqa.data.prepared import default_prepared_dir, open_prepared
from kiqa.data.validate import load_checked_labels
from kiqa.distribute import make_strategy, writable_run_dir
from kiqa.errors import ConfigError, DataError
from kiqa.evaluate import evaluate_frame, predict_paths, write_json
from kiqa.metrics import evaluate_scores, summarize_repeats
from kiqa.model import MOS_SCALE, build_model, custom_objects, mos_loss, set_backbone_trainable
from kiqa.plots import plot_history, plot_repeats

# PLCC/SRCC need a few points; fewer makes every epoch's validation metric meaningless.
MIN_PART_SIZE = 3
FROM_SCRATCH_CAVEAT = (
    "ConvNeXt is being trained from random weights (--weights none). Measured on "
    "demo-like data, a ConvNeXt trained from scratch on a few hundred images learns next "
    "to nothing about quality (held-out SRCC stays near 0: it memorises the training "
    "photos). Treat this run's test numbers as a check that the pipeline runs, not as a "
    "result. ImageNet weights (--weights imagenet, or a local weights file) are what make "
    "ConvNeXt work for quality."
)
MULTI_WORKER_UNSUPPORTED = (
    "Keras 3's model.fit cannot train under tf.distribute.MultiWorkerMirroredStrategy on TF "
    "2.21: its train step hands a PerReplica value to an op that wants a tensor (open "
    "upstream: keras-team/keras issue 20585, tensorflow/tensorflow issue 72388). Train on one "
    "host: --strategy mirrored uses every local GPU."
)
SMALL_CNN_CAVEAT = (
    "Training the small CNN (--backbone small-cnn), kiqa's backbone for offline teaching and "
    "testing: a plain ReLU CNN from random weights. It learns the demo distortions in minutes, "
    "but its scores are not meaningful quality predictions; the real model is ConvNeXt from "
    "ImageNet weights."
)
DEMO_CAVEAT = (
    "Training on kiqa's built-in demo data: sample photos with synthetic blur, noise and "
    "JPEG artefacts and made-up scores. It is not KonIQ-10k; pass --labels to train on KonIQ."
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
    metrics: dict
    model_path: Path
    rejects: pd.DataFrame
    prepared_dir: Path = None


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
    """`BackupAndRestore` that survives its own backup being cut short by a kill.

    Keeps two backup copies (`double_checkpoint`), and if the backup still cannot be
    read (a truncated file), warns and starts the phase again instead of failing the
    same way on every rerun.
    """

    def __init__(self, backup_dir):
        super().__init__(backup_dir, save_freq="epoch", double_checkpoint=True)

    def on_train_begin(self, logs=None):
        try:
            super().on_train_begin(logs)
        except (OSError, ValueError, KeyError) as err:
            warnings.warn(
                f"the training backup in {self.backup_dir} cannot be read ({err}); "
                "starting this phase again from its first epoch"
            )
            shutil.rmtree(self.backup_dir)


class ValidationMetrics(keras.callbacks.Callback):
    """Adds val_loss, val_plcc and val_srcc to the epoch logs from one validation pass.

    Keras' own `validation_data` pass would predict the validation set a second time
    for the loss alone; this computes the same loss (`mos_loss`, MSE on MOS/100) from
    the predictions it needs for the correlations anyway.

    Must come before EarlyStopping, ModelCheckpoint and CSVLogger in the callback list,
    since Keras calls callbacks in order with the same logs dict.
    """

    def __init__(self, paths, mos, config):
        super().__init__()
        self.paths, self.mos, self.config = list(paths), np.asarray(mos, float), config

    def on_epoch_end(self, epoch, logs=None):
        predicted = predict_paths(self.model, self.paths, self.config, part="val")
        ok = np.isfinite(predicted)
        scores = evaluate_scores(self.mos[ok], predicted[ok])
        if logs is not None:
            logs["val_loss"] = float(np.mean(((self.mos[ok] - predicted[ok]) / MOS_SCALE) ** 2))
            logs["val_plcc"] = scores["plcc"]
            logs["val_srcc"] = scores["srcc"]


def _monitor_mode(monitor):
    return "min" if monitor == "val_loss" else "max"


def _best_so_far(history_csv, monitor):
    """The best monitored value logged before a restart, so a resumed run's checkpoint
    callback does not overwrite the best checkpoint with a worse one."""
    if not history_csv.is_file():
        return None
    history = pd.read_csv(history_csv)
    if monitor not in history.columns or history[monitor].dropna().empty:
        return None
    values = history[monitor].dropna()
    return float(values.min() if _monitor_mode(monitor) == "min" else values.max())


def _read_history(history_csv):
    history = pd.read_csv(history_csv)
    # A kill between the CSV row and the backup repeats an epoch on resume: keep the last.
    return history.drop_duplicates(subset="epoch", keep="last").reset_index(drop=True)


def _save_model_atomically(model, path):
    """Saves the model for inference (no optimizer state: a third of the size), atomically."""
    path = Path(path)
    if model.optimizer is not None:
        # A fresh, uncompiled copy (clone_model would compile it again).
        weights = model.get_weights()
        model = keras.Model.from_config(model.get_config(), custom_objects=custom_objects())
        model.set_weights(weights)
    tmp = path.parent / f".{path.stem}-{os.getpid()}.keras"
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _compile(model, config):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate, epsilon=config.epsilon),
        loss={"mos": mos_loss},
        jit_compile=config.jit_compile,
    )


def _fit_phase(model, train_ds, callbacks_for, phase_dir, epochs, verbose):
    """One `model.fit` call with its own backup folder; skipped if already completed."""
    done = phase_dir / "done"
    if done.exists():
        return
    phase_dir.mkdir(parents=True, exist_ok=True)
    try:
        model.fit(train_ds, epochs=epochs, callbacks=callbacks_for(phase_dir), verbose=verbose)
    except ValueError as err:
        if "PerReplica" in str(err) and isinstance(
            tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy
        ):
            raise ConfigError(MULTI_WORKER_UNSUPPORTED) from err
        raise
    done.write_text("completed\n")


def train_split(split, config, run_dir, backbone=None, verbose="auto", strategy=None, prepared=None):
    """Trains and evaluates on one split; writes everything into `run_dir`.

    Args:
        split: `kiqa.data.koniq.Split` whose frames carry a `path` column.
        config: `TrainConfig`.
        run_dir: output folder.
        backbone: optional Keras model replacing ConvNeXt (tests use a small CNN), or a
            function returning one (needed with a distribution strategy, whose scope
            must create the variables).
        verbose: Keras verbosity ("auto" shows progress bars).
        strategy: a `tf.distribute.Strategy`; None uses the default one.
        prepared: a `kiqa.data.prepared.Prepared` set to read training images from
            instead of decoding the files every epoch (used when it holds them all).

    Returns:
        (metrics, model_path).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("training", split.train), ("validation", split.val), ("test", split.test)):
        if len(part) < MIN_PART_SIZE:
            raise DataError(
                f"split {split.name!r}: the {name} part has {len(part)} image(s); it needs at least "
                f"{MIN_PART_SIZE} for correlations (use more images, or larger fractions)"
            )
    pd.concat(
        [part.assign(part=name)[["image_name", "mos", "part"]]
         for name, part in (("train", split.train), ("val", split.val), ("test", split.test))]
    ).to_csv(run_dir / "split.csv", index=False)

    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(config.seed)
    previous_policy = keras.mixed_precision.global_policy()
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with strategy.scope():
            if backbone is not None and not isinstance(backbone, keras.Model):
                backbone = backbone()  # a factory: variables must be made inside the scope
            model = build_model(config, backbone=backbone)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    if prepared is not None and prepared.check_names(split.train["image_name"]) is None:
        train_ds = prepared.dataset(split.train["image_name"], split.train["mos"], config, training=True)
    else:
        train_ds = make_dataset(split.train["path"], split.train["mos"], config, training=True, part="train")
    history_csv = run_dir / "history.csv"
    best_path = run_dir / "checkpoints" / "best.keras"
    best_path.parent.mkdir(exist_ok=True)
    mode = _monitor_mode(config.monitor)

    def callbacks_for(phase_dir):
        return [
            ValidationMetrics(split.val["path"], split.val["mos"], config),
            ResumableBackup(str(phase_dir / "backup")),
            keras.callbacks.ModelCheckpoint(
                str(best_path), monitor=config.monitor, mode=mode, save_best_only=True,
                initial_value_threshold=_best_so_far(history_csv, config.monitor),
            ),
            keras.callbacks.EarlyStopping(
                monitor=config.monitor, mode=mode, patience=config.patience, restore_best_weights=True,
            ),
            keras.callbacks.CSVLogger(str(history_csv), append=True),
            keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False),
        ]

    with strategy.scope():
        if config.warmup_epochs:
            # Head-only warm-up: a freshly initialised head would send large gradients
            # into the pretrained backbone in the first steps.
            set_backbone_trainable(model, False)
            _compile(model, config)
            _fit_phase(model, train_ds, callbacks_for, run_dir / "phase-warmup",
                       config.warmup_epochs, verbose)
            set_backbone_trainable(model, True)
        _compile(model, config)
        _fit_phase(model, train_ds, callbacks_for, run_dir / "phase-finetune",
                   config.epochs, verbose)

    if best_path.exists():
        # The best checkpoint spans restarts; EarlyStopping's restored weights do not.
        model.load_weights(best_path)
    model_path = run_dir / "model.keras"
    _save_model_atomically(model, model_path)

    if history_csv.is_file():
        history = _read_history(history_csv)
        history.to_csv(history_csv, index=False)
        plot_history(history, run_dir / "loss.png", title=f"{config.name}: {split.name}")
    metrics, _ = evaluate_frame(model, split.test, config, out_dir=run_dir, title=f"{config.name} {split.name} test")
    return metrics, model_path


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


def _check_run_dir(run_dir, config, overwrite):
    """Refuses to mix runs: a finished run or a different config in the same folder."""
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    if (run_dir / "metrics.json").exists():
        raise ConfigError(
            f"{run_dir} already holds a finished run (metrics.json); pass --run-dir for a new "
            "one, or --overwrite to replace it"
        )
    saved = run_dir / "config.json"
    if saved.exists():
        previous = TrainConfig.load(saved)
        if previous != config:
            changed = sorted(k for k, v in config.to_dict().items() if previous.to_dict().get(k) != v)
            raise ConfigError(
                f"{run_dir} holds an unfinished run started with a different config "
                f"(changed: {changed}); rerun with the same settings to resume it, or pass "
                "--run-dir for a new run, or --overwrite to start again"
            )


def train(config, backbone=None, overwrite=False, progress=True):
    """Runs a whole training job: data checks, split(s), training, evaluation, plots.

    Args:
        config: `TrainConfig`. `labels=None` trains on the built-in demo data.
        backbone: optional Keras model replacing ConvNeXt (tests).
        overwrite: delete an existing run directory first.
        progress: show progress bars.

    Returns:
        A `TrainResult`.

    Raises:
        kiqa.errors.KiqaError subclasses for unusable data, configs or weights.
    """
    # First, before any other TF op: multi-worker collectives must be set up at start-up.
    strategy = make_strategy(config.strategy)
    run_dir = writable_run_dir(config.resolved_run_dir, strategy)
    _check_run_dir(run_dir, config, overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / "config.json")

    frame, rejects = load_checked_labels(config, progress=progress)
    rejects.to_csv(run_dir / "rejects.csv", index=False)

    splits = koniq.make_splits(frame, config)
    verbose = "auto" if progress else 0
    # A prepared set (`kiqa prepare`) beside the label file is used when it matches.
    prepared = open_prepared(default_prepared_dir(config.labels, config.image_size), config) if config.labels else None
    if len(splits) == 1:
        metrics, model_path = train_split(splits[0], config, run_dir, backbone, verbose, strategy, prepared)
        _write_provenance(run_dir, config, metrics, frame, rejects, backbone)
        return TrainResult(run_dir, metrics, model_path, rejects, prepared and prepared.path)

    rows = []
    for index, split in enumerate(splits):
        split_dir = run_dir / split.name
        if (split_dir / "metrics.json").exists():
            metrics = json.loads((split_dir / "metrics.json").read_text())
        else:
            metrics, _ = train_split(
                split, config.replace(seed=config.seed + index), split_dir, backbone, verbose, strategy, prepared
            )
        rows.append(dict(split=split.name, **{k: v for k, v in metrics.items() if k != "split"}))
    table = pd.DataFrame(rows)
    table.to_csv(run_dir / "repeats.csv", index=False, float_format="%.4f")
    summary = summarize_repeats([{k: v for k, v in r.items() if k != "split"} for r in rows])
    plot_repeats(table, run_dir / "repeats.png")
    write_json(run_dir / "metrics.json", {"protocol": f"{len(splits)} seeded random splits", "summary": summary, "splits": rows})
    _write_provenance(run_dir, config, summary, frame, rejects, backbone)
    return TrainResult(run_dir, summary, None, rejects, prepared and prepared.path)
