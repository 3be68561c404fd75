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
import hashlib
import json
import math
import numbers
import os
import shutil
import tempfile
from pathlib import Path

# open(..., **CSV_TEXT) for every CSV kiqa writes or reads back that holds file names.
CSV_TEXT = dict(encoding="utf-8", errors="surrogateescape", newline="")
# The same rule for pandas: frame.to_csv(path, **PANDAS_CSV_TEXT), pd.read_csv(path, **PANDAS_READ_TEXT).
PANDAS_CSV_TEXT = dict(encoding="utf-8", errors="surrogateescape")
PANDAS_READ_TEXT = dict(encoding="utf-8", encoding_errors="surrogateescape")


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


def write_text_atomically(path, text):
    """`Path.write_text`, atomically (see `write_atomically`)."""
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_csv_atomically(frame, path, **to_csv):
    """`DataFrame.to_csv` under the CSV path rule, atomically (see `write_atomically`)."""
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
