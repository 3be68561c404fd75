"""tf.data pipelines for training and evaluation.

Elements are `(images, {"mos": mos})`: images float32[B, H, W, 3] with pixels 0-255 as
the model's one input (`image`) takes them, targets float32[B] on KonIQ's 0-100 scale.
With `with_index=True` the first element is a dict `{"image", "index"}` instead. Training normalises
internally through the loss (`kiqa.model.mos_loss` works on MOS/100), so every number a
user sees stays on 0-100.

Augmentation is quality-preserving only: horizontal flips. Blur, colour, contrast or zoom
changes alter the very quality the label describes.
"""

import hashlib
import os
from pathlib import Path

import tensorflow as tf

from kiqa.image import DECODE_VERSION, file_decoder

AUTOTUNE = tf.data.AUTOTUNE
# Decoded images held by the shuffle buffer when a cache fixes the element order:
# 1024 images at 384x512 in uint8 are 600 MB.
CACHED_SHUFFLE_BUFFER = 1024


def augment(image, seeds, config):
    """Quality-preserving augmentation: a random crop without rescaling, a horizontal flip.

    Args:
        image: float32 [H, W, 3].
        seeds: int64 [4]; two stateless seeds (crop, flip), fresh for every element.
        config: `TrainConfig` (train_crop, hflip).

    Returns:
        The augmented image, [crop_h, crop_w, 3] when cropping.
    """
    if config.train_crop:
        height, width = config.train_crop
        image = tf.image.stateless_random_crop(image, (height, width, 3), seeds[:2])
    if config.hflip:
        image = tf.image.stateless_random_flip_left_right(image, seeds[2:])
    return image


def _cache_file(config, paths, part):
    """A file-cache name unique to the files and decode settings (a stale cache is wrong data)."""
    key = hashlib.sha256(
        "\n".join([*paths, str(config.image_size), str(config.max_pixels), f"decode-v{DECODE_VERSION}"])
        .encode("utf-8", "surrogateescape")
    ).hexdigest()[:16]
    folder = Path(config.cache)
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{part}-{key}")


def epoch_seed(config, epoch):
    """The stateless seed pair of one training epoch: a function of (seed, epoch) only.

    Every random choice of an epoch (its order, each element's flip and crop) derives
    from it, so epoch k draws the same whether the run got there in one process or was
    killed and resumed: resuming is exact.
    """
    return tf.constant([config.seed, epoch], tf.int64)


def steps_per_epoch(n, config):
    """Batches in one training epoch of `n` images (the last one may be smaller)."""
    return -(-n // config.batch_size)


def make_dataset(paths, mos, config, training, with_index=False, part="train", epochs=None, first_epoch=0,
                 dist=None):
    """Builds the input pipeline for one part of a split.

    Args:
        paths: image file paths (already checked by `kiqa.data.validate`); `str` under
            `kiqa.fsutil`'s rule or bytes.
        mos: 0-100 targets aligned with `paths`.
        config: `TrainConfig` (image_size, batch_size, cache, hflip, seed, max_pixels).
        training: shuffle and augment, epoch by epoch (see `epochs`).
        with_index: add `"index"` (position in `paths`) to the features, so predictions
            can be matched to files even if the safety net drops an element.
        part: name of the part ("train", "val", "test"), for file caches.
        epochs: training only: the dataset holds epochs `first_epoch` .. `epochs - 1`,
            one after another, each `steps_per_epoch` batches (give that to `model.fit`);
            default one epoch. Epoch k's order and augmentation depend only on
            (config.seed, k), so a resumed run sees exactly what an uninterrupted one does.
        first_epoch: training only: the first epoch the dataset holds.
        dist: optional [n, 5] shares of votes per rating level (the distribution head's
            targets); given, the targets are `{"mos": ..., "dist": [B, 5]}`.

    Returns:
        A batched, prefetched `tf.data.Dataset`.
    """
    # TF takes file names as bytes: a str holding a non-UTF-8 name's surrogates is refused.
    paths = [os.fsencode(p) for p in paths]
    n = len(paths)
    elements = {"path": paths, "mos": tf.constant(mos, tf.float32), "index": tf.range(n, dtype=tf.int64)}
    if dist is not None:
        elements["dist"] = tf.constant(dist, tf.float32)
    cached = config.cache != "none"
    decode = file_decoder(config.image_size, config.max_pixels)

    def decoded(dataset):
        dataset = dataset.map(
            lambda e: dict(e, image=decode(e["path"])), num_parallel_calls=AUTOTUNE, deterministic=True
        )
        # Safety net: files were checked before training, but one that goes bad during a
        # 10-hour run (a disk error, a file replaced mid-run) must not abort model.fit.
        # The validation pass (kiqa.data.validate) is what names bad files.
        return dataset.ignore_errors(log_warning=True)

    if training and not cached:
        # Shuffling file names is free; shuffling decoded images costs memory. Each
        # epoch is a seeded permutation of the names, gathered before decoding.
        table = {key: tf.constant(value) for key, value in elements.items()}

        def one_epoch(epoch):
            order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), epoch_seed(config, epoch))
            names = tf.data.Dataset.from_tensor_slices(order).map(
                lambda i: {key: tf.gather(value, i) for key, value in table.items()}
            )
            return finish_epoch(decoded(names), epoch, config, with_index, n)

        return by_epoch(one_epoch, first_epoch, epochs)

    dataset = decoded(tf.data.Dataset.from_tensor_slices(elements))
    if cached:
        # The 8-bit cache is exact: decode_image rounds to the 8-bit grid.
        dataset = dataset.map(lambda e: dict(e, image=tf.cast(e["image"], tf.uint8)))
        dataset = dataset.cache("" if config.cache == "memory" else _cache_file(config, [os.fsdecode(p) for p in paths], part))
        if training:
            return shuffled_epochs(dataset, n, config, with_index, first_epoch, epochs)
        dataset = dataset.map(lambda e: dict(e, image=tf.cast(e["image"], tf.float32)))
    return finish_dataset(dataset, config, training=False, with_index=with_index)


def exact_length(dataset, n):
    """Exactly `n` elements, with a cardinality Keras can read.

    The safety net (`ignore_errors`) and the prepared set's filter make the element count
    unknown to tf.data, so Keras shows "1/Unknown" steps and warns "Your input ran out of
    data" at the end of every epoch. Repeating and taking `n` keeps an epoch at `n`
    elements even when the safety net drops one (the gap is filled from the next,
    reshuffled, pass), which makes the asserted cardinality true. An empty input stays
    empty (tf.data's `repeat` stops on an empty pass) and then fails the assertion.
    Only for training epochs (`finish_epoch`): a cache placed before a `take` that stops
    exactly at its end would never see the end of its input, and tf.data then discards
    it (the training pipelines shuffle after the cache, and a shuffle reads to the end).

    Args:
        dataset: unbatched elements.
        n: number of elements an epoch must have.

    Returns:
        The dataset, cardinality `n`.
    """
    return dataset.repeat().take(n).apply(tf.data.experimental.assert_cardinality(n))


def shuffled_epochs(dataset, n, config, with_index, first_epoch=0, epochs=None):
    """Training epochs from decoded uint8 images in a fixed order (a cache, a prepared set).

    Each epoch goes through a bounded shuffle buffer seeded from (seed, epoch), then
    `finish_epoch`; see `make_dataset` for `first_epoch` and `epochs`.
    """
    def one_epoch(epoch):
        shuffled = dataset.shuffle(
            min(n, CACHED_SHUFFLE_BUFFER), seed=config.seed * 1_000_003 + epoch, reshuffle_each_iteration=False
        )
        shuffled = shuffled.map(lambda e: dict(e, image=tf.cast(e["image"], tf.float32)))
        return finish_epoch(shuffled, epoch, config, with_index, n)

    return by_epoch(one_epoch, first_epoch, epochs)


def by_epoch(one_epoch, first_epoch=0, epochs=None):
    """Epochs `first_epoch` .. `epochs - 1` of `one_epoch(epoch)` (a batched dataset), in a row.

    Concatenated in Python, so each epoch's seeds are plain integers (a cache or a
    prepared set upstream is shared by all of them and filled once).
    """
    last = first_epoch + 1 if epochs is None else epochs
    dataset = one_epoch(first_epoch)
    for epoch in range(first_epoch + 1, last):
        dataset = dataset.concatenate(one_epoch(epoch))
    return _distribute_options(dataset.prefetch(AUTOTUNE))


def _model_inputs(with_index):
    def to_model_inputs(e):
        # The distribution head's targets ride along when the elements carry them.
        targets = {key: e[key] for key in ("mos", "dist") if key in e}
        if with_index:
            return {"image": e["image"], "index": e["index"]}, targets
        return e["image"], targets

    return to_model_inputs


def finish_epoch(dataset, epoch, config, with_index, n):
    """Fixes one training epoch at `n` elements (`exact_length`), augments it with
    per-element seeds from (seed, epoch, position), batches it."""
    dataset = exact_length(dataset, n)
    if config.hflip or config.train_crop:
        dataset = dataset.enumerate().map(
            lambda position, e: dict(e, image=augment(
                e["image"],
                tf.random.stateless_uniform(
                    [4], tf.stack([config.seed * 1_000_003 + epoch, position]), minval=None, maxval=None,
                    dtype=tf.int64,
                ),
                config,
            )),
            num_parallel_calls=AUTOTUNE, deterministic=True,
        )
    return dataset.map(_model_inputs(with_index)).batch(config.batch_size)


def finish_dataset(dataset, config, training, with_index):
    """Shapes evaluation elements for Keras, batches and prefetches them.

    Args:
        dataset: elements `dict(image=float32[H, W, 3], mos=float32, index=int64)`.
        config: `TrainConfig`.
        training: must be False: training datasets come from `by_epoch`.
        with_index: keep `index` in the features (see `make_dataset`).

    Returns:
        The batched dataset, sharded by element under multi-worker training.
    """
    if training:
        raise ValueError("training datasets are built epoch by epoch: use shuffled_epochs or by_epoch")
    dataset = dataset.map(_model_inputs(with_index)).batch(config.batch_size).prefetch(AUTOTUNE)
    return _distribute_options(dataset)


def _distribute_options(dataset):
    # Multi-worker training shards by element: every worker lists all files, so
    # sharding by file would give each worker everything.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)
