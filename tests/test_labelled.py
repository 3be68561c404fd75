"""Tests for kiqa.data.labelled: any CSV of paths and scores, mapped to 0-100."""

import numpy as np
import pandas as pd
import pytest

from kiqa.data.labelled import parse_scale, read_labelled_csv
from kiqa.errors import ConfigError, DataError


def test_scales_parse_and_map_linearly():
    assert parse_scale("1-5").to_mos([1, 3, 5]).tolist() == [0.0, 50.0, 100.0]
    assert parse_scale("0-1").to_mos([0.25]).tolist() == [25.0]
    assert parse_scale("0-100").identity
    assert parse_scale("-3-3").to_mos([0.0]).tolist() == [50.0]
    assert parse_scale(" 0 - 10 ").high == 10.0
    for bad in ("5-1", "one-five", "3"):
        with pytest.raises(ConfigError, match="scale"):
            parse_scale(bad)


def test_a_plain_file_mos_csv_on_1_to_5(tmp_path):
    path = tmp_path / "labels.csv"
    pd.DataFrame({"file": ["a.jpg", "b.png"], "mos": [1.0, 4.2]}).to_csv(path, index=False)
    read = read_labelled_csv(path, scale="1-5")
    np.testing.assert_allclose(read.frame["mos"], [0.0, 80.0])
    assert list(read.frame["image_name"]) == ["a.jpg", "b.png"] and read.notes == ()
    assert "mapped linearly to 0-100" in read.describe() and "RMSE and MAE are in 0-100 points" in read.describe()
    unscaled = read_labelled_csv(path)  # default 0-100: the reader says the values look like another scale
    assert unscaled.notes and "1-5 or 0-1" in unscaled.notes[0]


def test_bad_csvs_are_named_with_the_fix(tmp_path):
    path = tmp_path / "labels.csv"
    pd.DataFrame({"path": ["a.jpg", "b.jpg"], "score": [3.0, 7.5]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"no column\(s\) \['file', 'mos'\].*columns are \['path', 'score'\]"):
        read_labelled_csv(path)
    with pytest.raises(DataError, match=r"outside the stated scale 1-5 \(line 3: 7.5\)"):
        read_labelled_csv(path, path_column="path", mos_column="score", scale="1-5")
    pd.DataFrame({"file": ["a.jpg", "b.jpg"], "mos": ["3", "n/a"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"non-numeric 'mos' \(lines 3\)"):
        read_labelled_csv(path)
