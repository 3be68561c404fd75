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
from pathlib import Path

import tensorflow as tf

from kiqa.image import DECODE_VERSION, decode_image

AUTOTUNE = tf.data.AUTOTUNE
# Decoded images held by the shuffle buffer when a cache fixes the element order:
# 1024 images at 384x512 in uint8 are 600 MB.
CACHED_SHUFFLE_BUFFER = 1024


def _decode_file(config):
    size, max_pixels = config.image_size, config.max_pixels

    def decode(path):
        return decode_image(tf.io.read_file(path), size, max_pixels=max_pixels, name=path)

    return decode


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
        "\n".join([*paths, str(config.image_size), str(config.max_pixels), f"decode-v{DECODE_VERSION}"]).encode()
    ).hexdigest()[:16]
    folder = Path(config.cache)
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{part}-{key}")


def make_dataset(paths, mos, config, training, with_index=False, part="train"):
    """Builds the input pipeline for one part of a split.

    Args:
        paths: image file paths (already checked by `kiqa.data.validate`).
        mos: 0-100 targets aligned with `paths`.
        config: `TrainConfig` (image_size, batch_size, cache, hflip, seed, max_pixels).
        training: shuffle (seeded, reshuffled every epoch) and augment.
        with_index: add `"index"` (position in `paths`) to the features, so predictions
            can be matched to files even if the safety net drops an element.
        part: name of the part ("train", "val", "test"), for file caches.

    Returns:
        A batched, prefetched `tf.data.Dataset`.
    """
    paths = [str(p) for p in paths]
    n = len(paths)
    dataset = tf.data.Dataset.from_tensor_slices(
        {"path": paths, "mos": tf.constant(mos, tf.float32), "index": tf.range(n, dtype=tf.int64)}
    )
    cached = config.cache != "none"
    if training and not cached:
        # Shuffling file names is free; shuffling decoded images costs memory.
        dataset = dataset.shuffle(n, seed=config.seed, reshuffle_each_iteration=True)

    decode = _decode_file(config)
    dataset = dataset.map(
        lambda e: dict(e, image=decode(e["path"])), num_parallel_calls=AUTOTUNE, deterministic=True
    )
    # Safety net: files were checked before training, but one that goes bad during a
    # 10-hour run (a disk error, a file replaced mid-run) must not abort model.fit.
    # The validation pass (kiqa.data.validate) is what names bad files.
    dataset = dataset.ignore_errors(log_warning=True)

    if cached:
        # The 8-bit cache is exact: decode_image rounds to the 8-bit grid.
        dataset = dataset.map(lambda e: dict(e, image=tf.cast(e["image"], tf.uint8)))
        dataset = dataset.cache("" if config.cache == "memory" else _cache_file(config, paths, part))
        if training:
            dataset = shuffle_decoded(dataset, n, config)
        dataset = dataset.map(lambda e: dict(e, image=tf.cast(e["image"], tf.float32)))
    return finish_dataset(dataset, config, training, with_index, size=n)


def exact_length(dataset, n):
    """Exactly `n` elements, with a cardinality Keras can read.

    The safety net (`ignore_errors`) and the prepared set's filter make the element count
    unknown to tf.data, so Keras shows "1/Unknown" steps and warns "Your input ran out of
    data" at the end of every epoch. Repeating and taking `n` keeps an epoch at `n`
    elements even when the safety net drops one (the gap is filled from the next,
    reshuffled, pass), which makes the asserted cardinality true. An empty input stays
    empty (tf.data's `repeat` stops on an empty pass) and then fails the assertion.
    Only for training: a cache placed before a `take` that stops exactly at its end would
    never see the end of its input, and tf.data then discards it (the training pipelines
    shuffle after the cache, and a shuffle reads to the end).

    Args:
        dataset: unbatched elements.
        n: number of elements an epoch must have.

    Returns:
        The dataset, cardinality `n`.
    """
    return dataset.repeat().take(n).apply(tf.data.experimental.assert_cardinality(n))


def shuffle_decoded(dataset, n, config):
    """Seeded, per-epoch shuffle of decoded images through a bounded buffer."""
    return dataset.shuffle(min(n, CACHED_SHUFFLE_BUFFER), seed=config.seed, reshuffle_each_iteration=True)


def finish_dataset(dataset, config, training, with_index, size=None):
    """Augments (training only), shapes elements for Keras, batches and prefetches.

    Args:
        dataset: elements `dict(image=float32[H, W, 3], mos=float32, index=int64)`.
        config: `TrainConfig`.
        training: apply `augment`, and fix an epoch at `size` elements (`exact_length`).
        with_index: keep `index` in the features (see `make_dataset`).
        size: number of elements of one epoch (the part's image count).

    Returns:
        The batched dataset, sharded by element under multi-worker training.
    """
    if training and size is not None:
        dataset = exact_length(dataset, size)
    if training and (config.hflip or config.train_crop):
        dataset = tf.data.Dataset.zip(
            dataset, tf.data.Dataset.random(seed=config.seed, rerandomize_each_iteration=True).batch(4)
        ).map(lambda e, seeds: dict(e, image=augment(e["image"], seeds, config)), num_parallel_calls=AUTOTUNE)

    def to_model_inputs(e):
        if with_index:
            return {"image": e["image"], "index": e["index"]}, {"mos": e["mos"]}
        return e["image"], {"mos": e["mos"]}

    dataset = dataset.map(to_model_inputs).batch(config.batch_size).prefetch(AUTOTUNE)
    # Multi-worker training shards by element: every worker lists all files, so
    # sharding by file would give each worker everything.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)
