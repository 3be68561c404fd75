"""Training: the KonCept-style recipe made into a resumable, inspectable run.

A run directory holds everything (see `docs/training.md`, "The run directory"): the resolved
config, the checked images and their split, Keras checkpoints, a backup for resuming,
CSV and TensorBoard logs, the test metrics, predictions and plots. Rerunning the same
command after a crash or a kill resumes from the last completed epoch.
"""

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import keras
import pandas as pd
import tensorflow as tf

from kiqa import CallableModule, provenance
from kiqa.config import TrainConfig
from kiqa.data import koniq
from kiqa.data.pipeline import make_dataset, steps_per_epoch
from kiqa.data.prepared import default_prepared_dir, inspect_prepared, open_prepared
from kiqa.data.validate import apply_bad_image_policy, check_image_folder, check_labels
from kiqa.distribute import Cluster, JaxStrategy, keras_backend, make_strategy, writable_run_dir
from kiqa.errors import ClusterError, ConfigError, DataError, SetTooSmallError, StrategyError
from kiqa.callbacks import (
    BestCheckpoint, EpochLog, ResumableBackup, ResumableEarlyStopping, ValidationMetrics, best_so_far,
    inference_copy, monitor_mode, predictor, restore_backup, save_model_atomically,
)
from kiqa.fsutil import (
    is_disk_full, link_atomically, nbytes, require_free_space, write_csv_atomically, write_text_atomically,
)
from kiqa.evaluate import evaluate_frame, write_json
from kiqa.metrics import summarize_repeats
from kiqa.model import build_model, mos_loss, set_backbone_trainable
from kiqa.plots import plot_history, plot_repeats
from kiqa.run import check_run_folder, read_history

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


def _is_multi_process(strategy):
    return isinstance(strategy, JaxStrategy) and strategy.num_processes > 1


def losses(config):
    """(loss, loss_weights) for the config's head: MSE on MOS/100, or for the distribution
    head `RatingLoss` on the shares (squared EMD plus `sd_loss_weight` times the spread's
    squared error) plus `mos_loss_weight` times that MSE."""
    if config.head != "distribution":
        return {"mos": mos_loss}, None
    from kiqa.distribution import RatingLoss

    return ({"mos": mos_loss, "dist": RatingLoss(spread_weight=config.sd_loss_weight)},
            {"mos": config.mos_loss_weight, "dist": 1.0})


def _compile(model, config):
    loss, loss_weights = losses(config)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate, epsilon=config.epsilon),
        loss=loss,
        loss_weights=loss_weights,
        # On JAX, XLA is the only compiled path: jit_compile=False runs every op eagerly
        # (Keras' JAX trainer then skips jax.jit), many times slower. On TF it is a GPU switch.
        jit_compile=config.jit_compile or keras_backend() == "jax",
    )
    # Adam's moments made now, not inside the first traced train step: a tf.function that
    # creates variables traces its step twice (once to create them, once without), and
    # Keras defers the build when no distribution strategy was set (~19 s for ConvNeXt-Tiny).
    model.optimizer.build(model.trainable_variables)


def space_needed(model, run_dir, backup_dir):
    """Bytes a phase still needs free in `run_dir`, as an estimate with a 10% margin.

    At the peak the backup folder holds two backups (weights + Adam's two moments: the
    complete latest one and the one being written), and checkpoints/ two copies of the
    weights (best.keras and its replacement); model.keras adds one more at the end.
    Files already there are counted as space that will be reused.
    """
    weights = nbytes(model.weights)
    backup = weights + 2 * nbytes(model.trainable_weights)
    peak = 2 * backup + 3 * weights
    present = sum(
        path.stat().st_size for path in (
            Path(backup_dir) / "latest.weights.h5", Path(backup_dir) / "latest.weights.h5.bkp",
            Path(run_dir) / "checkpoints" / "best.keras", Path(run_dir) / "model.keras",
        ) if path.is_file()
    )
    return max(0, int(1.1 * peak) - present)


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
    require_free_space(
        run_dir, space_needed(model, run_dir, backup_dir), "training needs", purpose="its backup and checkpoints",
        kept="The last complete backup is kept: free some space and rerun the same command to resume",
        cause=cause,
    )


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
        if is_disk_full(err):
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
    model, backbone = _build_in_scope(config, backbone, strategy)
    history_csv = run_dir / "history.csv"
    best_path = run_dir / "checkpoints" / "best.keras"
    best_path.parent.mkdir(exist_ok=True)
    dataset_for = _training_data(split, config, strategy, prepared)
    callbacks_for = _callbacks(split, config, strategy, run_dir, history_csv, best_path)

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
    return _finish(model, split, config, strategy, run_dir, history_csv, best_path, custom=backbone is not None)


def _build_in_scope(config, backbone, strategy):
    """(model, backbone): the model built in the strategy's scope, under the config's precision policy."""
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
            return build_model(config, backbone=backbone), backbone
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _training_data(split, config, strategy, prepared):
    """`dataset_for(first_epoch, epochs) -> (dataset, steps per epoch)` of the training part."""
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

    return dataset_for


def _callbacks(split, config, strategy, run_dir, history_csv, best_path):
    """`callbacks_for(phase_dir) -> [callbacks]` of one training phase."""
    mode = monitor_mode(config.monitor)

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
            BestCheckpoint(best_path, config.monitor, initial_value=best_so_far(history_csv, config.monitor)),
            EpochLog(history_csv, offset),
            ResumableBackup(str(phase_dir / "backup")),
            keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False),
        ]

    return callbacks_for


def _finish(model, split, config, strategy, run_dir, history_csv, best_path, custom):
    """Saves the best weights as model.keras, plots the history and evaluates the test part.

    Returns:
        (metrics, model_path).
    """
    # The best checkpoint spans restarts; EarlyStopping's restored weights do not.
    if _is_multi_process(strategy):
        with strategy.local():  # a copy on this process alone, for evaluating and saving
            model = inference_copy(model, force=True)
    else:
        model = inference_copy(model)
    if best_path.exists():
        model.load_weights(best_path)
    model_path = run_dir / "model.keras"
    save_model_atomically(model, model_path)
    if best_path.exists():
        # model.keras now holds the best epoch's weights, as best.keras does: one copy on
        # disk (~107 MB for ConvNeXt-Tiny), both paths still load. Where the file system
        # has no hard links the two files stay.
        link_atomically(model_path, best_path)

    history = read_history(history_csv)
    # The warning provenance.json will carry (it depends on the data and the backbone, not the metrics).
    warning = provenance.for_training(config, None, len(split.train), len(split.train),
                                      custom_backbone=custom).warning()
    if len(history):
        write_csv_atomically(history, history_csv)
        plot_history(history, run_dir / "loss.png", title=f"{config.name}: {split.name}", warning=warning,
                     best_epoch=_best_epoch(history, config.monitor, monitor_mode(config.monitor)))
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
    check_run_folder(run_dir, config, overwrite, log)

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
