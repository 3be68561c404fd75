"""Scoring files and folders of images with a local model into a resumable CSV.

The CSV has one row per file: `path`, `mos` (KonIQ's 0-100 scale, higher is better;
empty when the file failed) and `error` (empty when it was scored). Rows are appended
and flushed batch by batch, so a killed job loses at most the batch in flight, and a
rerun with the same output skips every path already in the CSV (a half-written last
line from the kill is cut off first). Memory stays bounded: file names are listed up
front, images are held one batch at a time.

Images go through `kiqa.image.read_image_bytes` and `kiqa.image.decode_image`, the
functions training uses, so a score here is what the model saw in training.

A file that cannot be used becomes a row with the reason, and the job goes on:
unreadable or undecodable files, non-regular files (devices, pipes), files over the
byte or pixel cap, and symbolic links that point outside the folders given (a link in
a folder of downloads must not make kiqa read /dev/zero or a private file).
"""

import collections
import concurrent.futures
import csv
import dataclasses
import errno
import functools
import io
import math
import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from kiqa import provenance
from kiqa.contract import DEFAULT_MAX_BYTES, IMAGE_EXTENSIONS
from kiqa.errors import ConfigError, DataError, ImageError, NotScoresCsvError
from kiqa.fsutil import CSV_TEXT, printable
from kiqa.image import (
    UNDECODABLE_MESSAGE,
    decode_image,
    describe_decode_error,
    read_image_bytes,
)

CSV_COLUMNS = ("path", "mos", "error")
# 16 images at 384x512 hold 38 MB of float32 pixels; ConvNeXt-Tiny's activations for
# such a batch stay well under 2 GB on CPU.
DEFAULT_BATCH_SIZE = 16
# Threads decoding files ahead of the model, and how many batches ahead: two threads
# keep a 2-core CPU's decode ahead of ConvNeXt-Tiny at 384x512 (~4 ms per KonIQ JPEG at
# 1/2 DCT scale against ~300 ms of model per image).
DECODE_THREADS = 2
PREFETCH_BATCHES = 2
# CSV fields are text in UTF-8; surrogateescape round-trips Linux file names that are
# not valid UTF-8 instead of failing on them (the rule is in kiqa.fsutil).
_CSV_ENCODING = CSV_TEXT


@dataclasses.dataclass(frozen=True)
class ScoreSummary:
    """What a scoring job produced (counts cover every file of the job, including
    rows kept from an earlier, interrupted run).

    Attributes:
        out_csv: the CSV written.
        n_files: files in the job.
        n_scored: files with a MOS.
        n_failed: files with an error instead of a MOS.
        n_skipped: files already in the CSV from an earlier run (not rescored).
        mean_mos: mean MOS of the scored files (None when none was scored).
        median_mos: median MOS of the scored files (None when none was scored).
        failures: (path, error) of every failed file, in CSV order.
    """

    out_csv: str
    n_files: int
    n_scored: int
    n_failed: int
    n_skipped: int
    mean_mos: Optional[float]
    median_mos: Optional[float]
    failures: Tuple[Tuple[str, str], ...]


# Listed in folders although TF cannot decode them: a folder of scans, camera or phone
# exports holds TIFFs, HEICs (iPhones), AVIFs and JPEG XLs, and skipping them silently
# would report a job as complete with files missing. Each gets an error row naming its
# format and saying to convert it (a file that is in fact a JPEG or PNG is scored).
UNSUPPORTED_FORMATS = {
    ".tif": "TIFF", ".tiff": "TIFF", ".avif": "AVIF", ".heic": "HEIC", ".heif": "HEIF", ".jxl": "JPEG XL",
}
LISTED_UNSUPPORTED_EXTENSIONS = tuple(UNSUPPORTED_FORMATS)


def has_image_extension(name):
    """True if `name` ends with one of `kiqa.image.IMAGE_EXTENSIONS` (any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_listed(name):
    return has_image_extension(name) or name.lower().endswith(LISTED_UNSUPPORTED_EXTENSIONS)


def _inside(path, roots):
    return any(path == root or os.path.commonpath([path, root]) == root for root in roots)


def find_images(paths, follow_links_outside=False):
    """Lists the image files to score under files and folders.

    Folders are searched recursively for `IMAGE_EXTENSIONS` (any case), plus TIFF,
    AVIF, HEIC/HEIF and JPEG XL files, which are listed so that each gets an error row
    saying to convert it instead of being skipped silently; files named directly are taken whatever their
    extension. Each folder's files are sorted by path, so two runs list the same
    files in the same order; a file reached twice is listed once.

    Symbolic links found inside a folder are followed only when their target lies
    inside one of the given paths (links to folders inside them are not followed at
    all: their files are reached by their real path). Links leaving the given paths
    are listed with an error unless `follow_links_outside` is set.

    Args:
        paths: files and folders.
        follow_links_outside: follow links whose target is outside the given paths.

    Returns:
        List of (path, error) in scoring order: `path` is the given path joined with
        the file's relative path (normalised; a `str` under `kiqa.fsutil`'s rule, so a
        name that is not valid UTF-8 keeps its bytes as surrogates); `error` is None or why the file will
        not be read.

    Raises:
        DataError: a given path does not exist.
    """
    roots = [os.path.normpath(os.fsdecode(p)) for p in paths]
    missing = [root for root in roots if not os.path.lexists(root)]
    if missing:
        raise DataError(
            f"no such file or folder: {', '.join(missing)}; check the path(s) given to score"
        )
    real_roots = [os.path.realpath(root) for root in roots]
    found = {}
    for root in roots:
        # A path the user names is taken as given, link or not: they chose it.
        entries = _walk(root, real_roots, follow_links_outside) if os.path.isdir(root) else [(root, None)]
        for path, error in sorted(entries):
            found.setdefault(path, error)
    return list(found.items())


def _walk(root, real_roots, follow_links_outside):
    entries = []
    visited = {os.path.realpath(root)}
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as scan:
                children = list(scan)
        except OSError as err:
            entries.append((folder, f"cannot list folder ({err.strerror}); check its permissions"))
            continue
        for child in children:
            path = os.path.normpath(child.path)
            if child.is_symlink():
                target = os.path.realpath(path)
                inside = _inside(target, real_roots)
                if os.path.isdir(path):
                    if inside:
                        continue  # its files are listed under their real path (and no loops)
                    if not follow_links_outside:
                        entries.append((path, _link_error("folder", target)))
                    elif target not in visited:
                        visited.add(target)
                        folders.append(path)
                    continue
                if not _is_listed(child.name):
                    continue
                if not os.path.exists(path):
                    entries.append((path, _broken_link_error(path)))
                    continue
                allowed = inside or follow_links_outside
                entries.append((path, None if allowed else _link_error("file", target)))
            elif child.is_dir(follow_symlinks=False):
                folders.append(path)
            elif _is_listed(child.name):
                # Devices and pipes named *.jpg stay in: read_image_bytes refuses them by name.
                entries.append((path, None))
    return entries


def _broken_link_error(path):
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop; remove or fix the link"
    return f"dangling symbolic link (its target {os.path.realpath(path)} does not exist); remove or fix the link"


# The start of the error text of a link that leaves the given folders: the CLI names its
# flag for following them when a row starts so.
LINK_OUTSIDE = "symbolic link to a {kind} outside the given folders"


def _link_error(kind, target):
    return f"{LINK_OUTSIDE.format(kind=kind)} ({target}); not followed"


def is_link_outside(error):
    """True when an error row's text is a link left unfollowed (see `find_images`)."""
    return bool(error) and any(error.startswith(LINK_OUTSIDE.format(kind=k)) for k in ("file", "folder"))


def _parse_row(row):
    """(path, mos or None, error) from a CSV row, or None for a malformed row."""
    if len(row) != len(CSV_COLUMNS):
        return None
    path, mos, error = row
    if mos:
        try:
            value = float(mos)
        except ValueError:
            return None
        return (path, value, error) if math.isfinite(value) else None
    return (path, None, error) if error else None


def _drop_partial_line(path):
    """Cuts a half-written last line (a job killed mid-write) off the CSV."""
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        # Search backwards for the last complete line; rows are short, so a few
        # 64 KB reads cover it.
        position = size
        while position > 0:
            start = max(0, position - 65536)
            handle.seek(start)
            chunk = handle.read(position - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                handle.truncate(start + newline + 1)
                return
            position = start
        handle.truncate(0)


def _read_rows(path):
    """Yields (path, mos or None, error) for each well-formed row of a scores CSV."""
    with open(path, "r", **_CSV_ENCODING) as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return
        if tuple(header) != CSV_COLUMNS:
            raise NotScoresCsvError(
                f"{path} exists but is not a kiqa scores CSV (header {header}, expected "
                f"{list(CSV_COLUMNS)}); it is left untouched",
                path=str(path),
            )
        for row in reader:
            parsed = _parse_row(row)
            if parsed is not None:
                yield parsed


def read_scores(out_csv, paths=None):
    """Reads a scores CSV written by `score_paths`.

    A half-written last line (from a killed job) and malformed rows are ignored.
    When a path appears more than once, its last row counts.

    Args:
        out_csv: the CSV.
        paths: optional iterable of paths to keep (rows for other paths are dropped).

    Returns:
        dict path -> (mos or None, error string, "" when scored), in CSV order.

    Raises:
        NotScoresCsvError: (a DataError) the file exists but is not a kiqa scores CSV.
    """
    wanted = None if paths is None else set(paths)
    results = {}
    out_csv = Path(out_csv)
    if not out_csv.exists():
        return results
    for path, mos, error in _read_rows(out_csv):
        if wanted is None or path in wanted:
            results[path] = (mos, error)
    return results


def _start_csv(out_csv, skip_existing):
    """Prepares the output: keeps earlier rows (resume) or starts a fresh file.

    Returns:
        dict path -> (mos, error) of rows already written.
    """
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    if skip_existing and out_csv.is_file():
        _drop_partial_line(out_csv)
        if out_csv.stat().st_size > 0:
            return read_scores(out_csv)
    with open(out_csv, "w", **_CSV_ENCODING) as handle:
        csv.writer(handle).writerow(CSV_COLUMNS)
    return {}


@functools.lru_cache(maxsize=8)
def _decoder(height, width):
    """decode_image as one traced graph, cached per output size: per-file eager op
    dispatch costs more than the decode itself (measured 16 ms eager against 4 ms traced
    for a small JPEG), and errors still surface per call. Tracing takes seconds, so one
    trace serves every job in the process (the pixel cap is an input, not a constant)."""

    @tf.function(input_signature=[
        tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string)
    ])
    def decode(contents, max_pixels, name):
        return decode_image(contents, (height, width), max_pixels=max_pixels, name=name)

    return decode


def image_decoder(image_size):
    """The traced `decode_image` for one output size (height, width), shared per process.

    Returns:
        A function (contents, max_pixels, name) -> float32 [height, width, 3] tensor.
    """
    return _decoder(*image_size)


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


def _format_mos(value):
    return f"{value:.4f}"


def model_score(value):
    """(mos, None) for a finite model output, rounded as the CSV holds it, else (None, error)."""
    if math.isfinite(float(value)):
        return float(_format_mos(float(value))), None
    return None, "the model returned a non-finite score"


def csv_row(path, mos, error):
    """The CSV cells (path, mos, error) of one file, as `kiqa score` writes them."""
    return (path, "" if mos is None else _format_mos(mos), error or "")


def encode_csv_line(cells):
    """One CSV line as bytes, quoted and encoded like the scores CSV (non-UTF-8 names round-trip)."""
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerow(cells)
    return buffer.getvalue().encode(_CSV_ENCODING["encoding"], _CSV_ENCODING["errors"])


def scored_batches(files, scorer, batch_size=DEFAULT_BATCH_SIZE, max_bytes=DEFAULT_MAX_BYTES,
                   progress=False, read_bytes=read_image_bytes):
    """Reads, decodes and scores files batch by batch: the loop behind `kiqa score` and
    `kiqa.Scorer.score_many`, so both give the same score and error text for a file.

    Args:
        files: (path, error or None) pairs, as `find_images` lists them; a pair with an
            error is passed through unread.
        scorer: a `kiqa.scorer.Scorer`.
        batch_size: images per model call.
        max_bytes: per-file byte cap.
        progress: show a tqdm progress bar.
        read_bytes: reads a file's bytes (see `load_pixels`).

    Yields:
        lists of [path, mos or None, error or None], in input order; `mos` is rounded as
        the CSV holds it (`model_score`).

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
            if with_pixels:
                scores = scorer.predict_pixels(np.stack([item[1] for item in with_pixels]))
                for item, value in zip(with_pixels, scores):
                    item[1], item[2] = model_score(value)
            yield batch
            bar.update(len(batch))


def score_paths(
    paths,
    scorer,
    out_csv,
    batch_size=DEFAULT_BATCH_SIZE,
    skip_existing=True,
    progress=True,
    max_bytes=DEFAULT_MAX_BYTES,
    follow_links_outside=False,
):
    """Scores image files and folders into a CSV (path, mos, error).

    Args:
        paths: files and folders (folders are searched recursively; see `find_images`).
        scorer: a `kiqa.scorer.Scorer`.
        out_csv: CSV to write. With `skip_existing`, an existing one is resumed.
        batch_size: images per model call.
        skip_existing: keep the rows of an existing `out_csv` and skip their paths
            (scored or failed); False replaces the file and rescores everything.
        progress: show a tqdm progress bar.
        max_bytes: files larger than this are refused (a row with an error).
        follow_links_outside: follow symbolic links whose target is outside `paths`.

    Returns:
        A `ScoreSummary`.

    Raises:
        DataError: a path does not exist, no image file was found, or `out_csv`
            exists and is not a scores CSV.
        ConfigError: batch_size below 1.
        ModelError: the model rejected a batch.
    """
    files = find_images(paths, follow_links_outside=follow_links_outside)
    if not files:
        raise DataError(
            f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in "
            f"{', '.join(map(str, paths))}; check the folder(s)"
        )
    return score_files(files, scorer, out_csv, batch_size, skip_existing, progress, max_bytes)


def score_files(
    files,
    scorer,
    out_csv,
    batch_size=DEFAULT_BATCH_SIZE,
    skip_existing=True,
    progress=True,
    max_bytes=DEFAULT_MAX_BYTES,
):
    """Scores a file list from `find_images` into a CSV (see `score_paths`).

    Args:
        files: list of (path, error or None) from `find_images`.
        scorer: a `kiqa.scorer.Scorer`.
        out_csv: CSV to write or resume.
        batch_size: images per model call.
        skip_existing: resume an existing CSV (see `score_paths`).
        progress: show a tqdm progress bar.
        max_bytes: per-file byte cap.

    Returns:
        A `ScoreSummary`.

    Raises:
        DataError: `out_csv` exists and is not a scores CSV.
        ConfigError: batch_size below 1.
        ModelError: the model rejected a batch.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    out_csv = Path(out_csv)
    previous = _start_csv(out_csv, skip_existing)
    # <out>.provenance.json: which model these scores come from, and whether they mean anything.
    facts = scorer.model_facts() if hasattr(scorer, "model_facts") else {}
    provenance.write_sidecar(out_csv, getattr(scorer, "provenance", None), getattr(scorer, "source", "unknown"),
                             **facts)
    todo = [(path, error) for path, error in files if path not in previous]
    results = {path: previous[path] for path, _ in files if path in previous}
    n_skipped = len(results)

    with open(out_csv, "a", **_CSV_ENCODING) as handle:
        writer = csv.writer(handle)
        for batch in scored_batches(todo, scorer, batch_size, max_bytes, progress=progress):
            rows = []
            for path, mos, error in batch:
                results[path] = (mos, error or "")
                rows.append(csv_row(path, mos, error))
            writer.writerows(rows)
            # Flushed to the OS per batch: a killed process loses at most this batch.
            handle.flush()

    scores = np.array([mos for mos, _ in results.values() if mos is not None], dtype=np.float64)
    failures = tuple((path, error) for path, (mos, error) in results.items() if mos is None)
    return ScoreSummary(
        out_csv=str(out_csv),
        n_files=len(results),
        n_scored=int(scores.size),
        n_failed=len(failures),
        n_skipped=n_skipped,
        mean_mos=float(scores.mean()) if scores.size else None,
        median_mos=float(np.median(scores)) if scores.size else None,
        failures=failures,
    )
