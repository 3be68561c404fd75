"""Any labelled CSV: one column of image paths, one of scores, on a stated scale.

KonIQ's two label files are read by `kiqa.data.koniq`. This module reads everything else
people evaluate on (their own photos rated 1-5, a 0-1 normalised set, another dataset's
0-100 MOS) and maps the score linearly to kiqa's 0-100 scale:

    mos = (score - low) / (high - low) * 100

A linear map changes no correlation (PLCC, SRCC and KRCC are the same on either scale);
RMSE and MAE are then in 0-100 points, comparable with KonIQ's.
"""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pandas as pd

from kiqa.contract import MOS_SCALE
from kiqa.errors import ConfigError, DataError, LabelsNotFoundError

NAMED_SCALES = {"1-5": (1.0, 5.0), "0-1": (0.0, 1.0), "0-100": (0.0, MOS_SCALE)}
DEFAULT_SCALE = "0-100"
_RANGE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*-\s*(-?\d+(?:\.\d+)?)\s*$")


@dataclasses.dataclass(frozen=True)
class Scale:
    """A score range, mapped linearly to 0-100.

    Attributes:
        low: the worst possible score.
        high: the best possible score.
    """

    low: float
    high: float

    def to_mos(self, values):
        """Maps scores on this scale to 0-100."""
        return (np.asarray(values, dtype=np.float64) - self.low) / (self.high - self.low) * MOS_SCALE

    @property
    def identity(self):
        """True for 0-100 (no mapping)."""
        return self.low == 0.0 and self.high == MOS_SCALE

    def describe(self, column):
        """How the column was read, in words for reports."""
        if self.identity:
            return f"column {column!r} read as MOS on 0-100 (no mapping)"
        return (
            f"column {column!r} on {self.low:g}-{self.high:g}, mapped linearly to 0-100 "
            f"((score - {self.low:g}) / {self.high - self.low:g} * 100): correlations are the same "
            f"on either scale, RMSE and MAE are in 0-100 points"
        )


def parse_scale(text):
    """Parses "1-5", "0-1", "0-100" or "LOW-HIGH" (e.g. "0-10", "-3-3").

    Raises:
        ConfigError: not a range, or low >= high.
    """
    text = str(text)
    if text in NAMED_SCALES:
        return Scale(*NAMED_SCALES[text])
    match = _RANGE.match(text)
    if not match:
        raise ConfigError(
            f"score scale must be LOW-HIGH such as 1-5, 0-1 or 0-100, got {text!r}"
        )
    low, high = float(match.group(1)), float(match.group(2))
    if not low < high:
        raise ConfigError(f"score scale {text!r}: the low end must be below the high end")
    return Scale(low, high)


@dataclasses.dataclass(frozen=True)
class LabelledCsv:
    """A labelled CSV as read: the table and how its score was mapped.

    Attributes:
        frame: rows with `image_name` (the path column's value), `mos` (0-100) and
            `score` (as written in the file).
        path_column: the column of image paths.
        mos_column: the column of scores.
        scale: the `Scale` the scores were on.
        notes: things the reader noticed, e.g. scores that look like another scale.
    """

    frame: pd.DataFrame
    path_column: str
    mos_column: str
    scale: Scale
    notes: tuple = ()

    def describe(self):
        """The score mapping in words."""
        return self.scale.describe(self.mos_column)


def read_labelled_csv(path, path_column="file", mos_column="mos", scale=DEFAULT_SCALE):
    """Reads a CSV of image paths and scores.

    Args:
        path: the CSV.
        path_column: column with image paths, relative to the image root.
        mos_column: column with the scores.
        scale: a `Scale` or its text ("1-5", "0-1", "0-100", "LOW-HIGH").

    Returns:
        A `LabelledCsv`.

    Raises:
        DataError: unreadable file, missing columns, empty or non-numeric scores, or
            scores outside the stated scale; each names the file, the column and rows.
        ConfigError: an invalid scale.
    """
    path = Path(path)
    scale = scale if isinstance(scale, Scale) else parse_scale(scale)
    try:
        table = pd.read_csv(path)
    except FileNotFoundError as err:
        raise LabelsNotFoundError(f"label file not found: {path}", path=str(path)) from err
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise DataError(f"cannot read label file {path}: {err}") from err
    from kiqa.data.koniq import record_lines

    lines = record_lines(path, len(table))  # also refuses a column named twice
    missing = [c for c in (path_column, mos_column) if c not in table.columns]
    if missing:
        raise DataError(
            f"label file {path} has no column(s) {missing}; its columns are {list(table.columns)}: "
            f"name the image-path and score columns"
        )
    if table.empty:
        raise DataError(f"label file {path} has no rows")
    scores = pd.to_numeric(table[mos_column], errors="coerce")
    bad = table.index[scores.isna() | table[path_column].isna()]
    if len(bad):
        rows = ", ".join(str(lines[i]) for i in bad[:5])
        raise DataError(
            f"label file {path}: {len(bad)} row(s) have no path or a non-numeric {mos_column!r} "
            f"(lines {rows}); fix or remove them"
        )
    outside = table.index[(scores < scale.low) | (scores > scale.high)]
    if len(outside):
        first = outside[0]
        raise DataError(
            f"label file {path}: {len(outside)} score(s) in {mos_column!r} lie outside the stated "
            f"scale {scale.low:g}-{scale.high:g} (line {lines[first]}: {scores[first]:g}); give the "
            f"scale the scores are on"
        )
    notes = []
    if scale.identity and scores.max() <= 5:
        notes.append(
            f"every score in {mos_column!r} is at most {scores.max():g}: if they are on a 1-5 or 0-1 "
            f"scale, say so, or RMSE and MAE are computed on the wrong scale (correlations are not affected)"
        )
    frame = pd.DataFrame({
        "image_name": table[path_column].astype(str),
        "mos": scale.to_mos(scores),
        "score": scores.to_numpy(dtype=np.float64),
    })
    return LabelledCsv(frame, path_column, mos_column, scale, tuple(notes))


PLAIN_DEFAULTS = {"path_column": "file", "mos_column": "mos", "scale": DEFAULT_SCALE}


def is_plain_csv(labels, path_column=None, mos_column=None, scale=None):
    """Whether a label file is read as a plain labelled CSV rather than a KonIQ file.

    Args:
        labels: the label CSV, or None.
        path_column: the given image-path column, or None.
        mos_column: the given score column, or None.
        scale: the given score range, or None.

    Returns:
        True when a column or the scale was given, or the file has no `image_name`
        column (KonIQ's layouts all have one).
    """
    if any(v is not None for v in (path_column, mos_column, scale)):
        return True
    if not labels:
        return False
    try:
        return "image_name" not in pd.read_csv(labels, nrows=0).columns
    except (OSError, ValueError):
        return False  # the KonIQ reader reports the unreadable file


def has_set_column(labels):
    """Whether a CSV's header names a `set` column (its own official split)."""
    try:
        return "set" in pd.read_csv(labels, nrows=0).columns
    except (OSError, ValueError):
        return False  # the reader reports the unreadable file


def read_for_training(path, path_column, mos_column, scale):
    """A plain labelled CSV as a label table `kiqa.data.koniq`'s splits and checks take.

    Args:
        path: the CSV.
        path_column: column with image paths, relative to the image root.
        mos_column: column with the scores.
        scale: a `Scale` or its text.

    Returns:
        DataFrame with `image_name`, `mos` (0-100), `line` and, when the file has a `set`
        column, `set` (train / val / test); `attrs` name the file and its score mapping.

    Raises:
        DataError: as `read_labelled_csv`, or a `set` column with other values than
            training / validation / test (or train / val / test).
        ConfigError: an invalid scale.
    """
    from kiqa.data.koniq import OFFICIAL_SETS, record_lines

    labelled = read_labelled_csv(path, path_column=path_column, mos_column=mos_column, scale=scale)
    frame = labelled.frame[["image_name", "mos"]].copy()
    frame["line"] = record_lines(path, len(frame))
    if has_set_column(path):
        names = {**OFFICIAL_SETS, **{short: short for short in OFFICIAL_SETS.values()}}
        sets = pd.read_csv(path, usecols=["set"])["set"]
        unknown = sorted(set(sets.dropna().astype(str)) - set(names))
        if unknown or sets.isna().any():
            raise DataError(f"{path}: column 'set' must hold {sorted(OFFICIAL_SETS)} on every row; "
                            f"found {unknown or 'empty cells'}")
        frame["set"] = sets.astype(str).map(names).to_numpy()
    frame.attrs["format"] = "labelled"
    frame.attrs["path"] = str(path)
    frame.attrs["scores"] = labelled.describe()
    return frame
