"""The one read-decode-batch-score loop behind `kiqa score`, `Scorer.score_many` and Beam.

Images go through `kiqa.image.read_image_bytes` and `kiqa.image.decode_image`, the
functions training uses, so a score here is what the model saw in training. The loop
takes any model object with an `image_size`, a `max_pixels` cap and a pixels-to-scores
call, `predict_pixels` (a `kiqa.scoring.scorer.Scorer`, or a test's stand-in; a
distribution model's `predict_outputs` adds its spread and shares), and turns every failure
of a file into its error text, so one bad file never stops a batch.
"""

import collections
import concurrent.futures
import math
import os

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from kiqa.contract import DEFAULT_MAX_BYTES, DIST_OUTPUT, SD_OUTPUT
from kiqa.errors import ConfigError, ImageError
from kiqa.fsutil import printable
from kiqa.image import (
    UNDECODABLE_MESSAGE,
    describe_decode_error,
    read_image_bytes,
    traced_decoder,
)
from kiqa.scoring.files import UNSUPPORTED_FORMATS

# 16 images at 384x512 hold 38 MB of float32 pixels; ConvNeXt-Tiny's activations for
# such a batch stay well under 2 GB on CPU.
DEFAULT_BATCH_SIZE = 16
# Threads decoding files ahead of the model, and how many batches ahead: two threads
# keep a 2-core CPU's decode ahead of ConvNeXt-Tiny at 384x512 (~4 ms per KonIQ JPEG at
# 1/2 DCT scale against ~300 ms of model per image).
DECODE_THREADS = 2
PREFETCH_BATCHES = 2


def image_decoder(image_size):
    """The traced `decode_image` for one output size (height, width), shared per process
    (`kiqa.image.traced_decoder`).

    Returns:
        A function (contents, max_pixels, name) -> float32 [height, width, 3] tensor.
    """
    return traced_decoder(int(image_size[0]), int(image_size[1]))


def load_pixels(path, decode, max_pixels, max_bytes, read_bytes=read_image_bytes):
    """Reads and decodes one file for scoring, turning every failure into error text.

    The one place that decides a file's error text, so `kiqa score` and the Beam
    pipeline (`kiqa.beam`) write the same row for the same bad file.

    Args:
        path: the file (its CSV path).
        decode: from `image_decoder`.
        max_pixels: header pixel cap.
        max_bytes: file size cap.
        read_bytes: reads a file's bytes (path, max_bytes=) or raises `ImageError`;
            `kiqa.image.read_image_bytes` for local files.

    Returns:
        (pixels, None), pixels a float32 array [height, width, 3], or (None, error text
        without the path, which the CSV's path column already names).
    """
    try:
        contents = read_bytes(path, max_bytes=max_bytes)
    except ImageError as err:
        return None, str(err).removeprefix(f"{path}: ")
    try:
        # The name is only for TF's messages: escaped, since TF refuses a str holding a
        # non-UTF-8 name's surrogates and its error text must decode as UTF-8.
        name = printable(path)
        pixels = decode(tf.constant(contents), tf.constant(max_pixels, tf.int64), tf.constant(name))
        return pixels.numpy(), None
    except tf.errors.OpError as err:
        return None, _decode_error_text(err, path)


def _prefetched_batches(todo, batch_size, load, threads=DECODE_THREADS, ahead=PREFETCH_BATCHES):
    """Batches of [path, pixels or None, error or None], in input order, decoded ahead.

    `threads` threads read and decode the next `ahead` batches while the caller runs
    the model on this one and writes its rows: TF's decode and the model release the
    GIL, so reading, decoding, inference and writing overlap (one thread doing them in
    turn left the model idle ~30% of a folder job). At most (ahead + 1) * batch_size
    decoded images are held (3 x 16 x 2.4 MB at 384x512), so memory stays bounded.

    Args:
        todo: (path, error or None) pairs; a pair with an error is passed through.
        batch_size: images per batch.
        load: path -> (pixels, None) or (None, error message).
        threads: decoding threads.
        ahead: batches decoded ahead of the one being consumed.

    Yields:
        lists of [path, pixels, error], batch_size long except the last.
    """
    items = iter(todo)
    window = collections.deque()
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="kiqa-decode")

    def fill():
        while len(window) < (ahead + 1) * batch_size:
            item = next(items, None)
            if item is None:
                return
            path, error = item
            window.append((path, pool.submit(load, path) if error is None else None, error))

    try:
        fill()
        while window:
            batch = []
            for _ in range(min(batch_size, len(window))):
                path, future, error = window.popleft()
                pixels, error = future.result() if future is not None else (None, error)
                batch.append([path, pixels, error])
            fill()
            yield batch
    finally:
        # A model error or Ctrl-C in the caller: drop the queued decodes, not wait for them.
        pool.shutdown(wait=True, cancel_futures=True)


def _decode_error_text(err, path):
    """One line without TF's graph wrappers; the CSV's path column already names the file."""
    # TF's message holds the name's bytes decoded with replacement characters.
    text = describe_decode_error(err, printable(path))
    unsupported = UNSUPPORTED_FORMATS.get(os.path.splitext(path)[1].lower())
    if unsupported and unsupported not in text:
        return (
            f"{unsupported} images are not supported (TensorFlow has no {unsupported} decoder; "
            f"{text}); convert it to JPEG or PNG"
        )
    if "assertion failed: [" in (getattr(err, "message", None) or str(err)):
        return text  # kiqa's own header checks: the message already says what to do
    return UNDECODABLE_MESSAGE.format(reason=text)


def format_mos(value):
    """A MOS as the scores CSV holds it (four decimals)."""
    return f"{value:.4f}"


def model_score(value):
    """(mos, None) for a finite model output, rounded as the CSV holds it, else (None, error)."""
    if math.isfinite(float(value)):
        return float(format_mos(float(value))), None
    return None, "the model returned a non-finite score"


def distribution_extras(outputs, i):
    """The values of `DISTRIBUTION_COLUMNS` (mos_sd, p1..p5) of item `i` of a distribution
    model's outputs (`Scorer.predict_outputs`)."""
    return [float(outputs[SD_OUTPUT][i])] + [float(v) for v in outputs[DIST_OUTPUT][i]]


def scored_batches(files, scorer, batch_size=DEFAULT_BATCH_SIZE, max_bytes=DEFAULT_MAX_BYTES,
                   progress=False, read_bytes=read_image_bytes):
    """Reads, decodes and scores files batch by batch: the loop behind `kiqa score` and
    `kiqa.Scorer.score_many`, so both give the same score and error text for a file.

    Args:
        files: (path, error or None) pairs, as `find_images` lists them; a pair with an
            error is passed through unread.
        scorer: any model object with `image_size` (height, width), `max_pixels` and
            `predict_pixels(pixels)` -> MOS (a `kiqa.scoring.scorer.Scorer`); with a true
            `distribution`, its `predict_outputs(pixels)` gives mos_sd and dist too.
        batch_size: images per model call.
        max_bytes: per-file byte cap.
        progress: show a tqdm progress bar.
        read_bytes: reads a file's bytes (see `load_pixels`).

    Yields:
        lists of [path, mos or None, error or None], in input order; `mos` is rounded as
        the CSV holds it (`model_score`). For a distribution model (`scorer.distribution`)
        each item has a fourth element: its `DISTRIBUTION_COLUMNS` values, [] when failed.

    Raises:
        ConfigError: batch_size below 1.
        ModelError: the model rejected a batch.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    decode = image_decoder(scorer.image_size)

    def load(path):
        return load_pixels(path, decode, scorer.max_pixels, max_bytes, read_bytes)

    with tqdm(total=len(files), disable=not progress, unit="img", desc="scoring", dynamic_ncols=True) as bar:
        for batch in _prefetched_batches(files, batch_size, load):
            with_pixels = [item for item in batch if item[1] is not None]
            distribution = getattr(scorer, "distribution", False)
            if distribution:
                for item in batch:
                    item.append([])
            if with_pixels:
                pixels = np.stack([item[1] for item in with_pixels])
                outputs = scorer.predict_outputs(pixels) if distribution else {"mos": scorer.predict_pixels(pixels)}
                for i, (item, value) in enumerate(zip(with_pixels, outputs["mos"])):
                    item[1], item[2] = model_score(value)
                    if distribution and item[1] is not None:
                        item[3] = distribution_extras(outputs, i)
            yield batch
            bar.update(len(batch))
