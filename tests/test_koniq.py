import os

import numpy as np
import pandas as pd
import pytest

from kiqa.config import TrainConfig
from kiqa.data import koniq
from kiqa.errors import DataError


def write_csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def download_file_rows(n=20):
    # The dataset's own download: MOS is the raw 1-5 mean, MOS_zscore the 0-100 score.
    return [
        dict(image_name=f"{i}.jpg", c1=0.1, c2=0.2, c3=0.3, c4=0.3, c5=0.1, c_total=100,
             MOS=1 + 4 * (i / n), SD=0.5, MOS_zscore=100 * i / n)
        for i in range(n)
    ]


def test_real_official_split_file(koniq_csv):
    frame = koniq.read_labels(koniq_csv)
    assert frame.attrs["format"] == koniq.SPLIT_FILE
    assert len(frame) == 10073
    assert frame["mos"].between(3.9, 88.4).all()
    split = koniq.official_split(frame)
    assert split.sizes() == {"train": 7058, "val": 1000, "test": 2015}
    assert not set(split.train.image_name) & set(split.test.image_name)


def test_download_file_uses_the_zscore_column_not_raw_mos(tmp_path):
    frame = koniq.read_labels(write_csv(tmp_path / "k.csv", download_file_rows()))
    assert frame.attrs["format"] == koniq.DOWNLOAD_FILE
    np.testing.assert_allclose(frame["mos"], [100 * i / 20 for i in range(20)])
    assert frame["mos_raw"].max() <= 5
    assert "set" not in frame.columns


def test_download_file_has_no_official_split(tmp_path):
    frame = koniq.read_labels(write_csv(tmp_path / "k.csv", download_file_rows()))
    with pytest.raises(DataError, match="no 'set' column"):
        koniq.official_split(frame)


def test_a_file_that_is_neither_names_found_and_expected_columns(tmp_path):
    path = write_csv(tmp_path / "x.csv", [dict(image_name="a.jpg", score=3.0)])
    with pytest.raises(DataError) as err:
        koniq.read_labels(path)
    assert "MOS_zscore" in str(err.value) and "score" in str(err.value)


def test_raw_mos_without_set_is_refused_not_guessed(tmp_path):
    # MOS alone is ambiguous (1-5 in the download file, 0-100 in the split file).
    path = write_csv(tmp_path / "x.csv", [dict(image_name="a.jpg", MOS=3.2)])
    with pytest.raises(DataError, match="no 0-100 score column"):
        koniq.read_labels(path)


def test_out_of_range_scores_and_duplicates_are_reported_by_line(tmp_path):
    rows = download_file_rows(5)
    rows[2]["MOS_zscore"] = 140
    with pytest.raises(DataError, match=r"line\(s\) \[4\]"):
        koniq.read_labels(write_csv(tmp_path / "a.csv", rows))
    rows = download_file_rows(5)
    rows[3]["image_name"] = rows[1]["image_name"]
    # A name listed twice is read (check_image_names keeps the first row, reports the rest).
    frame = koniq.read_labels(write_csv(tmp_path / "b.csv", rows))
    assert frame["line"].tolist() == [2, 3, 4, 5, 6]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="not found"):
        koniq.read_labels(tmp_path / "nope.csv")


def test_random_split_is_seeded_disjoint_and_sized(tmp_path):
    frame = koniq.read_labels(write_csv(tmp_path / "k.csv", download_file_rows(100)))
    a = koniq.random_split(frame, 0.3, 0.1, seed=3)
    b = koniq.random_split(frame, 0.3, 0.1, seed=3)
    c = koniq.random_split(frame, 0.3, 0.1, seed=4)
    assert a.sizes() == {"train": 63, "val": 7, "test": 30}
    assert list(a.test.image_name) == list(b.test.image_name)
    assert set(a.test.image_name) != set(c.test.image_name)
    parts = [set(p.image_name) for p in (a.train, a.val, a.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == set(frame.image_name)


def test_random_split_is_the_same_on_any_machine(tmp_path):
    # PCG64 on sorted keys: this exact selection is what every machine must produce.
    frame = koniq.read_labels(write_csv(tmp_path / "k.csv", download_file_rows(10)))
    split = koniq.random_split(frame, 0.2, 0.0, seed=0)
    order = np.array(sorted(frame.image_name))[np.random.default_rng(0).permutation(10)]
    assert sorted(split.test.image_name) == sorted(order[:2])


def test_random_split_keeps_a_source_photo_on_one_side(tmp_path):
    rows = download_file_rows(60)
    for i, row in enumerate(rows):
        row["source_image"] = f"photo{i // 6}"
    frame = koniq.read_labels(write_csv(tmp_path / "k.csv", rows))
    split = koniq.random_split(frame, 0.3, 0.2, seed=1)
    sides = [set(p.source_image) for p in (split.train, split.val, split.test)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert len(split.test) == 18  # 3 of 10 photos, 6 crops each


def test_repeated_splits_differ_and_official_carves_validation(tmp_path, koniq_csv):
    frame = koniq.read_labels(write_csv(tmp_path / "k.csv", download_file_rows(50)))
    config = TrainConfig(split="repeated", repeats=3, test_fraction=0.2)
    splits = koniq.make_splits(frame, config)
    assert [s.name for s in splits] == ["repeat0-seed0", "repeat1-seed1", "repeat2-seed2"]
    assert len({tuple(sorted(s.test.image_name)) for s in splits}) == 3

    real = koniq.read_labels(koniq_csv)
    no_val = real[real["set"] != "val"].reset_index(drop=True)
    split = koniq.make_splits(no_val, TrainConfig(val_fraction=0.1))[0]
    assert len(split.val) == round(7058 * 0.1) and len(split.test) == 2015


def test_image_names_that_escape_the_root_are_refused(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.jpg").write_bytes(b"x")
    (tmp_path / "secret.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "secret.jpg", root / "link.jpg")
    os.symlink("/dev/zero", root / "zero.jpg")
    (root / "dir.jpg").mkdir()
    assert koniq.resolve_image_path(root, "ok.jpg") == (root / "ok.jpg").resolve()
    for name, words in [
        ("/etc/passwd", "absolute"),
        ("../secret.jpg", r"'\.\.'"),
        ("sub/../../secret.jpg", r"'\.\.'"),
        ("link.jpg", "outside the image folder"),
        ("zero.jpg", "outside the image folder"),
        ("missing.jpg", "not found"),
        ("dir.jpg", "not a regular file"),
    ]:
        with pytest.raises(DataError, match=words):
            koniq.resolve_image_path(root, name)


def test_check_image_names_reports_all_problems_together(tmp_path):
    root = tmp_path
    (root / "a.jpg").write_bytes(b"x")
    frame = pd.DataFrame({"image_name": ["a.jpg", "b.jpg", "../c.jpg", "/abs.jpg"], "mos": [1, 2, 3, 4]})
    paths, problems = koniq.check_image_names(frame, root)
    assert paths[0] is not None and paths[1:] == [None, None, None]
    assert [name for name, _ in problems] == ["b.jpg", "../c.jpg", "/abs.jpg"]


def test_default_image_root_finds_koniq_folders(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("x")
    assert koniq.default_image_root(labels) == tmp_path.resolve()
    (tmp_path / "1024x768").mkdir()
    assert koniq.default_image_root(labels) == (tmp_path / "1024x768").resolve()


def test_duplicate_names_resolve_to_one_file_and_keep_the_first_label(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "x.jpg").write_bytes(b"x")
    (root / "sub" / "y.jpg").write_bytes(b"y")
    os.symlink(root / "x.jpg", root / "link.jpg")
    names = ["x.jpg", "./x.jpg", "sub//y.jpg", "link.jpg", "sub/./y.jpg", "sub\\y.jpg", "x.jpg"]
    frame = pd.DataFrame({"image_name": names, "mos": range(len(names)), "line": range(2, 2 + len(names))})
    paths, problems = koniq.check_image_names(frame, root)
    assert paths[0] == str((root / "x.jpg").resolve()) and paths[2] == str((root / "sub" / "y.jpg").resolve())
    assert [p is None for p in paths] == [False, True, False, True, True, True, True]
    reasons = dict(problems)
    assert "same file as 'x.jpg' (line 2)" in reasons["./x.jpg"] and "first row's label is kept" in reasons["link.jpg"]
    assert "same file as 'sub//y.jpg' (line 4)" in reasons["sub\\y.jpg"]
    assert koniq.normalise_name("./a//b/./c.jpg") == "a/b/c.jpg"


def test_links_pipes_and_loops_in_the_image_folder_are_named_rejects(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    os.symlink(root / "loop-b.jpg", root / "loop-a.jpg")
    os.symlink(root / "loop-a.jpg", root / "loop-b.jpg")
    os.symlink(root / "self.jpg", root / "self.jpg")
    os.symlink(root / "gone.jpg", root / "dangling.jpg")
    (root / "folder").mkdir()
    os.symlink(root / "folder", root / "dirlink.jpg")
    os.mkfifo(root / "pipe.jpg")
    os.symlink("/dev/null", root / "null.jpg")
    expected = {
        "loop-a.jpg": "symbolic link loop", "self.jpg": "symbolic link loop",
        "dangling.jpg": "dangling symbolic link", "dirlink.jpg": "is a folder, not a regular file",
        "pipe.jpg": "named pipe", "null.jpg": "outside the image folder",
    }
    frame = pd.DataFrame({"image_name": list(expected), "mos": range(len(expected))})
    paths, problems = koniq.check_image_names(frame, root)
    assert paths == [None] * len(expected)
    for name, reason in problems:
        assert expected[name] in reason, (name, reason)


def test_non_utf8_bytes_in_a_label_file(tmp_path):
    # In image_name: a file name's bytes (a Latin-1 name names the Latin-1 file).
    path = tmp_path / "latin.csv"
    path.write_bytes(b"image_name,MOS_zscore\ncaf\xe9.jpg,50\nplain.jpg,60\n")
    frame = koniq.read_labels(path)
    assert os.fsencode(frame.image_name[0]) == b"caf\xe9.jpg" and frame.image_name[1] == "plain.jpg"
    # Anywhere else: refused with the line, the bytes and the fix.
    other = tmp_path / "other.csv"
    other.write_bytes(b"image_name,MOS_zscore,source_image,note\na.jpg,50,a,ok\nb.jpg,60,b,gr\xfcn\n")
    with pytest.raises(DataError, match=r"column 'note' .* line\(s\) \[3\] \(line 3: b'gr\\xfcn'\).*re-save it as UTF-8"):
        koniq.read_labels(other)
    header = tmp_path / "header.csv"
    header.write_bytes(b"image_name,MOS_zscore,d\xe9j\xe0\na.jpg,50,1\n")
    with pytest.raises(DataError, match="line 1 .*not UTF-8"):
        koniq.read_labels(header)
