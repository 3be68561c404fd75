"""Scoring files and folders of images with a local model into a resumable CSV.

The CSV has one row per file: `path`, `mos` (KonIQ's 0-100 scale, higher is better;
empty when the file failed) and `error` (empty when it was scored). Rows are appended
and flushed batch by batch, so a killed job loses at most the batch in flight, and a
rerun with the same output skips every path already in the CSV (a half-written last
line from the kill is cut off first). Memory stays bounded: file names are listed up
front, images are held one batch at a time.

Files are listed by `kiqa.scoring.files.find_images` and read, decoded and scored by
`kiqa.scoring.batches.scored_batches`, the loop `Scorer.score_many` uses too.

A file that cannot be used becomes a row with the reason, and the job goes on:
unreadable or undecodable files, non-regular files (devices, pipes), files over the
byte or pixel cap, and symbolic links that point outside the folders given (a link in
a folder of downloads must not make kiqa read /dev/zero or a private file).
"""

import contextlib
import csv
import dataclasses
import math
import os
import stat
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from kiqa import provenance
from kiqa.contract import (
    CSV_COLUMNS, DEFAULT_MAX_BYTES, DISTRIBUTION_COLUMNS, DISTRIBUTION_CSV_COLUMNS, IMAGE_EXTENSIONS,
)
from kiqa.errors import (
    ConfigError, DataError, NotScoresCsvError, OutputError, OutputIsInputError, ScoresFromAnotherModelError,
)
from kiqa.fsutil import CSV_TEXT, CsvWriter, csv_cell, csv_line, csv_value, output_lock, printable, writing
from kiqa.scoring.batches import DEFAULT_BATCH_SIZE, format_mos, scored_batches
from kiqa.scoring.files import find_images

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
        CsvWriter(handle).writerow(columns)
    return {}

def csv_row(path, mos, error, extras=None):
    """The CSV cells of one file, as `kiqa score` writes them (text cells under
    `kiqa.fsutil.csv_cell`'s rule against formula injection).

    `extras`, for a distribution model's CSV: the row's values of `DISTRIBUTION_COLUMNS`
    (mos_sd, p1..p5), or [] for a failed file; None writes the regression layout
    (path, mos, error).
    """
    head = (csv_cell(path), "" if mos is None else format_mos(mos))
    if extras is None:
        return (*head, csv_cell(error or ""))
    cells = [format_mos(v) for v in extras] if mos is not None and extras else [""] * len(DISTRIBUTION_COLUMNS)
    return (*head, *cells, csv_cell(error or ""))


def encode_csv_line(cells):
    """One CSV line as bytes, quoted and encoded like the scores CSV (non-UTF-8 names round-trip)."""
    return csv_line(cells).encode(_CSV_ENCODING["encoding"], _CSV_ENCODING["errors"])


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
        writer = CsvWriter(handle)
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
