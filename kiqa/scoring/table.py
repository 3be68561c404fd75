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
import contextlib
import csv
import dataclasses
import errno
import functools
import io
import math
import os
import stat
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from kiqa import provenance
from kiqa.contract import DEFAULT_MAX_BYTES, DISTRIBUTION_COLUMNS, IMAGE_EXTENSIONS, SD_OUTPUT
from kiqa.errors import (
    ConfigError, DataError, ImageError, NotScoresCsvError, OutputError, OutputIsInputError,
    ScoresFromAnotherModelError,
)
from kiqa.fsutil import CSV_TEXT, csv_cell, csv_value, output_lock, printable, writing
from kiqa.image import (
    UNDECODABLE_MESSAGE,
    decode_image,
    describe_decode_error,
    read_image_bytes,
)

CSV_COLUMNS = ("path", "mos", "error")
# A distribution model's CSV: the spread (0-100 points) and the shares of the five rating
# levels between `mos` and `error` (kiqa.contract.DISTRIBUTION_COLUMNS).
DISTRIBUTION_CSV_COLUMNS = ("path", "mos") + DISTRIBUTION_COLUMNS + ("error",)
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
        not be read. A given path that does not exist is listed as given (reading it fails).
    """
    if any(not os.fspath(p) for p in paths):
        # normpath("") is ".": an empty argument (an unset shell variable) must not
        # quietly score the whole current folder.
        raise DataError("empty path given to score (an empty argument, e.g. an unset variable); "
                        "give image files or folders")
    # A path that does not exist is listed like a file: reading it gives the same error row
    # as `Scorer.score_many` gives (one rule for a missing path, not an abort of the job).
    roots = [os.path.normpath(os.fsdecode(p)) for p in paths]
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


def csv_columns(scorer):
    """The scores CSV header for `scorer`: `CSV_COLUMNS`, or `DISTRIBUTION_CSV_COLUMNS`
    for a distribution model."""
    return DISTRIBUTION_CSV_COLUMNS if getattr(scorer, "distribution", False) else CSV_COLUMNS


def _parse_row(row):
    """(path, mos or None, error) from a CSV row, or None for a malformed row."""
    if len(row) not in (len(CSV_COLUMNS), len(DISTRIBUTION_CSV_COLUMNS)):
        return None
    path, mos, error = csv_value(row[0]), row[1], csv_value(row[-1])
    if mos:
        try:
            value = float(mos)
        except ValueError:
            return None
        return (path, value, error) if math.isfinite(value) else None
    return (path, None, error) if error else None


def _header_lines():
    """The header lines of a scores CSV, of a regression and of a distribution model."""
    return [encode_csv_line(columns) for columns in (CSV_COLUMNS, DISTRIBUTION_CSV_COLUMNS)]


def is_scores_csv(path):
    """True if `path` is a regular file whose first line is exactly a scores CSV header.

    Read before anything is changed: only a file that passes is ever cut or replaced.
    """
    headers = _header_lines()  # each ends in "\n"; earlier kiqa versions wrote "\r\n"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as handle:
            start = handle.read(max(map(len, headers)) + 1)
    except OSError:
        return False
    return any(start.startswith(header) or start.startswith(header[:-1] + b"\r\n") for header in headers)


def _has_rows(path):
    """True if `path` is a scores CSV with anything after its header line."""
    if not is_scores_csv(path):
        return False
    with open(path, "rb") as handle:
        handle.readline()
        return bool(handle.read(1))


def check_output(out_csv, files, replace=False):
    """Refuses an output that would change a file kiqa did not write.

    Args:
        out_csv: the CSV to write.
        files: (path, error) pairs of the job's inputs.
        replace: the output is to be replaced (`skip_existing=False`): still only a kiqa CSV is.

    Raises:
        OutputIsInputError: `out_csv` is one of the input files (also through a hard link).
        NotScoresCsvError: `out_csv` is an existing non-empty file that is not a kiqa
            scores CSV (a photo, a text file without final newline, someone's CSV).
        OutputError: `out_csv` is a folder, a pipe or a socket.
        Nothing was changed in any of these cases.
    """
    out_csv = Path(out_csv)
    try:
        out_stat = os.stat(out_csv)
    except FileNotFoundError:
        return
    except OSError as err:
        raise OutputError(f"cannot use {printable(out_csv)} as the output: {err.strerror}", path=out_csv,
                          errno_=err.errno, reason=err.strerror) from err
    if stat.S_ISDIR(out_stat.st_mode) or stat.S_ISFIFO(out_stat.st_mode) or stat.S_ISSOCK(out_stat.st_mode):
        raise OutputError(f"cannot write the scores CSV to {printable(out_csv)}: it is a folder, pipe or "
                          f"socket, not a file", path=out_csv)
    for path, _ in files:
        try:
            same = os.path.samestat(os.stat(path), out_stat)  # also a hard link to it
        except OSError:
            continue  # an input that cannot be stat'ed is not the output
        if same:
            raise OutputIsInputError(
                f"the output {printable(out_csv)} is one of the input images ({printable(path)}); "
                f"it is left untouched: write the CSV somewhere else", path=str(out_csv))
    if stat.S_ISREG(out_stat.st_mode) and out_stat.st_size > 0 and not is_scores_csv(out_csv):
        action = "replaced" if replace else "resumed"
        raise NotScoresCsvError(
            f"{printable(out_csv)} exists but is not a kiqa scores CSV (its first line is not "
            f"{','.join(CSV_COLUMNS)}), so it is not {action}; it is left untouched",
            path=str(out_csv),
        )


def _drop_partial_line(path):
    """Cuts a half-written last line (a job killed mid-write) off the CSV.

    Only called on a file `is_scores_csv` accepted: anything else is never cut.
    """
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
        if tuple(header) not in (CSV_COLUMNS, DISTRIBUTION_CSV_COLUMNS):
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


def _check_same_layout(out_csv, columns):
    """Refuses to resume a scores CSV whose columns are another head's (regression vs distribution)."""
    with open(out_csv, "r", **_CSV_ENCODING) as handle:
        header = tuple(next(csv.reader(handle), ()))
    if header != tuple(columns):
        raise NotScoresCsvError(
            f"{out_csv} holds scores in columns {list(header)}, and this model writes {list(columns)} "
            f"(a {'distribution' if columns == DISTRIBUTION_CSV_COLUMNS else 'regression'} model); "
            f"it is left untouched: write these scores to another file",
            path=str(out_csv),
        )


def _start_csv(out_csv, skip_existing, columns=CSV_COLUMNS):
    """Prepares the output: keeps earlier rows (resume) or starts a fresh file.

    Returns:
        dict path -> (mos, error) of rows already written.
    """
    if skip_existing and out_csv.is_file() and out_csv.stat().st_size > 0:
        if not is_scores_csv(out_csv):  # checked before any cut (check_output said so too)
            raise NotScoresCsvError(f"{printable(out_csv)} exists but is not a kiqa scores CSV; "
                                    f"it is left untouched", path=str(out_csv))
        with writing(out_csv):
            _drop_partial_line(out_csv)
        if out_csv.stat().st_size > 0:
            previous = read_scores(out_csv)
            _check_same_layout(out_csv, columns)
            return previous
    with writing(out_csv), open(out_csv, "w", **_CSV_ENCODING) as handle:
        csv.writer(handle, lineterminator="\n").writerow(columns)
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


def csv_row(path, mos, error, extras=None):
    """The CSV cells of one file, as `kiqa score` writes them (text cells under
    `kiqa.fsutil.csv_cell`'s rule against formula injection).

    `extras`, for a distribution model's CSV: the row's values of `DISTRIBUTION_COLUMNS`
    (mos_sd, p1..p5), or [] for a failed file; None writes the regression layout
    (path, mos, error).
    """
    head = (csv_cell(path), "" if mos is None else _format_mos(mos))
    if extras is None:
        return (*head, csv_cell(error or ""))
    cells = [_format_mos(v) for v in extras] if mos is not None and extras else [""] * len(DISTRIBUTION_COLUMNS)
    return (*head, *cells, csv_cell(error or ""))


def distribution_extras(outputs, i):
    """The values of `DISTRIBUTION_COLUMNS` (mos_sd, p1..p5) of item `i` of a distribution
    model's outputs (`Scorer.predict_outputs`)."""
    return [float(outputs[SD_OUTPUT][i])] + [float(v) for v in outputs["dist"][i]]


def encode_csv_line(cells):
    """One CSV line as bytes, quoted and encoded like the scores CSV (non-UTF-8 names round-trip)."""
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator="\n").writerow(cells)
    return buffer.getvalue().encode(_CSV_ENCODING["encoding"], _CSV_ENCODING["errors"])


def scored_batches(files, scorer, batch_size=DEFAULT_BATCH_SIZE, max_bytes=DEFAULT_MAX_BYTES,
                   progress=False, read_bytes=read_image_bytes):
    """Reads, decodes and scores files batch by batch: the loop behind `kiqa score` and
    `kiqa.Scorer.score_many`, so both give the same score and error text for a file.

    Args:
        files: (path, error or None) pairs, as `find_images` lists them; a pair with an
            error is passed through unread.
        scorer: a `kiqa.scoring.scorer.Scorer`.
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
                outputs = scorer.predict_outputs(np.stack([item[1] for item in with_pixels]))
                for i, (item, value) in enumerate(zip(with_pixels, outputs["mos"])):
                    item[1], item[2] = model_score(value)
                    if distribution and item[1] is not None:
                        item[3] = distribution_extras(outputs, i)
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
        scorer: a `kiqa.scoring.scorer.Scorer`.
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
        DataError: no image file was found, or `out_csv` exists and is not a scores CSV
            (a path that does not exist is a row with its error).
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


def _identity(scorer):
    if hasattr(scorer, "identity"):
        return scorer.identity()
    return provenance.model_identity(getattr(scorer, "source", "unknown"), getattr(scorer, "kind", None),
                                     scorer.image_size, None)


def _check_same_model(out_csv, identity):
    """Rows kept on resume must come from the same weights at the same image size: two
    models' scores in one CSV would read as one model's (the sidecar names only one)."""
    recorded = provenance.read_sidecar(out_csv)
    previous = None
    if recorded is not None:
        previous = {key: recorded.get(key) for key in identity}
    if not provenance.same_model(previous, identity):
        raise ScoresFromAnotherModelError(
            f"{out_csv} holds scores from {provenance.describe_identity(previous)}, not from "
            f"{provenance.describe_identity(identity)}, the model given now; its rows are left "
            f"untouched. Write to another CSV, or rescore every file (skip_existing=False)",
            folder=str(out_csv.parent), previous=previous, current=identity, path=str(out_csv),
        )


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
        scorer: a `kiqa.scoring.scorer.Scorer`.
        out_csv: CSV to write or resume.
        batch_size: images per model call.
        skip_existing: resume an existing CSV (see `score_paths`).
        progress: show a tqdm progress bar.
        max_bytes: per-file byte cap.

    Returns:
        A `ScoreSummary`.

    Raises:
        DataError: `out_csv` exists and is not a scores CSV, or is one of the inputs
            (`OutputIsInputError`); nothing was changed.
        ScoresFromAnotherModelError: (a ConfigError) `out_csv` is resumed but holds
            scores from other weights or another image size (or says not which); nothing
            was changed.
        OutputLockedError: another process is writing `out_csv` (its pid named).
        OutputError: `out_csv` cannot be written (read-only folder, permissions).
        DiskFullError: the disk filled; the rows written so far are kept.
        ConfigError: batch_size below 1.
        ModelError: the model rejected a batch.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    out_csv = Path(out_csv)
    check_output(out_csv, files, replace=not skip_existing)
    with writing(out_csv):
        out_csv.parent.mkdir(parents=True, exist_ok=True)
    # A device (/dev/null, /dev/stdout) gets no lock file: /dev is not ours to write in.
    regular = not out_csv.exists() or out_csv.is_file()
    with output_lock(out_csv) if regular else contextlib.nullcontext():
        return _score_locked(files, scorer, out_csv, batch_size, skip_existing, progress, max_bytes)


def _score_locked(files, scorer, out_csv, batch_size, skip_existing, progress, max_bytes):
    """`score_files` once the output is checked and locked."""
    identity = _identity(scorer)
    if skip_existing and _has_rows(out_csv):
        # Before anything is cut or appended: two models' rows in one CSV would read as one's.
        _check_same_model(out_csv, identity)
    columns = csv_columns(scorer)
    previous = _start_csv(out_csv, skip_existing, columns)
    # <out>.provenance.json: which model these scores come from, and whether they mean anything.
    facts = scorer.model_facts() if hasattr(scorer, "model_facts") else {}
    with writing(provenance.sidecar_path(out_csv)):
        provenance.write_sidecar(out_csv, getattr(scorer, "provenance", None), identity["source"],
                                 **{k: v for k, v in identity.items() if k != "source"}, **facts)
    todo = [(path, error) for path, error in files if path not in previous]
    results = {path: previous[path] for path, _ in files if path in previous}
    n_skipped = len(results)

    written = [n_skipped]

    def kept():
        return f"the {written[0]} rows written before are kept (rerunning resumes after them)"

    with writing(out_csv, kept), open(out_csv, "a", **_CSV_ENCODING) as handle:
        writer = csv.writer(handle, lineterminator="\n")  # csv.writer defaults to CRLF
        for batch in scored_batches(todo, scorer, batch_size, max_bytes, progress=progress):
            rows = []
            for path, mos, error, *extras in batch:
                results[path] = (mos, error or "")
                rows.append(csv_row(path, mos, error, extras[0] if extras else None))
            writer.writerows(rows)
            # Flushed to the OS per batch: a killed process loses at most this batch.
            handle.flush()
            written[0] += len(rows)

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
