"""Tests for kiqa.scoring (files, batches, table) and `kiqa score`: folders, bad files, resuming, batching, CLI."""

import csv
import json
import dataclasses
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from kiqa.cli import score as score_cli
from kiqa.cli._common import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL
from kiqa.errors import DataError, ScoresFromAnotherModelError
from kiqa.scoring.scorer import load_scorer
from kiqa.contract import CSV_COLUMNS
from kiqa.scoring.files import find_images, is_link_outside
from kiqa.scoring.table import read_scores, score_paths

import helpers

SIZE = helpers.EXPORT_SIZE
GOOD = ["a.jpg", "b.JPEG", "c.png", "nested/d.jpg", "nested/deeper/e.webp", "nested/f.bmp", "g.gif"]


def make_tiny_run(run_dir):
    """A run directory with a tiny-backbone model whose scores differ by points between images."""
    helpers.make_tiny_run(run_dir, seed=1, head_scale=50.0)
    return run_dir


def write_images(folder, names, seed=0):
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        # Smooth gradients plus noise: different content per image, so scores differ.
        y, x = np.mgrid[0:40 + i, 0:60]
        base = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1) % 256
        pixels = np.clip(base + rng.normal(0, 20 * (i + 1), base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("score") / "run")


@pytest.fixture(scope="module")
def scorer(run_dir):
    return load_scorer(run_dir)


@pytest.fixture
def photos(tmp_path):
    """A folder of good images plus every kind of file that must become an error row."""
    root = tmp_path / "photos"
    write_images(root, GOOD)
    good = (root / "a.jpg").read_bytes()
    (root / "corrupt.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    (root / "readme.txt").write_text("not an image extension: not listed")
    outside = tmp_path / "outside"
    write_images(outside, ["secret.jpg"])
    os.symlink(outside / "secret.jpg", root / "link-out.jpg")
    os.symlink(outside, root / "link-dir")
    os.symlink(root / "a.jpg", root / "nested" / "link-in.jpg")
    os.mkfifo(root / "pipe.png")
    return root


BAD = {
    "corrupt.jpg": "corrupt or truncated",
    "empty.png": "empty (0 bytes)",
    "notes.jpg": "format not recognised",
    "link-out.jpg": "symbolic link to a file outside",
    "link-dir": "symbolic link to a folder outside",
    "pipe.png": "not a regular file",
}


def read_csv(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == CSV_COLUMNS
    return rows[1:]


def relative(rows, root):
    return {os.path.relpath(row[0], root): row for row in rows}


def test_find_images_lists_sorted_image_files_and_flags_links(photos):
    files = find_images([photos])
    names = [os.path.relpath(path, photos) for path, _ in files]
    assert names == sorted(names)
    errors = {name: error for name, (_, error) in zip(names, files)}
    expected_ok = set(GOOD) | {"nested/link-in.jpg", "corrupt.jpg", "empty.png", "notes.jpg", "pipe.png"}
    assert {name for name, error in errors.items() if error is None} == expected_ok
    assert set(errors) == expected_ok | {"link-out.jpg", "link-dir"}
    # The row carries the fact; `kiqa score` names its flag (test_cli_exit_codes_and_summary).
    assert "outside" in errors["link-out.jpg"] and "--follow-links" not in errors["link-out.jpg"]
    assert is_link_outside(errors["link-out.jpg"]) and is_link_outside(errors["link-dir"])
    # Following links leaves no error and reaches the file inside the linked folder.
    followed = dict(find_images([photos], follow_links_outside=True))
    assert followed[str(photos / "link-out.jpg")] is None
    assert followed[str(photos / "link-dir" / "secret.jpg")] is None
    # A file named directly is taken whatever its extension; repeats are listed once.
    assert find_images([photos / "readme.txt", photos / "a.jpg", photos / "a.jpg"]) == [
        (str(photos / "readme.txt"), None), (str(photos / "a.jpg"), None)
    ]
    # Issue 20.8: a missing path is listed like any file, and its row says why (as in score_many).
    assert find_images([photos / "a.jpg", photos / "missing"]) == [
        (str(photos / "a.jpg"), None), (str(photos / "missing"), None)
    ]


def test_every_bad_file_is_a_named_row_and_the_job_goes_on(photos, scorer, tmp_path):
    out = tmp_path / "out" / "scores.csv"
    summary = score_paths([photos], scorer, out, batch_size=3, progress=False)
    rows = relative(read_csv(out), photos)
    assert set(rows) == set(GOOD) | {"nested/link-in.jpg"} | set(BAD)
    for name, reason in BAD.items():
        assert rows[name][1] == "" and reason in rows[name][2], (name, rows[name])
    scores = np.array([float(rows[name][1]) for name in GOOD])
    assert np.all(np.isfinite(scores)) and np.all((scores >= 0) & (scores <= 100))
    assert all(rows[name][2] == "" for name in GOOD)
    assert rows["nested/link-in.jpg"][1] == rows["a.jpg"][1]  # a link inside is the same image
    assert len(np.unique(scores)) > 1  # different images, different scores
    assert (summary.n_files, summary.n_scored, summary.n_failed, summary.n_skipped) == (14, 8, 6, 0)
    ok = [float(row[1]) for row in rows.values() if row[1]]
    assert summary.mean_mos == pytest.approx(np.mean(ok))
    assert summary.median_mos == pytest.approx(np.median(ok))
    assert {os.path.relpath(path, photos) for path, _ in summary.failures} == set(BAD)


def test_byte_and_pixel_caps_give_error_rows(photos, scorer, tmp_path):
    files = [photos / "a.jpg", photos / "c.png"]
    small = (photos / "a.jpg").stat().st_size
    assert (photos / "c.png").stat().st_size > small  # noisy PNG is larger than the JPEG
    summary = score_paths(files, scorer, tmp_path / "bytes.csv", max_bytes=small, progress=False)
    rows = relative(read_csv(tmp_path / "bytes.csv"), photos)
    assert rows["a.jpg"][1] != "" and "over the" in rows["c.png"][2] and "byte cap" in rows["c.png"][2]
    assert summary.n_failed == 1
    capped = dataclasses.replace(scorer, max_pixels=1000)  # the images are 60x40+ = 2400+ pixels
    summary = score_paths(files, capped, tmp_path / "pixels.csv", progress=False)
    rows = relative(read_csv(tmp_path / "pixels.csv"), photos)
    assert summary.n_failed == 2 and all("over the cap of 1000" in row[2] for row in rows.values())


class SpyScorer:
    """Wraps a scorer; records batch sizes and how many rows the CSV held at each call."""

    def __init__(self, scorer, out_csv):
        self.scorer, self.out_csv, self.calls = scorer, out_csv, []
        self.image_size, self.max_pixels = scorer.image_size, scorer.max_pixels

    def predict_pixels(self, batch):
        self.calls.append((len(batch), len(read_csv(self.out_csv))))
        return self.scorer.predict_pixels(batch)


def test_rows_are_written_batch_by_batch(tmp_path, scorer):
    folder = tmp_path / "many"
    write_images(folder, [f"{i:02d}.png" for i in range(7)])
    out = tmp_path / "many.csv"
    spy = SpyScorer(scorer, out)
    score_paths([folder], spy, out, batch_size=3, progress=False)
    # Never more than batch_size images in memory; earlier batches already on disk.
    assert spy.calls == [(3, 0), (3, 3), (1, 6)]
    assert len(read_csv(out)) == 7


def test_interrupted_job_resumes_without_duplicates(photos, scorer, tmp_path):
    reference = tmp_path / "reference.csv"
    score_paths([photos], scorer, reference, progress=False)
    complete = read_csv(reference)

    # What a kill leaves: the header, some flushed rows and half of the next line.
    out = tmp_path / "resumed.csv"
    kept = [list(row) for row in complete[:4]]
    kept[0][1] = "12.3456"  # a marker: a row kept from the earlier run is not rescored
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(kept)
        handle.write(f"{complete[4][0]},58.1")  # no newline: cut mid-row
    # The job wrote its model's record before its first row.
    shutil.copy(tmp_path / "reference.csv.provenance.json", tmp_path / "resumed.csv.provenance.json")
    summary = score_paths([photos], scorer, out, progress=False)

    rows = read_csv(out)
    paths = [row[0] for row in rows]
    assert len(paths) == len(set(paths)) == len(complete)
    assert set(paths) == {row[0] for row in complete}
    assert summary.n_skipped == 4 and summary.n_files == len(complete)
    by_path = {row[0]: row for row in rows}
    assert by_path[kept[0][0]][1] == "12.3456"
    for row in complete[1:]:
        assert by_path[row[0]][1:] == row[1:]  # the rest, including the cut row, scored afresh

    # A second rerun has nothing left to do; --no-skip starts over.
    again = score_paths([photos], scorer, out, progress=False)
    assert again.n_skipped == len(complete) and len(read_csv(out)) == len(complete)
    fresh = score_paths([photos], scorer, out, skip_existing=False, progress=False)
    assert fresh.n_skipped == 0
    assert {row[0]: row[1:] for row in read_csv(out)} == {row[0]: row[1:] for row in complete}


def test_resume_refuses_a_file_that_is_not_a_scores_csv(photos, scorer, tmp_path):
    other = tmp_path / "labels.csv"
    other.write_text("image_name,MOS\nx.jpg,50\n")
    with pytest.raises(DataError, match="labels.csv exists but is not a kiqa scores CSV") as raised:
        score_paths([photos / "a.jpg"], scorer, other, progress=False)
    assert raised.value.path == str(other) and "--no-skip" not in str(raised.value)
    assert other.read_text() == "image_name,MOS\nx.jpg,50\n"  # left untouched


def test_cli_names_the_flags_for_an_output_that_is_not_a_scores_csv(photos, run_dir, tmp_path, capsys):
    other = tmp_path / "labels.csv"
    other.write_text("image_name,MOS\nx.jpg,50\n")
    assert score_cli.main([str(photos / "a.jpg"), "--model", str(run_dir), "--out", str(other), "--quiet"]) == EXIT_ERROR
    assert "not a kiqa scores CSV" in (err := capsys.readouterr().err) and "choose another --out" in err
    assert other.read_text() == "image_name,MOS\nx.jpg,50\n"


def test_folder_without_images_is_an_error(tmp_path, scorer):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        score_paths([tmp_path / "docs"], scorer, tmp_path / "s.csv", progress=False)


def test_the_20_real_photos_score_in_range(realset, scorer, tmp_path):
    summary = score_paths([realset / "images"], scorer, tmp_path / "real.csv", progress=False)
    scores = read_scores(tmp_path / "real.csv")
    assert summary.n_files == len(scores) == 20
    assert summary.n_failed == 0, summary.failures
    values = np.array([mos for mos, _ in scores.values()])
    assert np.all(np.isfinite(values)) and np.all((values >= 0) & (values <= 100))


def test_cli_exit_codes_and_summary(photos, run_dir, tmp_path, capsys):
    out = tmp_path / "cli.csv"
    code = score_cli.main([str(photos), "--model", str(run_dir), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == EXIT_PARTIAL
    assert "14 files: 8 scored, 6 failed" in captured.out and "mean" in captured.out
    assert "notes.jpg: image format not recognised" in captured.err
    # The rows carry the fact; the CLI names its flag once.
    assert "2 symbolic link(s) point outside the given paths" in captured.err
    assert captured.err.count("--follow-links") == 1
    assert len(read_csv(out)) == 14

    clean = tmp_path / "clean"
    write_images(clean, ["x.png", "y.jpg"])
    code = score_cli.main([str(clean), "--model", str(run_dir), "--out", str(tmp_path / "clean.csv"),
                           "--quiet", "--batch-size", "1"])
    assert code == EXIT_OK
    assert "2 files: 2 scored, 0 failed" in capsys.readouterr().out
    # A mistyped path is a row with its error and exit code 3, as any file that cannot be used,
    # with the same text as Scorer.score_many gives it.
    missing = tmp_path / "clean" / "z.jpg"
    code = score_cli.main([str(clean), str(missing), "--model", str(run_dir), "--out",
                           str(tmp_path / "typo.csv"), "--quiet"])
    assert code == EXIT_PARTIAL and "3 files: 2 scored, 1 failed" in capsys.readouterr().out
    (row,) = [r for r in read_csv(tmp_path / "typo.csv") if r[0] == str(missing)]
    assert row[2] == load_scorer(run_dir).score_many([missing])["error"][0] and "No such file" in row[2]

    code = score_cli.main([str(clean), "--model", str(tmp_path / "nope"), "--quiet"])
    assert code == EXIT_ERROR
    assert "nope does not exist" in capsys.readouterr().err


def test_keras_model_and_its_savedmodel_export_score_alike(photos, tmp_path_factory, tmp_path):
    run_dir, base = helpers.shared_export(tmp_path_factory, head_scale=300.0)  # a run and its export
    keras_summary = score_paths([photos], load_scorer(run_dir), tmp_path / "keras.csv", progress=False)
    saved = load_scorer(base)
    assert saved.kind == "savedmodel" and saved.image_size == SIZE
    saved_summary = score_paths([photos], saved, tmp_path / "saved.csv", progress=False)
    keras_scores = read_scores(tmp_path / "keras.csv")
    saved_scores = read_scores(tmp_path / "saved.csv")
    assert keras_scores.keys() == saved_scores.keys()
    assert keras_summary.n_scored == saved_summary.n_scored == 8
    for path, (mos, error) in keras_scores.items():
        other, other_error = saved_scores[path]
        if mos is None:
            assert other is None and other_error == error
        else:
            assert other == pytest.approx(mos, abs=2e-3), path


def test_copied_images_keep_their_score(photos, scorer, tmp_path):
    # The same bytes under another name score the same (no state carried between batches).
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(photos / "c.png", copy / "c.png")
    first = score_paths([photos / "c.png"], scorer, tmp_path / "1.csv", progress=False)
    second = score_paths([copy], scorer, tmp_path / "2.csv", batch_size=1, progress=False)
    assert first.mean_mos == second.mean_mos


# ----------------------------------------------------------------------------- hostile names

HOSTILE_NAMES = [
    b"caf\xe9 latin-1.png",  # an old camera's Latin-1 name: not valid UTF-8
    b"\xff\xfe.jpg",
    "with space, comma.png".encode(),
    'quote "double" and \'single\'.png'.encode(),
    "new\nline.png".encode(),
    b"-leading-dash.png",
    ("x" * 240 + ".png").encode(),
    "e\u0301-nfd.png".encode(),  # the same text as the next one, other bytes
    "\u00e9-nfc.png".encode(),
]


def test_unusual_file_names_are_scored_and_round_trip_through_the_csv(run_dir, tmp_path, capsys):
    import os as _os

    folder = tmp_path / "names"
    folder.mkdir()
    write_images(folder, ["template.png"])
    data = (folder / "template.png").read_bytes()
    (folder / "template.png").unlink()
    for raw in HOSTILE_NAMES:
        with open(_os.fsencode(folder) + b"/" + raw, "wb") as handle:
            handle.write(data)
    with open(_os.fsencode(folder) + b"/broken \xe9.jpg", "wb") as handle:
        handle.write(b"\xff\xd8\xff\xe0 broken")  # a failure row with such a name too
    (folder / "photo.avif").write_bytes(b"\x00\x00\x00\x1cftypavif" + b"\x00" * 64)
    (folder / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    _os.symlink(folder / "loop-b.jpg", folder / "loop-a.jpg")
    _os.symlink(folder / "loop-a.jpg", folder / "loop-b.jpg")
    _os.symlink(folder / "gone.jpg", folder / "dangling.jpg")
    out = tmp_path / "names.csv"
    code = score_cli.main([str(folder), "--model", str(run_dir), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == EXIT_PARTIAL
    total = len(HOSTILE_NAMES) + 6
    assert f"{total} files: {len(HOSTILE_NAMES)} scored, 6 failed" in captured.out
    assert "broken \\xe9.jpg" in captured.err  # shown escaped, not as raw bytes
    rows = read_scores(out)
    by_bytes = {_os.fsencode(path): value for path, value in rows.items()}
    for raw in HOSTILE_NAMES:
        mos, error = by_bytes[_os.fsencode(folder) + b"/" + raw]
        assert error == "" and 0 <= mos <= 100, raw
    assert len({mos for mos, _ in rows.values() if mos is not None}) == 1  # the same image everywhere
    avif = rows[str(folder / "photo.avif")]
    assert avif[0] is None and "AVIF images are not supported" in avif[1] and "convert it" in avif[1]
    assert "HEIC images are not supported" in rows[str(folder / "photo.heic")][1]
    assert rows[str(folder / "loop-a.jpg")][1].startswith("symbolic link loop")
    assert rows[str(folder / "dangling.jpg")][1].startswith("dangling symbolic link")
    # The CSV holds the names' own bytes, so every path names its file again.
    for path in rows:
        assert _os.path.lexists(path), path
    # A rerun skips every row, including the non-UTF-8 ones.
    again = score_paths([folder], load_scorer(run_dir), out, progress=False)
    assert again.n_skipped == total and len(read_csv_bytes(out)) == total + 1


def read_csv_bytes(path):
    from kiqa.fsutil import CSV_TEXT

    with open(path, **CSV_TEXT) as handle:
        return list(csv.reader(handle))


def test_prefetched_batches_keep_order_pass_errors_and_bound_what_is_held():
    import threading

    from kiqa.scoring.batches import _prefetched_batches

    held, peak, lock = [0], [0], threading.Lock()

    def load(path):
        with lock:
            held[0] += 1
            peak[0] = max(peak[0], held[0])
        return (f"pixels of {path}", None) if path != "bad" else (None, "cannot decode")

    todo = [(f"f{i}", None) for i in range(23)] + [("bad", None), ("listed", "not a regular file")]
    seen = []
    for batch in _prefetched_batches(todo, 4, load, threads=2, ahead=2):
        assert len(batch) <= 4
        with lock:
            held[0] -= len([item for item in batch if item[0] != "listed"])
        seen.extend(batch)
    assert [item[0] for item in seen] == [path for path, _ in todo]
    assert seen[0] == ["f0", "pixels of f0", None]
    assert seen[-2] == ["bad", None, "cannot decode"] and seen[-1] == ["listed", None, "not a regular file"]
    assert peak[0] <= 3 * 4  # at most (ahead + 1) batches decoded and not yet consumed


def test_resume_refuses_a_csv_from_other_weights_but_accepts_an_export_of_the_same_run(tmp_path_factory, tmp_path, capsys):
    # Issue 20.1: rows of two models in one CSV read as one model's scores.
    photos = tmp_path / "photos"
    write_images(photos, ["a.jpg", "b.png"])
    first, base = helpers.shared_export(tmp_path_factory, head_scale=300.0)  # a run and its export
    second = tmp_path / "second"
    helpers.make_tiny_run(second, seed=2, head_scale=300.0)
    out = tmp_path / "scores.csv"
    score_paths([photos / "a.jpg"], load_scorer(first), out, progress=False)
    assert out.read_bytes().count(b"\n") == 2 and b"\r" not in out.read_bytes()  # issue 20.8: no CRLF
    sidecar = json.loads((tmp_path / "scores.csv.provenance.json").read_text())
    assert len(sidecar["weights_sha256"]) == 64 and sidecar["image_size"] == list(SIZE)

    # An export of the same run is the same model: resumed by the weights' fingerprint, not the path.
    summary = score_paths([photos], load_scorer(base), out, progress=False)
    assert summary.n_skipped == 1 and summary.n_scored == 2

    # Other weights, or another image size: refused, both models named, the CSV untouched.
    before = out.read_bytes()
    with pytest.raises(ScoresFromAnotherModelError) as refused:
        score_paths([photos], load_scorer(second), out, progress=False)
    assert str(first / "model.keras") in str(refused.value) or str(base) in str(refused.value)
    assert str(second / "model.keras") in str(refused.value)
    with pytest.raises(ScoresFromAnotherModelError):
        score_paths([photos], load_scorer(first, image_size=(40, 56)), out, progress=False)
    assert out.read_bytes() == before

    # The CLI names its flags; --no-skip replaces the CSV with the new model's rows only.
    code = score_cli.main([str(photos), "--model", str(second), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR and "another --out" in err and "--no-skip" in err
    code = score_cli.main([str(photos), "--model", str(second), "--out", str(out), "--quiet", "--no-skip"])
    assert code == EXIT_OK and "2 files: 2 scored" in capsys.readouterr().out
