"""Tests for kiqa.beam: the Beam pipeline gives `kiqa score`'s rows, on a real Beam engine.

The main run uses Beam's DirectRunner in multi_processing mode with 2 worker processes
(real SDK workers over gRPC, shuffles between them) once per module, over real photos,
bad files and 200 generated images; the assertions share it.
"""

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

try:
    import apache_beam  # noqa: F401
except ImportError:
    pytest.skip("apache_beam is not installed (pip install -e '.[beam]')", allow_module_level=True)

from apache_beam.options.pipeline_options import PipelineOptions

from kiqa.beam import handler as beam_handler
from kiqa.beam.pipeline import BeamScoreJob, existing_outputs, score_with_beam
from kiqa.cli import score_beam as score_beam_cli
from kiqa.cli._common import EXIT_ERROR, EXIT_PARTIAL
from kiqa.errors import DataError, ModelError
from kiqa.scoring.scorer import load_scorer
from kiqa.contract import CSV_COLUMNS
from kiqa.scoring.table import read_scores, score_paths

import helpers

MULTI_PROCESS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
IN_MEMORY = ["--direct_running_mode=in_memory"]
NON_UTF8_NAME = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8
BAD_FILES = {  # name -> a phrase of the error kiqa score gives it
    "truncated.jpg": "corrupt or truncated",
    "notes.jpg": "format not recognised",
    "empty.jpg": "empty (0 bytes)",
    "scan.tif": "TIFF",
}
N_GENERATED = 200


def write_pngs(folder, count, seed=0, size=16):
    """`count` small PNGs of random content (different scores), named 00000.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:05d}.png")
    return folder


def read_beam_csv(prefix):
    """{path: [(mos, error), ...]} over every CSV shard, and the shards' raw bytes."""
    rows, raw = {}, []
    for shard in sorted(Path(prefix).parent.glob(Path(prefix).name + "-*-of-*.csv")):
        raw.append(shard.read_bytes())
        with open(shard, encoding="utf-8", errors="surrogateescape", newline="") as handle:
            reader = csv.reader(handle)
            assert tuple(next(reader)) == CSV_COLUMNS
            for path, mos, error in reader:
                rows.setdefault(path, []).append((float(mos) if mos else None, error))
    return rows, raw


def run_cli(args):
    return score_beam_cli.main([str(arg) for arg in args])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("beam") / "run"
    # head_scale: scores differ by points between images, so a mix-up of rows shows.
    helpers.make_tiny_run(run, seed=1, head_scale=50.0)
    return run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, realset):
    """Real photos plus bad files, 200 generated PNGs, and a CSV list of paths."""
    root = tmp_path_factory.mktemp("beam-corpus")
    photos = root / "photos"
    shutil.copytree(realset / "images", photos)
    first_jpeg = sorted(photos.glob("*.jpg"))[0].read_bytes()
    (photos / "truncated.jpg").write_bytes(first_jpeg[: len(first_jpeg) // 3])
    (photos / "notes.jpg").write_text("a text file, not a JPEG\n")
    (photos / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (20, 10), (120, 30, 200)).save(photos / "scan.tif")
    Image.new("RGB", (20, 10), (10, 200, 30)).save(os.path.join(os.fsencode(photos), os.fsencode(NON_UTF8_NAME)))
    (photos / "readme.txt").write_text("no image extension: not listed, as in kiqa score")
    generated = write_pngs(root / "generated", N_GENERATED)
    listed_only = write_pngs(root / "listed", 3, seed=7)
    # The list names files of no input (scored once) and two photos the folder input
    # also reaches (still scored once).
    listed = sorted(str(p) for p in listed_only.iterdir()) + sorted(str(p) for p in photos.glob("*.jpg"))[:2]
    input_list = root / "list.csv"
    with open(input_list, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "note"])
        writer.writerows([path, "x"] for path in listed)
    return dict(root=root, photos=photos, generated=generated, list=input_list,
                listed_only=sorted(listed_only.iterdir()))


@pytest.fixture(scope="module")
def beam_run(corpus, run_dir):
    """One multi-process DirectRunner run through the CLI: (exit code, output prefix)."""
    prefix = corpus["root"] / "out" / "scores"
    code = run_cli(["--input", corpus["photos"], "--input", str(corpus["generated"]) + "/*.png",
                    "--input-list", corpus["list"], "--model", run_dir, "--output", prefix,
                    *MULTI_PROCESS])
    return code, prefix


@pytest.fixture(scope="module")
def kiqa_score_rows(corpus, run_dir):
    """kiqa score's rows for the same files and model."""
    out = corpus["root"] / "kiqa-score.csv"
    paths = [corpus["photos"], corpus["generated"], *corpus["listed_only"]]
    score_paths(paths, load_scorer(run_dir), out, progress=False)
    return read_scores(out)


def test_rows_equal_kiqa_score(beam_run, kiqa_score_rows):
    code, prefix = beam_run
    assert code == EXIT_PARTIAL  # some files failed, as kiqa score's exit code says
    rows, _ = read_beam_csv(prefix)
    assert set(rows) == set(kiqa_score_rows)
    assert {path: len(found) for path, found in rows.items() if len(found) != 1} == {}
    for path, [(mos, error)] in rows.items():
        expected_mos, expected_error = kiqa_score_rows[path]
        assert error == expected_error, path
        if expected_mos is None:
            assert mos is None, path
        else:
            assert mos == pytest.approx(expected_mos, abs=1e-4), path
    scored = [found[0][0] for found in rows.values() if found[0][0] is not None]
    assert len(scored) == len(rows) - len(BAD_FILES)
    assert np.ptp(scored) > 1.0  # scores differ between images, so a row mix-up would show


def test_bad_files_are_rows_with_kiqa_score_error_text(beam_run, corpus):
    rows, _ = read_beam_csv(beam_run[1])
    photos = str(corpus["photos"])
    for name, phrase in BAD_FILES.items():
        [(mos, error)] = rows[os.path.join(photos, name)]
        assert mos is None and phrase in error, (name, error)
    [(mos, error)] = rows[os.path.join(photos, NON_UTF8_NAME)]
    assert mos is not None and error == ""
    assert os.path.join(photos, "readme.txt") not in rows


def test_csv_shards_have_one_header_each(beam_run):
    _, raw = read_beam_csv(beam_run[1])
    assert len(raw) >= 1
    for shard in raw:
        # kiqa score's line ends ("\n", kiqa.fsutil.csv_line) since the one CSV line writer.
        assert shard.startswith(b"path,mos,error\n")
        assert shard.count(b"path,mos,error") == 1
        assert shard.endswith(b"\n") and not shard.endswith(b"\r\n")


def test_parquet_holds_the_same_rows(beam_run):
    import pyarrow.parquet as pq

    prefix = beam_run[1]
    rows, _ = read_beam_csv(prefix)
    shards = sorted(prefix.parent.glob(prefix.name + "-*-of-*.parquet"))
    table = pq.ParquetDataset([str(s) for s in shards]).read().to_pylist()
    assert len(table) == len(rows)
    by_path = {row["path"]: row for row in table}
    for path, [(mos, error)] in rows.items():
        text = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        assert by_path[text]["error"] == error
        assert (by_path[text]["mos"] is None) == (mos is None)
        if mos is not None:
            assert by_path[text]["mos"] == pytest.approx(mos, abs=1e-9)


def test_summary_has_counts_and_the_model(beam_run, run_dir):
    prefix = beam_run[1]
    rows, _ = read_beam_csv(prefix)
    summary = json.loads(Path(str(prefix) + "-summary.json").read_text())
    assert summary["n_files"] == len(rows)
    assert summary["n_failed"] == len(BAD_FILES)
    assert summary["n_scored"] == len(rows) - len(BAD_FILES)
    scored = [found[0][0] for found in rows.values() if found[0][0] is not None]
    assert summary["mean_mos"] == pytest.approx(np.mean(scored), abs=1e-3)
    model = summary["model"]
    assert model["kind"] == "keras" and model["source"] == str(run_dir / "model.keras")
    assert model["image_size"] == list(helpers.EXPORT_SIZE)


def test_rerun_into_the_same_prefix_is_refused(beam_run, corpus, run_dir, capsys):
    prefix = beam_run[1]
    before = {path: os.stat(path).st_mtime_ns for path in existing_outputs(str(prefix))}
    code = run_cli(["--input", corpus["photos"], "--model", run_dir, "--output", prefix, *IN_MEMORY])
    assert code == EXIT_ERROR
    assert "already holds the results of a run" in capsys.readouterr().err
    assert {path: os.stat(path).st_mtime_ns for path in existing_outputs(str(prefix))} == before


def test_overwrite_replaces_every_old_shard(tmp_path, corpus, base):
    """Also the SavedModel path: a base path is pinned to its version, scores equal kiqa score's."""
    prefix = tmp_path / "out" / "part"
    prefix.parent.mkdir()
    for shard in range(3):  # an earlier run with more shards than this one writes
        Path(f"{prefix}-0000{shard}-of-00003.csv").write_text("path,mos,error\r\nold.jpg,1.0,\r\n")
    images = corpus["listed_only"]
    job = BeamScoreJob(inputs=tuple(map(str, images)), model=str(base), output=str(prefix),
                       formats=("csv",), num_shards=1)
    with pytest.raises(DataError, match="already holds"):
        score_with_beam(job, PipelineOptions(IN_MEMORY))
    summary = score_with_beam(dataclasses.replace(job, overwrite=True), PipelineOptions(IN_MEMORY))
    assert [Path(p).name for p in existing_outputs(str(prefix))] == ["part-00000-of-00001.csv", "part-summary.json"]
    assert summary["model"]["version"] == 1 and summary["model"]["signature"] == "score_pixels"
    assert summary["model"]["source"] == str(base / "1")
    rows, _ = read_beam_csv(prefix)
    score_paths(images, load_scorer(base), tmp_path / "ref.csv", progress=False)
    expected = read_scores(tmp_path / "ref.csv")
    assert set(rows) == set(expected)
    for path, [(mos, _)] in rows.items():
        assert mos == pytest.approx(expected[path][0], abs=1e-4)


def test_pattern_matching_nothing_is_a_clear_error(tmp_path, run_dir, capsys):
    (tmp_path / "photos").mkdir()
    pattern = str(tmp_path / "photos" / "*.jpg")
    job = BeamScoreJob(inputs=(pattern,), model=str(run_dir), output=str(tmp_path / "out"))
    with pytest.raises(DataError, match="matches no files"):
        score_with_beam(job, PipelineOptions(IN_MEMORY))
    code = run_cli(["--input", tmp_path / "missing-folder", "--model", run_dir,
                    "--output", tmp_path / "out", *IN_MEMORY])
    assert code == EXIT_ERROR
    err = capsys.readouterr().err
    assert "missing-folder" in err and "matches no files" in err
    assert not list(tmp_path.glob("out*"))


def test_handler_batches_within_the_signature_limit():
    limit = beam_handler.SIGNATURE_BATCH_LIMIT
    handler = beam_handler.KiqaModelHandler("model")
    assert handler.batch_elements_kwargs() == {"min_batch_size": limit, "max_batch_size": limit}
    assert not handler.share_model_across_processes()  # one copy per process (shared.Shared)
    assert beam_handler.KiqaModelHandler("model", large_model=True).share_model_across_processes()
    with pytest.raises(ModelError, match="outside 1"):
        beam_handler.KiqaModelHandler("model", batch_size=limit + 1)


def test_local_copy_copies_a_tree_and_a_file(tmp_path):
    source = tmp_path / "export" / "3"
    (source / "variables").mkdir(parents=True)
    (source / "saved_model.pb").write_bytes(b"graph")
    (source / "variables" / "variables.index").write_bytes(b"index")
    (tmp_path / "into").mkdir()
    copied = Path(beam_handler.local_copy(str(source), str(tmp_path / "into")))
    assert copied == tmp_path / "into" / "3"
    assert sorted(str(p.relative_to(copied)) for p in copied.rglob("*") if p.is_file()) == [
        "saved_model.pb", "variables/variables.index"]
    assert (copied / "variables" / "variables.index").read_bytes() == b"index"
    (tmp_path / "into2").mkdir()
    one = beam_handler.local_copy(str(source / "saved_model.pb"), str(tmp_path / "into2"))
    assert Path(one).read_bytes() == b"graph"
    with pytest.raises(ModelError, match="not found"):
        beam_handler.local_copy(str(tmp_path / "nothing"), str(tmp_path / "into2"))


@pytest.mark.large
def test_a_thousand_small_images_complete(tmp_path, run_dir):
    images = write_pngs(tmp_path / "many", 1000, seed=3)
    prefix = tmp_path / "out" / "scores"
    code = run_cli(["--input", images, "--model", run_dir, "--output", prefix, *MULTI_PROCESS])
    assert code == 0
    rows, _ = read_beam_csv(prefix)
    assert sorted(rows) == sorted(str(p) for p in images.iterdir())
    assert all(len(found) == 1 and found[0][0] is not None for found in rows.values())


# ------------------------------------------------------------------- a distribution model


@pytest.fixture(scope="module")
def distribution_run_dir(tmp_path_factory):
    """An untrained distribution-head model (mos, mos_sd, dist): the rows' columns are what
    is tested, so no training (tests/test_distribution.py trains one for what it learns)."""
    run = tmp_path_factory.mktemp("beam-distribution") / "run"
    helpers.make_tiny_run(run, seed=2, head_scale=3000.0, head="distribution")
    return run


def test_a_distribution_model_writes_its_columns(distribution_run_dir, corpus, tmp_path):
    import pyarrow.parquet as pq

    from kiqa.contract import DISTRIBUTION_COLUMNS, DISTRIBUTION_CSV_COLUMNS

    photos = sorted(corpus["photos"].glob("koniq_*_512.jpg"))[:3]
    files = [*photos, *corpus["listed_only"], corpus["photos"] / "notes.jpg"]
    prefix = tmp_path / "out" / "scores"
    job = BeamScoreJob(inputs=tuple(map(str, files)), model=str(distribution_run_dir), output=str(prefix),
                       num_shards=1)
    summary = score_with_beam(job, PipelineOptions(IN_MEMORY))
    assert summary["columns"] == list(DISTRIBUTION_CSV_COLUMNS)
    assert (summary["n_scored"], summary["n_failed"]) == (len(files) - 1, 1)
    # The CSV shard holds kiqa score's lines for the same model and files, byte for byte.
    score_paths(files, load_scorer(distribution_run_dir), tmp_path / "ref.csv", progress=False)
    expected = (tmp_path / "ref.csv").read_bytes().splitlines(keepends=True)
    written = Path(f"{prefix}-00000-of-00001.csv").read_bytes().splitlines(keepends=True)
    assert written[0] == expected[0] == b",".join(c.encode() for c in DISTRIBUTION_CSV_COLUMNS) + b"\n"
    assert sorted(written[1:]) == sorted(expected[1:])
    table = pd.read_csv(tmp_path / "ref.csv").set_index("path")
    assert table.loc[:, "mos_sd"].dropna().nunique() > 1  # values differ between images: a mix-up would show
    # Parquet: the same columns, float scores (None for the failed file).
    records = pq.read_table(f"{prefix}-00000-of-00001.parquet")
    assert records.column_names == list(DISTRIBUTION_CSV_COLUMNS)
    for record in records.to_pylist():
        row = table.loc[record["path"]]
        if isinstance(row["error"], str):
            assert all(record[column] is None for column in ("mos", *DISTRIBUTION_COLUMNS))
            continue
        for column in ("mos", *DISTRIBUTION_COLUMNS):
            assert record[column] == pytest.approx(row[column], abs=1e-4), column


def test_a_regression_summary_names_its_columns(beam_run):
    summary = json.loads(Path(str(beam_run[1]) + "-summary.json").read_text())
    assert summary["columns"] == list(CSV_COLUMNS)
