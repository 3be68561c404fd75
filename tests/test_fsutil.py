import json
import math

import numpy as np
import pytest

from kiqa import fsutil


def test_json_safe_turns_nan_and_numpy_scalars_into_json():
    data = {"a": float("nan"), "b": [np.float32(1.5), np.int64(3), math.inf], "c": (True, None, "x")}
    assert fsutil.json_safe(data) == {"a": None, "b": [1.5, 3, None], "c": [True, None, "x"]}


def test_write_json_atomically_writes_strict_json_and_leaves_no_temp(tmp_path):
    path = tmp_path / "m.json"
    fsutil.write_json_atomically(path, {"srcc": np.float64("nan"), "n": np.int32(2)}, sort_keys=True)
    assert json.loads(path.read_text()) == {"n": 2, "srcc": None}
    assert "NaN" not in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_write_atomically_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "model.keras"
    path.write_text("old")

    def fail(tmp):
        assert tmp.endswith(".keras")
        raise OSError("disk full")

    with pytest.raises(OSError):
        fsutil.write_atomically(path, fail, suffix=".keras")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]


def test_staged_directory_is_beside_the_target_and_removed_on_failure(tmp_path):
    target = tmp_path / "out" / "set"
    with pytest.raises(RuntimeError):
        with fsutil.staged_directory(target) as staging:
            assert staging.parent == target.parent and staging.name.startswith(".set-")
            (staging / "half").write_text("x")
            raise RuntimeError("killed")
    assert list(target.parent.iterdir()) == []


def test_publish_directory_takes_an_empty_target_and_refuses_a_full_one(tmp_path):
    target = tmp_path / "set"
    target.mkdir()
    with fsutil.staged_directory(target) as staging:
        (staging / "labels.csv").write_text("new")
        fsutil.publish_directory(staging, target)
    assert (target / "labels.csv").read_text() == "new"
    with fsutil.staged_directory(target) as staging:
        (staging / "labels.csv").write_text("newer")
        with pytest.raises(OSError):
            fsutil.publish_directory(staging, target)
    assert (target / "labels.csv").read_text() == "new"


def test_publish_directory_replaces_a_full_target_when_asked(tmp_path):
    target = tmp_path / "set"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with fsutil.staged_directory(target) as staging:
        (staging / "new.txt").write_text("new")
        fsutil.publish_directory(staging, target, replace=True)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["set"]
