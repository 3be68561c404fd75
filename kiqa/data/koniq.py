"""KonIQ-10k label files, image names and splits.

KonIQ-10k ships two label files, and their `MOS` columns are on different scales:

- `koniq10k_distributions_sets.csv` (official split file): `MOS` is the 0-100 score and
  `set` is training / validation / test (7058 / 1000 / 2015).
- `koniq10k_scores_and_distributions.csv` (inside the dataset's download zip): `MOS` is
  the raw 1-5 mean and `MOS_zscore` is the 0-100 score; there is no split.

`read_labels` detects which file it was given and always returns the 0-100 score as
`mos`; the raw 1-5 mean is kept as `mos_raw` where present and never used as a target.
Any other CSV with `image_name` and one of these layouts works too (the demo data uses
the download file's columns plus `source_image`, which keeps crops of one photo on one
side of every random split).
"""

import collections
import csv
import dataclasses
import errno
import os
import posixpath
import stat
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from kiqa.contract import MOS_SCALE
from kiqa.errors import DataError, LabelsNotFoundError, NoOfficialSplitError
from kiqa.fsutil import CSV_TEXT, PANDAS_READ_TEXT, has_undecodable_bytes

SHARE_COLUMNS = ("c1", "c2", "c3", "c4", "c5")
SPLIT_FILE = "split file"  # koniq10k_distributions_sets.csv
DOWNLOAD_FILE = "download file"  # koniq10k_scores_and_distributions.csv
OFFICIAL_SETS = {"training": "train", "validation": "val", "test": "test"}
# A column that groups images cut from one source photo; random splits keep a group together.
GROUP_COLUMN = "source_image"


@dataclasses.dataclass(frozen=True)
class Split:
    """One train / validation / test partition of a label table.

    Attributes:
        name: e.g. "official", "random-seed0", "repeat3-seed3".
        train: rows used for fitting.
        val: rows used for early stopping and the best checkpoint.
        test: held-out rows, evaluated once at the end.
    """

    name: str
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame

    def sizes(self):
        """Returns {"train": n, "val": n, "test": n}."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


# Over 60 lines: one pass over the file whose checks (columns, layouts, cells, lines) share its table.
def read_labels(path):
    """Reads a KonIQ-format label CSV and normalises its columns.

    Args:
        path: `koniq10k_distributions_sets.csv`, `koniq10k_scores_and_distributions.csv`,
            or a CSV in either layout.

    Returns:
        DataFrame with `image_name`, `mos` (0-100), `line` (the row's line in the file,
        1-based, header = 1) and, where the file has them, `set` (train / val / test),
        `mos_raw` (1-5), `sd`, `votes`, `c1`..`c5` (shares of votes per rating level)
        and `source_image`. Bytes of `image_name` that
        are not UTF-8 are kept as surrogates (`kiqa.fsutil`'s file-name rule).
        `frame.attrs["format"]` names the detected layout and `attrs["path"]` the file.

    Raises:
        DataError: the file is missing, unreadable, in neither layout, or holds
            invalid rows (named by line).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # Rows with one field more than the header would otherwise make pandas use
            # the first column as the index and shift every column by one, silently
            # (image_name would hold the scores). With index_col=False it warns instead.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            # Names are file names under kiqa.fsutil's rule: bytes that are not UTF-8
            # are kept (a Latin-1 name names the Latin-1 file on disk); in any other
            # column they are refused below, by line.
            frame = pd.read_csv(path, dtype={"image_name": object}, index_col=False, **PANDAS_READ_TEXT)
    except FileNotFoundError as err:
        raise LabelsNotFoundError(f"label file not found: {path}", path=str(path)) from err
    except pd.errors.ParserWarning as err:
        raise DataError(
            f"{path}: rows have more fields than the header has columns; check the "
            f"separator and quoting (KonIQ label files are comma-separated with one header row)"
        ) from err
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DataError(f"cannot read label file {path} as CSV: {err}") from err

    lines = record_lines(path, len(frame))
    frame.index = lines - 2  # so every message below names the line a text editor shows
    _refuse_undecodable_cells(frame, path)
    columns = list(frame.columns)
    if "image_name" not in columns:
        raise DataError(
            f"{path}: no 'image_name' column; columns found: {columns}. Expected a KonIQ "
            "label file (koniq10k_distributions_sets.csv or koniq10k_scores_and_distributions.csv)"
        )
    if "MOS_zscore" in columns:
        layout, score_column = DOWNLOAD_FILE, "MOS_zscore"
    elif "MOS" in columns and "set" in columns:
        layout, score_column = SPLIT_FILE, "MOS"
    else:
        raise DataError(
            f"{path}: KonIQ CSV has no 0-100 score column: expected 'MOS_zscore' (download "
            f"file) or 'MOS' with a 'set' column (official split file); columns found: {columns}"
        )

    out = pd.DataFrame({"image_name": frame["image_name"]})
    out["line"] = frame.index + 2  # as a text editor shows them: header is line 1
    out = out.reset_index(drop=True)
    frame = frame.reset_index(drop=True)
    out["mos"] = pd.to_numeric(frame[score_column], errors="coerce")
    if layout == DOWNLOAD_FILE and "MOS" in columns:
        out["mos_raw"] = pd.to_numeric(frame["MOS"], errors="coerce")
    if layout == SPLIT_FILE:
        unknown = sorted(set(frame["set"].dropna()) - set(OFFICIAL_SETS))
        if unknown or frame["set"].isna().any():
            raise DataError(
                f"{path}: column 'set' must hold {sorted(OFFICIAL_SETS)} on every row; "
                f"found {unknown or 'empty cells'}"
            )
        out["set"] = frame["set"].map(OFFICIAL_SETS)
    if "SD" in columns:
        out["sd"] = pd.to_numeric(frame["SD"], errors="coerce")
    if "c_total" in columns:
        out["votes"] = pd.to_numeric(frame["c_total"], errors="coerce")
    for share in SHARE_COLUMNS:
        # The share of votes per rating level: the same in both layouts (distribution training).
        if share in columns:
            out[share] = pd.to_numeric(frame[share], errors="coerce")
    if GROUP_COLUMN in columns:
        out[GROUP_COLUMN] = frame[GROUP_COLUMN].astype(str)

    _check_rows(out, path, score_column)
    out.attrs["format"] = layout
    out.attrs["path"] = str(path)
    return out


def record_lines(path, n_rows):
    """The line each data row of a CSV starts on (header = line 1), as a text editor counts.

    A quoted cell may hold line breaks, so row k is not always on line k + 2; blank lines
    are skipped as pandas skips them. Also refuses a header naming a column twice (pandas
    would rename the second "MOS.1" and the first would be used silently).

    Args:
        path: the CSV, already read by pandas (`n_rows` data rows).
        n_rows: rows pandas found; if the count differs, row k is taken as line k + 2.

    Returns:
        numpy int array of `n_rows` line numbers.

    Raises:
        DataError: a column name appears more than once in the header.
    """
    starts, header, end = [], None, 0
    try:
        with open(path, **CSV_TEXT) as handle:
            reader = csv.reader(handle)
            for row in reader:
                start, end = end + 1, reader.line_num
                if not row:
                    continue
                if header is None:
                    header = row
                else:
                    starts.append(start)
    except (OSError, csv.Error):
        starts = []
    twice = [name for name, count in collections.Counter(header or []).items() if count > 1]
    if twice:
        raise DataError(f"{path}: column {twice[0]!r} appears more than once in the header (line 1); "
                        f"rename or remove the extra column so it is clear which one holds the values")
    if len(starts) != n_rows:
        return np.arange(n_rows) + 2
    return np.array(starts)


def undecodable_bytes(text):
    """The `bytes` of `text` (a field read with surrogateescape) as they were in the file."""
    return text.encode("utf-8", "surrogateescape")


def _refuse_undecodable_cells(frame, path):
    """Refuses bytes that are not UTF-8 anywhere but in file names, naming the lines."""
    names = {"image_name", GROUP_COLUMN}
    bad_header = [c for c in frame.columns if isinstance(c, str) and has_undecodable_bytes(c)]
    if bad_header:
        raise DataError(
            f"{path}: line 1 (the header) holds bytes that are not UTF-8 "
            f"({undecodable_bytes(bad_header[0])!r}); re-save the label file as UTF-8"
        )
    for column in frame.columns:
        if column in names or pd.api.types.is_numeric_dtype(frame[column]):
            continue
        bad = frame[column].map(lambda v: isinstance(v, str) and has_undecodable_bytes(v))
        if bad.any():
            lines = (frame.index[bad] + 2).tolist()
            shown = undecodable_bytes(frame.loc[bad, column].iat[0])
            raise DataError(
                f"{path}: column {column!r} holds bytes that are not UTF-8 on line(s) {lines[:10]} "
                f"(line {lines[0]}: {shown!r}); the file was probably saved as Latin-1 or "
                "Windows-1252: re-save it as UTF-8"
            )


def _check_rows(frame, path, score_column):
    if frame.empty:
        raise DataError(f"{path}: the label file has no rows")
    # Line numbers as a text editor shows them (header is line 1), from `record_lines`.
    bad_name = frame["image_name"].isna() | (frame["image_name"].str.strip() == "")
    if bad_name.any():
        lines = frame["line"][bad_name].tolist()[:10]
        raise DataError(f"{path}: empty image_name on line(s) {lines}")
    bad_score = ~np.isfinite(frame["mos"]) | (frame["mos"] < 0) | (frame["mos"] > MOS_SCALE)
    if bad_score.any():
        lines = frame["line"][bad_score].tolist()[:10]
        raise DataError(
            f"{path}: column '{score_column}' must be a 0-100 score; missing or out of "
            f"range on line(s) {lines}"
        )
    # Names listed twice (also as ./x.jpg, sub//x.jpg or a link) are found by
    # resolved file in check_image_names: the first row is kept, the others reported.


def require_shares(frame, path=None):
    """The shares c1..c5 of a label table as float32 [n, 5], checked row by row.

    Args:
        frame: a table from `read_labels` (or a part of one).
        path: the label file, for messages (default: `frame.attrs["path"]`).

    Returns:
        float32 array [n, 5]; each row is a distribution.

    Raises:
        DataError: the table has no c1..c5 columns, or rows that are not shares
            (missing, negative, or not summing to 1 within 0.01), named by line.
    """
    path = path or frame.attrs.get("path", "label file")
    missing = [c for c in SHARE_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: no rating distribution (columns {missing} missing); the distribution head "
            f"needs the shares of votes per rating level c1..c5 that both KonIQ label files have"
        )
    shares = frame[list(SHARE_COLUMNS)].to_numpy(np.float64)
    bad = ~np.isfinite(shares).all(1) | (shares < 0).any(1) | (np.abs(shares.sum(1) - 1) > 0.01)
    if bad.any():
        lines = frame["line"].to_numpy()[bad].tolist()[:10] if "line" in frame.columns else np.flatnonzero(bad)[:10].tolist()
        raise DataError(
            f"{path}: c1..c5 must be shares of votes (0..1, summing to 1) on every row; not so on "
            f"line(s) {lines}"
        )
    return shares.astype(np.float32)


def default_image_root(labels_path):
    """Where the images of a label file are, when the user did not say.

    KonIQ's zip extracts to `1024x768/` (or `512x384/` for the small copy) beside the
    label files; otherwise the CSV's own folder.
    """
    folder = Path(labels_path).resolve().parent
    for sub in ("1024x768", "512x384", "images"):
        if (folder / sub).is_dir():
            return folder / sub
    return folder


# How a reject reason for a name with no file behind it reads (counted to tell a wrong
# image folder from a few bad files).
MISSING_REASON = "file not found at"


def normalise_name(name):
    """The canonical form of an `image_name`: `/` separators, no `.` parts or doubled `/`.

    `./x.jpg`, `sub//x.jpg` and `sub\\x.jpg` become `x.jpg`, `sub/x.jpg`, `sub/x.jpg`.
    `..` is left in (and refused by `resolve_image_path`).
    """
    return posixpath.normpath(name.replace("\\", "/"))


def _not_regular(path):
    """What a path that is not a regular file is (for the reject reason)."""
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def resolve_image_path(root, name):
    """Resolves one `image_name` inside the image root, refusing anything that escapes it.

    Args:
        root: the image folder.
        name: the CSV's `image_name` value.

    Returns:
        The resolved `Path` of a regular file inside `root`.

    Raises:
        DataError: absolute path, `..` component, a link leaving the root, a link loop,
            a dangling link, missing, not a regular file (folder, pipe, device), or
            not readable.
    """
    # os.path.join(root, "/etc/passwd") is "/etc/passwd": absolute names must be refused
    # before joining, not after.
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or ":" in name[:3]:
        raise DataError(f"{name!r}: absolute paths are not allowed; names are relative to the image folder")
    parts = Path(name.replace("\\", "/")).parts
    if ".." in parts:
        raise DataError(f"{name!r}: '..' is not allowed in image names")
    root = Path(root).resolve()
    given = root / normalise_name(name)
    try:
        path = given.resolve(strict=True)
    except RuntimeError as err:  # Python 3.11 reports a symlink loop this way
        raise DataError(f"{name!r}: {given} is a symbolic link loop ({err})") from err
    except OSError as err:
        if os.path.islink(given) or err.errno == errno.ELOOP:
            target = os.path.realpath(given)
            if err.errno == errno.ELOOP:
                raise DataError(f"{name!r}: {given} is a symbolic link loop") from err
            raise DataError(f"{name!r}: {given} is a dangling symbolic link (its target {target} does not exist)") from err
        raise DataError(f"{name!r}: {MISSING_REASON} {given}") from err
    if path != root and root not in path.parents:
        raise DataError(f"{name!r}: resolves to {path}, outside the image folder {root} (a link leaving it?)")
    if not path.is_file():
        raise DataError(f"{name!r}: {path} is {_not_regular(path)}, not a regular file; remove it from the label file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{name!r}: {path} is not readable (permissions)")
    return path


DUPLICATE_REASON = "same file as"


def check_image_names(frame, root):
    """Checks every `image_name` at once, so the user sees all problems together.

    Names are normalised (`normalise_name`) and resolved; rows naming a file an
    earlier row already named (`x.jpg`, `./x.jpg`, `sub/../x.jpg` is refused, a link
    to `x.jpg`) are duplicates: the first row and its label are kept, each later one
    is a problem whose reason starts with `DUPLICATE_REASON` (so one photo can never be
    in two parts of a split).

    Args:
        frame: a label table from `read_labels`.
        root: the image folder.

    Returns:
        (paths, problems): `paths` is a list aligned with `frame` (a resolved path
        string, or None for a bad or duplicate row); `problems` is a list of
        (image_name, reason).
    """
    paths, problems, first = [], [], {}
    lines = frame["line"] if "line" in frame.columns else pd.Series(frame.index + 2)
    for name, line in zip(frame["image_name"], lines):
        try:
            path = str(resolve_image_path(root, name))
        except DataError as err:
            paths.append(None)
            problems.append((name, str(err)))
            continue
        if path in first:
            earlier, earlier_line = first[path]
            paths.append(None)
            problems.append((name, f"{DUPLICATE_REASON} {earlier!r} (line {earlier_line}): {path}; "
                                   "the first row's label is kept, this row is dropped"))
            continue
        first[path] = (name, line)
        paths.append(path)
    return paths, problems


def official_split(frame):
    """KonIQ's official split from the `set` column (7058 / 1000 / 2015 on KonIQ-10k).

    Raises:
        NoOfficialSplitError: the table has no `set` column (use a random split instead).
    """
    if "set" not in frame.columns:
        raise NoOfficialSplitError(
            f"{frame.attrs.get('path', 'the label file')} has no 'set' column, so it has no "
            "official split: use koniq10k_distributions_sets.csv, or a random or repeated split",
            path=frame.attrs.get("path"),
        )
    parts = {key: frame[frame["set"] == key].reset_index(drop=True) for key in ("train", "val", "test")}
    return Split("official", parts["train"], parts["val"], parts["test"])


def random_split(frame, test_fraction, val_fraction, seed, name=None):
    """One seeded random split; a validation part is carved out of training.

    Rows sharing a `source_image` stay on one side (crops of one photo must not be in
    both training and test). The permutation comes from numpy's PCG64 on the sorted
    keys, so the same seed gives the same split on any machine.

    Args:
        frame: label table.
        test_fraction: share held out for testing (0.2 for 80/20, 0.3 for the KonIQ paper).
        val_fraction: share of the remaining training part used for validation.
        seed: integer seed.
        name: split name; defaults to "random-seed<seed>".

    Returns:
        A `Split`.

    Raises:
        DataError: too few images or groups to make non-empty parts.
    """
    keys = frame[GROUP_COLUMN] if GROUP_COLUMN in frame.columns else frame["image_name"]
    unique = np.array(sorted(set(keys)))
    order = unique[np.random.default_rng(seed).permutation(len(unique))]
    n_test = int(round(len(unique) * test_fraction))
    n_val = int(round((len(unique) - n_test) * val_fraction))
    if n_test < 1 or len(unique) - n_test - n_val < 1 or (val_fraction > 0 and n_val < 1):
        raise DataError(
            f"cannot split {len(unique)} {'source photos' if GROUP_COLUMN in frame.columns else 'images'} "
            f"into test {test_fraction:.0%} / validation {val_fraction:.0%} with none empty; "
            "use more images or other fractions"
        )
    test_keys = set(order[:n_test])
    val_keys = set(order[n_test:n_test + n_val])
    side = keys.map(lambda k: "test" if k in test_keys else "val" if k in val_keys else "train")
    parts = {key: frame[side == key].reset_index(drop=True) for key in ("train", "val", "test")}
    return Split(name or f"random-seed{seed}", parts["train"], parts["val"], parts["test"])


def make_splits(frame, config):
    """The split(s) a config asks for.

    Args:
        frame: label table.
        config: a `TrainConfig` (split, test_fraction, val_fraction, repeats, seed).

    Returns:
        A list of `Split`: one for "official" and "random", `repeats` for "repeated".
    """
    if config.split == "official":
        split = official_split(frame)
        if split.val.empty:
            # No validation rows in the file: carve them out of training, seeded.
            carved = random_split(split.train, config.val_fraction, 0.0, config.seed)
            split = Split("official", carved.train, carved.test, split.test)
        return [split]
    if config.split == "random":
        return [random_split(frame, config.test_fraction, config.val_fraction, config.seed)]
    return [
        random_split(
            frame, config.test_fraction, config.val_fraction, config.seed + i,
            name=f"repeat{i}-seed{config.seed + i}",
        )
        for i in range(config.repeats)
    ]
