"""File-system steps shared by everything that writes user-visible files.

File names in kiqa's CSVs (`kiqa score`'s and `kiqa predict`'s, `rejects.csv`,
`split.csv`, `predictions.csv`): one rule everywhere. A path is the `str` Python's
`os.fsdecode` gives for the name's bytes (on Linux: UTF-8, with each byte that is not
valid UTF-8 kept as a lone surrogate, PEP 383), and CSVs are read and written as UTF-8
with `errors="surrogateescape"` (`CSV_TEXT`). So a Latin-1 name from an old camera is
written back as its original bytes and read again as the same `str`: the path
round-trips losslessly and a rerun finds it. The price: such a CSV is not valid UTF-8
at those bytes (a spreadsheet shows a replacement character there). TensorFlow gets
file names as bytes (`tf_path`), never as `str` (it refuses lone surrogates). Names
shown on a terminal go through `printable` (backslash escapes instead of raw bytes).
"""

import contextlib
import csv
import io
import errno
import fcntl
import hashlib
import json
import math
import numbers
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from kiqa.errors import DiskFullError, KiqaError, OutputError, OutputIsInputError, OutputLockedError

# open(..., **CSV_TEXT) for every CSV kiqa writes or reads back that holds file names.
CSV_TEXT = dict(encoding="utf-8", errors="surrogateescape", newline="")
# The same rule for pandas: frame.to_csv(path, **PANDAS_CSV_TEXT), pd.read_csv(path, **PANDAS_READ_TEXT).
PANDAS_CSV_TEXT = dict(encoding="utf-8", errors="surrogateescape")
PANDAS_READ_TEXT = dict(encoding="utf-8", encoding_errors="surrogateescape")

# Spreadsheets (Excel, LibreOffice, Google Sheets) run a cell that starts with one of these
# as a formula (CSV injection): a photo named "=HYPERLINK(...).jpg" becomes a live link.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# KIQA_SPREADSHEET_SAFE=1: every CSV kiqa writes puts an apostrophe before such a cell (and
# before a cell that starts with an apostrophe, so the escape can be undone exactly).
# Off by default: programs read kiqa's CSVs (resume, joins on `path`/`image_name`) and must
# get every file name byte for byte.
SPREADSHEET_SAFE_ENV = "KIQA_SPREADSHEET_SAFE"


def tf_path(path):
    """A file name as the bytes TensorFlow needs (`tf.constant` refuses lone surrogates)."""
    return os.fsencode(os.fspath(path))


def printable(path):
    """A file name safe to print on any terminal: bytes that are not UTF-8 as `\\xNN`."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def has_undecodable_bytes(text):
    """True if `text` holds bytes that were not valid UTF-8 (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def spreadsheet_safe() -> bool:
    """Whether CSV cells are escaped for spreadsheets (`KIQA_SPREADSHEET_SAFE`, see `csv_cell`)."""
    return os.environ.get(SPREADSHEET_SAFE_ENV, "") not in ("", "0")


def csv_cell(value: Any) -> Any:
    """A CSV cell as kiqa writes it: the one rule against CSV (formula) injection.

    Text is kept exact unless `KIQA_SPREADSHEET_SAFE` is set; then text starting with
    = + - @ tab, carriage return or an apostrophe gets a leading apostrophe, which a
    spreadsheet shows as text and never evaluates (`csv_value` undoes it). Non-text
    values (numbers, None) are returned as they are.
    """
    if isinstance(value, str) and value.startswith(FORMULA_STARTS + ("'",)) and spreadsheet_safe():
        return "'" + value
    return value


def csv_value(cell: str) -> str:
    """The text `csv_cell` escaped, read back from a CSV kiqa wrote under the same setting."""
    if spreadsheet_safe() and cell.startswith("'") and cell[1:].startswith(FORMULA_STARTS + ("'",)):
        return cell[1:]
    return cell


def csv_frame(frame):
    """A copy of a DataFrame with every text cell passed through `csv_cell`."""
    import pandas as pd  # only for pandas writers: kiqa.fsutil stays light to import

    if not spreadsheet_safe():
        return frame
    frame = frame.copy()
    for column in frame.columns:
        # object (pandas 2) or the string dtype (pandas 3) hold text; numbers stay numbers.
        if frame[column].dtype == object or pd.api.types.is_string_dtype(frame[column]):
            frame[column] = frame[column].map(csv_cell)
    # Column names are cells too (a label folder named "=x" heads compare's columns).
    frame.columns = [csv_cell(name) if isinstance(name, str) else name for name in frame.columns]
    return frame


# errno values that mean "the disk is full" rather than "not allowed here".
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def output_error(err: OSError, path, done: str = "") -> Exception:
    """The typed error for a failed write to `path` (`DiskFullError` or `OutputError`).

    Args:
        err: what the system raised.
        path: the output being written.
        done: what was kept, for the message ("1200 rows are kept"), or "".
    """
    path = Path(path)
    reason = err.strerror or str(err)
    kept = f"; {done}" if done else ""
    if err.errno in _NO_SPACE:
        folder = path.parent if str(path.parent) else Path(".")
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        return DiskFullError(f"cannot write {printable(path)}: {reason} (no space left on the device "
                             f"holding {printable(folder)}){kept}", folder=str(folder), needed=None, free=free)
    where = f" ({printable(err.filename)})" if err.filename and os.fspath(err.filename) != os.fspath(path) else ""
    return OutputError(f"cannot write {printable(path)}: {reason}{where}{kept}", path=path,
                       errno_=err.errno, reason=reason)


@contextlib.contextmanager
def writing(path, done=lambda: "") -> Iterator[None]:
    """Turns an `OSError` raised while writing `path` into `output_error`'s typed error.

    Args:
        path: the output.
        done: called on failure for what was kept ("1200 rows are kept"), or "".
    """
    try:
        yield
    except KiqaError:
        raise
    except OSError as err:
        raise output_error(err, path, done()) from err


def refuse_foreign_outputs(folder, names, ours) -> None:
    """Refuses to write into `folder` when it holds one of `names` that kiqa cannot prove it wrote.

    Args:
        folder: the output folder.
        names: the file names the job writes there.
        ours: whether the folder shows kiqa's mark (a file only kiqa writes there).

    Raises:
        OutputIsInputError: a file of those names is there without kiqa's mark; nothing was changed.
    """
    folder = Path(folder)
    there = [name for name in names if os.path.lexists(folder / name)]
    if there and not ours:
        raise OutputIsInputError(
            f"{printable(folder)} holds {', '.join(there)}, which kiqa did not write there (the folder "
            f"has no kiqa output of this kind); they are left untouched: use another output folder",
            path=str(folder / there[0]))


LOCK_SUFFIX = ".lock"


@contextlib.contextmanager
def output_lock(path) -> Iterator[Path]:
    """Holds `<path>.lock` while one process writes `path`; a second process is refused.

    The lock is an `flock` on the file, so a killed process never leaves a stale lock:
    the kernel drops it. The file holds the holder's pid for the message, and is
    removed when the job ends.

    Yields:
        The lock file's path.

    Raises:
        OutputLockedError: another process holds the lock (its pid named), or
            `<path>.lock` is a file kiqa did not write (left untouched).
        OutputError: the lock file cannot be created (read-only folder, ...).
    """
    lock = Path(f"{os.fspath(path)}{LOCK_SUFFIX}")
    handle = _take_lock(lock, path)
    try:
        with writing(lock):
            handle.seek(0)
            handle.truncate()
            handle.write(f"kiqa pid {os.getpid()}\n")
            handle.flush()
        try:
            yield lock
        finally:
            # Removed while still held: a process that opened the old file meanwhile
            # sees it replaced once it gets the lock, and starts over (`_take_lock`).
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)
    finally:
        handle.close()


def _take_lock(lock: Path, path):
    """The open, `flock`ed lock file (see `output_lock`); three tries against a holder
    that removes it between our open and our lock."""
    for _ in range(3):
        with writing(lock):
            handle = open(lock, "a+")
        try:
            handle.seek(0)
            holder = handle.read(64)
            pid = _lock_pid(holder)
            if holder and pid is None:
                raise OutputLockedError(
                    f"{printable(lock)} exists and is not a kiqa lock file ({holder[:20]!r}); it is "
                    f"left untouched: move it away or write to another output", path=path)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputLockedError(
                    f"another kiqa process (pid {pid if pid is not None else 'unknown'}) is writing "
                    f"{printable(path)} now (lock file {printable(lock)}); wait for it to finish, or "
                    f"write to another output", path=path, pid=pid) from err
            try:
                same = os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return handle
        except BaseException:
            handle.close()
            raise
        handle.close()
    raise OutputLockedError(f"{printable(lock)} keeps being replaced by another process; "
                            f"write to another output", path=path)


def _lock_pid(text: str) -> Optional[int]:
    """The pid in a kiqa lock file's text, or None."""
    parts = text.split()
    if len(parts) == 3 and parts[:2] == ["kiqa", "pid"] and parts[2].isdigit():
        return int(parts[2])
    return None


def write_atomically(path, write, suffix=".tmp"):
    """Writes a file through a temporary file in the same folder and a rename.

    A kill or a full disk then leaves either the old file or the new one, never a
    truncated one (`os.replace` is atomic on POSIX within one file system).

    Args:
        path: the file to write.
        write: function taking the temporary path and writing the whole content to it.
        suffix: the temporary file's ending, for writers that insist on one (Keras wants
            `.keras` or `.weights.h5`).

    Raises:
        OSError: the write failed (the old file, if any, is left as it was).
    """
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def link_atomically(source, path) -> bool:
    """Replaces `path` by a hard link to `source`: one copy of the bytes, both names kept.

    The link is made under a temporary name and renamed over `path`, so `path` is always
    the old file or the link. Writers that replace a file by a rename (`write_atomically`)
    later give that name its own file again and leave the other name's bytes alone.

    Args:
        source: the file to link to.
        path: the file to replace, in a folder on the same file system.

    Returns:
        True when linked; False when the file system refuses hard links (another device,
        FAT, some network shares): `path` is then left as it was.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.link"
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError:
        return False
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    return True


def write_text_atomically(path, text):
    """`Path.write_text`, atomically (see `write_atomically`)."""
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_csv_atomically(frame, path, **to_csv):
    """`DataFrame.to_csv` under the CSV path rule (and `csv_cell`'s), atomically (see `write_atomically`)."""
    frame = csv_frame(frame)
    write_atomically(path, lambda tmp: frame.to_csv(tmp, index=False, **PANDAS_CSV_TEXT, **to_csv))


def json_safe(value):
    """`value` with NaN and infinities as None and numpy scalars as Python numbers.

    Strict JSON readers (browsers, `jq`, Go) reject the `NaN` Python's `json` writes.
    """
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):  # numpy integers register here
        return int(value)
    if isinstance(value, numbers.Real):  # numpy floats register here
        return float(value) if math.isfinite(value) else None
    return value


def write_json_atomically(path, data, **dumps):
    """Writes `data` as JSON (NaN as null, see `json_safe`) atomically; `dumps` go to `json.dumps`."""
    text = json.dumps(json_safe(data), allow_nan=False, **{"indent": 2, **dumps}) + "\n"
    write_text_atomically(path, text)


@contextlib.contextmanager
def staged_directory(target):
    """A fresh hidden folder beside `target` to build it in; deleted on exit if still there.

    Beside, not in /tmp: the publishing rename must stay on one file system to be atomic.

    Yields:
        The staging folder's `Path` (publish it with `publish_directory`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish_directory(staged, target, replace=False, aside=None):
    """Renames the finished folder `staged` to `target`: a reader never sees half of it.

    Args:
        staged: the finished folder (on the same file system as `target`).
        target: where it goes. A missing or empty `target` is taken by one rename.
        replace: a non-empty `target` is replaced (`swap_directory`) instead of refused.
        aside: with `replace`: where the old folder waits between the two renames (must
            not exist or be empty). None makes a fresh hidden folder beside `target`;
            pass a name a recovery step can recognise after a kill.

    Raises:
        OSError: a rename failed, or `target` is not empty and `replace` is off
            (`target` is as it was).
    """
    staged, target = Path(staged), Path(target)
    if replace and target.is_dir() and any(target.iterdir()):
        if aside is None:
            aside = tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent)
        swap_directory(staged, target, aside)
    else:
        # POSIX rename takes an empty folder's place but refuses a non-empty one, so a
        # folder another process filled meanwhile is never replaced by accident.
        os.rename(staged, target)


def swap_directory(new, target, aside):
    """Replaces folder `target` with folder `new` by two renames.

    The old `target` waits at `aside` between the renames, so a reader never sees a
    half-written folder; if the second rename fails, the old one is put back. The old
    folder is deleted once the new one is in place.

    Args:
        new: the finished folder.
        target: the folder to replace (must exist).
        aside: where the old folder waits; must not exist, or be an empty folder.

    Raises:
        OSError: a rename failed (the old folder is back at `target`).
    """
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except OSError:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def sha256_of(path):
    """The sha256 hex digest of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def nbytes(variables) -> int:
    """Bytes the values of `variables` (anything with a shape and a dtype) hold in memory."""
    import numpy as np

    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)


def describe_bytes(n: float) -> str:
    """A size for people: "1,234 MB" or "56 kB"."""
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


def is_disk_full(err: BaseException) -> bool:
    """Whether an error is a full disk (ENOSPC, also as TF or h5py word it)."""
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err)


def require_free_space(folder, needed: int, need: str, purpose: str = "", kept: str = "",
                       cause: Optional[BaseException] = None) -> None:
    """Raises DiskFullError when `folder` has less than `needed` bytes free.

    Args:
        folder: the folder to be written to.
        needed: bytes that must be free there.
        need: who needs the space, as the message's subject and verb ("training needs").
        purpose: what for ("its backup and checkpoints"), if worth saying.
        kept: a sentence on what was kept and how to go on, appended to the message.
        cause: an OSError (ENOSPC) that already happened: raise whatever the free
            space, chained to it.

    Raises:
        DiskFullError: naming the folder, the space needed and the space free.
    """
    free = shutil.disk_usage(folder).free
    if cause is None and free >= needed:
        return
    happened = "ran out of space" if cause is not None else "has too little free space"
    error = DiskFullError(
        f"{folder} {happened}: {need} about {describe_bytes(needed)} free there"
        f"{' for ' + purpose if purpose else ''}, "
        f"{describe_bytes(free)} is free" + (f". {kept}" if kept else ""),
        folder=str(folder), needed=needed, free=free,
    )
    if cause is not None:
        raise error from cause
    raise error


def csv_line(cells) -> str:
    """One CSV row as text ending in "\n" (not csv's default "\r\n").

    A cell holding a line break of either kind is quoted, so it reads back whole: csv
    quotes only the characters of its line terminator, so the row is written with "\r\n"
    (quoting both) and only the unquoted terminator at its end becomes "\n".
    """
    buffer = io.StringIO(newline="")
    csv.writer(buffer, lineterminator="\r\n").writerow(cells)
    return buffer.getvalue()[:-2] + "\n"


class CsvWriter:
    """`csv.writer`'s writerow/writerows over `csv_line`: "\n" line ends, every line break in
    a cell quoted. kiqa's CSV writers use it, so every CSV kiqa writes has one form."""

    def __init__(self, handle):
        self.handle = handle

    def writerow(self, cells) -> None:
        """Writes one row."""
        self.handle.write(csv_line(cells))

    def writerows(self, rows) -> None:
        """Writes the rows in order."""
        self.handle.write("".join(csv_line(cells) for cells in rows))
