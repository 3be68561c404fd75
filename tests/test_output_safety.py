"""Issue 24: kiqa never changes a file it did not write, ordinary faults are named errors,
CSVs are safe to open in a spreadsheet on request, downloads have a deadline."""

import csv
import errno
import http.server
import io
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

from kiqa.cli import score as score_cli
from kiqa.cli._common import EXIT_ERROR, EXIT_TERMINATED, entry_point
from kiqa.data import fetch
from kiqa.errors import (
    DataError, DiskFullError, DownloadDeadlineError, ImageError, NotScoresCsvError, OutputError,
    OutputIsInputError, OutputLockedError,
)
from kiqa.fsutil import SPREADSHEET_SAFE_ENV, csv_cell, csv_value, output_lock
from kiqa.contract import CSV_COLUMNS
from kiqa.scoring.table import score_paths

# The tiny run and its scorer, shared with the scoring tests.
from test_score import run_dir, scorer  # noqa: F401  (pytest fixtures)

# Names a spreadsheet would run as formulas (CSV injection), one per dangerous first character.
FORMULA_NAMES = ["=1+1.jpg", "+cmd.png", "-2+3.jpg", "@SUM(A1).png", "\tlead.jpg", "\rcr.jpg"]


def write_photo(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    for i, name in enumerate(["a.jpg", "b.png", "nested/c.jpg"]):
        write_photo(root / name, seed=i)
    return root


def cli(run_dir, *args):
    return score_cli.main([*map(str, args), "--model", str(run_dir), "--quiet"])


# --- 1. data loss: outputs that are inputs or not kiqa's ---------------------------------

def non_kiqa_files(folder):
    """Files kiqa must never cut or replace: text without a final newline, a CSV of someone
    else's, binary data, a header-only prefix of ours without a newline."""
    files = {
        "notes.txt": b"line one\nline two without newline",
        "labels.csv": b"image_name,MOS\nx.jpg,50\n",
        "blob.bin": bytes(range(256)) * 4,
        "almost.csv": b"path,mos,err",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {folder / name: data for name, data in files.items()}


@pytest.mark.parametrize("skip", [True, False])
def test_an_input_image_as_out_is_refused_and_left_untouched(photos, scorer, skip):
    for target in (photos / "a.jpg", photos / "nested" / "c.jpg"):
        before = target.read_bytes()
        with pytest.raises(OutputIsInputError, match="is one of the input images") as raised:
            score_paths([photos], scorer, target, skip_existing=skip, progress=False)
        assert raised.value.path == str(target)
        assert target.read_bytes() == before


def test_a_hard_link_to_an_input_is_refused_too(photos, scorer, tmp_path):
    link = tmp_path / "out.csv"
    os.link(photos / "b.png", link)
    before = link.read_bytes()
    with pytest.raises(OutputIsInputError):
        score_paths([photos], scorer, link, progress=False)
    assert link.read_bytes() == before


@pytest.mark.parametrize("skip", [True, False])
def test_a_file_kiqa_did_not_write_is_never_cut_or_replaced(photos, scorer, tmp_path, skip):
    for path, data in non_kiqa_files(tmp_path).items():
        with pytest.raises(NotScoresCsvError, match="not a kiqa scores CSV"):
            score_paths([photos / "a.jpg"], scorer, path, skip_existing=skip, progress=False)
        assert path.read_bytes() == data, path


def test_cli_refuses_input_and_foreign_outputs_naming_the_path(photos, run_dir, tmp_path, capsys):
    target = photos / "a.jpg"
    before = target.read_bytes()
    for extra in ([], ["--no-skip"]):
        assert cli(run_dir, photos, "--out", target, *extra) == EXIT_ERROR
        err = capsys.readouterr().err
        assert str(target) in err and "--out" in err and "Traceback" not in err
    assert target.read_bytes() == before
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"no newline at the end")
    assert cli(run_dir, target, "--out", notes, "--no-skip") == EXIT_ERROR
    assert "not a kiqa scores CSV" in capsys.readouterr().err
    assert notes.read_bytes() == b"no newline at the end"


def test_a_kiqa_csv_with_a_half_line_is_still_repaired(photos, scorer, tmp_path):
    out = tmp_path / "scores.csv"
    score_paths([photos / "a.jpg"], scorer, out, progress=False)
    with open(out, "ab") as handle:
        handle.write(b"photos/half-writ")
    summary = score_paths([photos], scorer, out, progress=False)
    assert summary.n_skipped == 1 and summary.n_files == 3
    assert b"half-writ" not in out.read_bytes()


def test_empty_output_file_is_taken(photos, scorer, tmp_path):
    out = tmp_path / "empty.csv"
    out.write_bytes(b"")
    assert score_paths([photos / "a.jpg"], scorer, out, progress=False).n_scored == 1


def test_fetch_never_removes_a_folder_for_an_archive_file_of_its_name(tmp_path):
    out = tmp_path / "koniq"
    (out / "images").mkdir(parents=True)
    (out / "images" / "mine.txt").write_text("my own notes")
    (out / "labels.csv").write_text("a file of mine")
    for members in ({"images": b"a file named like the folder", "ok.txt": b"x"},
                    {"labels.csv/inner.jpg": b"a folder named like the file"}):
        archive = tmp_path / "a.zip"
        with zipfile.ZipFile(archive, "w") as zipped:
            for name, data in members.items():
                zipped.writestr(name, data)
        with pytest.raises(DataError, match="left untouched"):
            fetch.extract_archive(archive, out, progress=False)
        assert (out / "images" / "mine.txt").read_text() == "my own notes"
        assert (out / "labels.csv").read_text() == "a file of mine"
        assert not (out / "ok.txt").exists()  # nothing moved before the clash was found


# --- 7c. two processes into one --out -----------------------------------------------------

def test_a_second_writer_of_the_same_out_is_refused_naming_the_pid(photos, scorer, tmp_path):
    out = tmp_path / "scores.csv"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from kiqa.fsutil import output_lock\n"
         "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(30)", str(out)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError, match=f"pid {holder.pid}") as raised:
            score_paths([photos], scorer, out, progress=False)
        assert raised.value.pid == holder.pid
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait(10)
    # The kernel dropped the dead holder's lock: the next job runs.
    assert score_paths([photos], scorer, out, progress=False).n_scored == 3
    assert not (tmp_path / "scores.csv.lock").exists()


def test_a_foreign_lock_file_is_left_untouched(tmp_path):
    lock = tmp_path / "scores.csv.lock"
    lock.write_text("my notes")
    with pytest.raises(OutputLockedError, match="not a kiqa lock file"):
        with output_lock(tmp_path / "scores.csv"):
            pass
    assert lock.read_text() == "my notes"


# --- 5. ordinary faults --------------------------------------------------------------------

def test_dev_full_is_a_named_disk_full_error(photos, scorer, run_dir, capsys):
    with pytest.raises(DiskFullError, match="/dev/full"):
        score_paths([photos], scorer, "/dev/full", progress=False)
    assert cli(run_dir, photos, "--out", "/dev/full") == EXIT_ERROR
    err = capsys.readouterr().err
    assert "/dev/full" in err and "no space" in err.lower() and "Traceback" not in err


def test_unwritable_output_folder_is_a_named_error(photos, scorer, run_dir, capsys):
    # /sys refuses writes even to root (tests here run as root, which chmod does not stop).
    with pytest.raises(OutputError, match="/sys/kiqa-scores.csv"):
        score_paths([photos], scorer, "/sys/kiqa-scores.csv", progress=False)
    assert cli(run_dir, photos, "--out", "/sys/kiqa-scores.csv") == EXIT_ERROR
    assert "/sys/kiqa-scores.csv" in (err := capsys.readouterr().err) and "Traceback" not in err
    os.mkfifo(photos.parent / "pipe.csv")  # opening it to write would block forever
    for target in (photos.parent / "pipe.csv", photos / "nested"):
        with pytest.raises(OutputError, match="not a file"):
            score_paths([photos], scorer, target, progress=False)


def test_disk_full_mid_job_keeps_the_rows_and_says_so(photos, scorer, tmp_path, monkeypatch, capsys, run_dir):
    out = tmp_path / "scores.csv"
    import kiqa.scoring.table as score_lib

    real = score_lib.scored_batches

    def fill_after_first(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            yield batch

    monkeypatch.setattr(score_lib, "scored_batches", fill_after_first)
    with pytest.raises(DiskFullError, match="1 rows written before are kept"):
        score_paths([photos], scorer, out, batch_size=1, progress=False)
    assert len(out.read_text().splitlines()) == 2  # header + the first batch
    assert cli(run_dir, photos, "--out", out, "--batch-size", "1") == EXIT_ERROR
    err = capsys.readouterr().err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    monkeypatch.setattr(score_lib, "scored_batches", real)
    # The CLI run resumed and kept one more row before the same failure.
    assert score_paths([photos], scorer, out, progress=False).n_skipped == 2


def test_read_only_home_without_kiqa_home_names_kiqa_home(monkeypatch, tmp_path, capsys):
    from kiqa.cli import train as train_cli
    from kiqa.data import synthetic

    monkeypatch.delenv("KIQA_HOME", raising=False)
    monkeypatch.setenv("HOME", "/sys/no-home")
    with pytest.raises(OutputError, match="KIQA_HOME"):
        synthetic.demo_dataset()
    code = train_cli.main(["--weights", "none", "--backbone", "small-cnn", "--run-dir", str(tmp_path / "run")])
    assert code == EXIT_ERROR
    err = capsys.readouterr().err
    assert "KIQA_HOME" in err and "/sys/no-home" in err and "Traceback" not in err


def test_an_os_error_reaching_a_command_is_one_line_with_the_path(capsys):
    @entry_point
    def main(argv=None, prog=None):
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/out/x.csv")

    assert main([], prog="kiqa score") == EXIT_ERROR
    err = capsys.readouterr().err
    assert "/srv/out/x.csv: Permission denied" in err and "writable" in err and "resume" in err


def test_sigterm_says_it_stopped_and_how_to_resume(capsys):
    for prog in ("kiqa score", "kiqa-train", "kiqa train", "kiqa compare", "kiqa fetch-koniq"):
        @entry_point
        def main(argv=None, prog=None):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
            return 0

        before = signal.getsignal(signal.SIGTERM)
        assert main([], prog=prog) == EXIT_TERMINATED
        err = capsys.readouterr().err
        assert "stopped by SIGTERM" in err and "rerun the same command to resume" in err
        assert signal.getsignal(signal.SIGTERM) is before


# --- 7d. empty paths -----------------------------------------------------------------------

def test_empty_path_is_named_in_the_api_and_the_cli(scorer, run_dir, capsys):
    with pytest.raises(ImageError, match="empty path"):
        scorer.score("")
    frame = scorer.score_many(["", b"not an image"])
    assert "empty path" in frame["error"][0]
    with pytest.raises(DataError, match="empty path"):
        score_paths([""], scorer, "unused.csv", progress=False)
    assert cli(run_dir, "", "--out", "unused.csv") == EXIT_ERROR
    assert "empty path" in capsys.readouterr().err and not os.path.exists("unused.csv")


# --- 6. CSV formula injection ----------------------------------------------------------------

def test_csv_cell_escapes_only_on_request_and_round_trips(monkeypatch):
    monkeypatch.delenv(SPREADSHEET_SAFE_ENV, raising=False)
    assert [csv_cell(n) for n in FORMULA_NAMES] == FORMULA_NAMES
    monkeypatch.setenv(SPREADSHEET_SAFE_ENV, "1")
    for name in FORMULA_NAMES + ["'quoted.jpg", "''x"]:
        assert csv_cell(name) == "'" + name and csv_value(csv_cell(name)) == name
    for name in ["photos/=x.jpg", "a.jpg", "'plain"[1:]]:
        assert csv_cell(name) == name
    assert csv_cell(-3.5) == -3.5


@pytest.fixture
def formula_folder(tmp_path, monkeypatch):
    folder = tmp_path / "evil"
    for i, name in enumerate(FORMULA_NAMES):
        write_photo(folder / name, seed=i)
    monkeypatch.chdir(folder)  # relative paths: the names are the cells' first characters
    return folder


def first_cells(path, column=0):
    with open(path, newline="", encoding="utf-8") as handle:
        return [row[column] for row in list(csv.reader(handle))[1:]]


def test_scores_csv_is_exact_by_default_and_spreadsheet_safe_on_request(formula_folder, scorer, monkeypatch):
    monkeypatch.delenv(SPREADSHEET_SAFE_ENV, raising=False)
    score_paths(["."], scorer, "exact.csv", progress=False)
    assert sorted(first_cells("exact.csv")) == sorted(FORMULA_NAMES)
    monkeypatch.setenv(SPREADSHEET_SAFE_ENV, "1")
    summary = score_paths(["."], scorer, "safe.csv", progress=False)
    cells = first_cells("safe.csv")
    assert all(cell.startswith("'") for cell in cells) and len(cells) == len(FORMULA_NAMES)
    # The rerun reads the escaped names back as the files' real names: nothing is rescored.
    again = score_paths(["."], scorer, "safe.csv", progress=False)
    assert again.n_skipped == summary.n_files == len(FORMULA_NAMES)


# --- 7b. fetch-koniq against a server that trickles bytes ---------------------------------------

@pytest.fixture
def trickle_server():
    """A loopback server announcing 1000 bytes and sending one every 0.2 s (at most 100)."""
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(100):
                if stop.wait(0.2):
                    return
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    stop.set()
    httpd.shutdown()
    httpd.server_close()


def test_a_trickling_server_meets_the_overall_deadline(trickle_server, tmp_path):
    dest = tmp_path / "koniq10k_1024x768.zip"
    start = time.monotonic()
    with pytest.raises(DownloadDeadlineError, match="deadline of 1 s") as raised:
        fetch.download(trickle_server + dest.name, dest, progress=False, timeout=5.0, retries=3, deadline=1.0)
    assert time.monotonic() - start < 3.0  # the per-read timeout (5 s) never fired
    kept = (tmp_path / (dest.name + ".part")).stat().st_size
    assert 0 < kept < 1000 and raised.value.received == kept and not dest.exists()


def test_fetch_koniq_cli_passes_the_deadline(trickle_server, tmp_path, capsys):
    from kiqa.cli import fetch as fetch_cli

    code = fetch_cli.main([str(tmp_path / "koniq"), "--base-url", trickle_server, "--no-split-file",
                           "--quiet", "--deadline-hours", str(1 / 3600)])
    assert code == EXIT_ERROR
    err = capsys.readouterr().err
    assert "deadline" in err and "resume" in err and "Traceback" not in err


# pandas writes a lone carriage return unquoted (its line ending is "\n"), so a reader splits
# that row: the pandas-written CSVs are checked with the other names.
PANDAS_NAMES = [name for name in FORMULA_NAMES if "\r" not in name]


def test_every_csv_writer_escapes_formula_names_on_request(formula_folder, scorer, monkeypatch, tmp_path):
    import pandas as pd

    from kiqa.scoring.compare import compare_folders
    from kiqa.config import TrainConfig
    from kiqa.evaluate import evaluate_frame
    from kiqa.fsutil import write_csv_atomically

    other = tmp_path / "other"
    for i, name in enumerate(FORMULA_NAMES):
        write_photo(other / name, seed=10 + i)
    monkeypatch.setenv(SPREADSHEET_SAFE_ENV, "1")
    result = compare_folders([str(formula_folder), str(other)], scorer, tmp_path / "cmp", progress=False,
                             n_resamples=10)
    for key in ("scores-evil", "scores-other"):
        cells = first_cells(result.files[key])
        assert len(cells) == len(FORMULA_NAMES) and all(c.startswith(str(tmp_path)) for c in cells), key
    assert result.n_common == len(FORMULA_NAMES)  # the escaped names paired as the same files
    per_image = set(first_cells(result.files["per_image"]))
    assert {"'" + n for n in PANDAS_NAMES} <= per_image and not per_image & set(PANDAS_NAMES)
    # evaluate's predictions.csv, and training's rejects/split CSVs (write_csv_atomically).
    frame = pd.DataFrame({"image_name": PANDAS_NAMES, "mos": 50.0,
                          "path": [str(formula_folder / n) for n in PANDAS_NAMES]})
    config = TrainConfig.demo(weights="none", image_size=(32, 48))
    evaluate_frame(scorer, frame, config, out_dir=tmp_path / "eval")
    assert first_cells(tmp_path / "eval" / "predictions.csv") == ["'" + n for n in PANDAS_NAMES]
    write_csv_atomically(pd.DataFrame({"image_name": PANDAS_NAMES, "reason": "-bad"}), tmp_path / "rejects.csv")
    assert first_cells(tmp_path / "rejects.csv", 1) == ["'-bad"] * len(PANDAS_NAMES)
    monkeypatch.delenv(SPREADSHEET_SAFE_ENV)
    write_csv_atomically(pd.DataFrame({"image_name": PANDAS_NAMES}), tmp_path / "split.csv")
    assert first_cells(tmp_path / "split.csv") == PANDAS_NAMES  # exact by default


def test_predict_refuses_an_input_as_out_and_escapes_on_request(server, formula_folder, monkeypatch, capsys):
    from kiqa.cli import predict as predict_cli

    target = formula_folder / FORMULA_NAMES[0]
    before = target.read_bytes()
    assert predict_cli.main([".", "--server", server.address, "--out", str(target)]) == EXIT_ERROR
    assert str(target) in capsys.readouterr().err and target.read_bytes() == before
    monkeypatch.setenv(SPREADSHEET_SAFE_ENV, "1")
    assert predict_cli.main([".", "--server", server.address, "--out", "predict.csv"]) == 0
    assert sorted(first_cells("predict.csv")) == sorted("'" + n for n in FORMULA_NAMES)


def test_sigterm_stops_a_real_kiqa_score_which_then_resumes(run_dir, scorer, tmp_path):
    folder = tmp_path / "many"
    for i in range(40):
        write_photo(folder / f"{i:02d}.png", seed=i)
    out = tmp_path / "scores.csv"
    job = subprocess.Popen(
        [sys.executable, "-m", "kiqa.cli.score", str(folder), "--model", str(run_dir), "--out", str(out),
         "--batch-size", "1", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        # Bounded wait for two rows (start-up takes from 10 s to minutes on a loaded machine).
        deadline, started = time.monotonic() + 300, False
        while time.monotonic() < deadline and job.poll() is None and not started:
            started = out.exists() and len(out.read_bytes().splitlines()) >= 3
            time.sleep(0.1)
        job.send_signal(signal.SIGTERM)
        _, err = job.communicate(timeout=60)
    finally:
        job.kill()
    if job.returncode == 0 or (job.returncode == -signal.SIGTERM and out.exists()
                               and len(out.read_bytes().splitlines()) == 1 + len(list(folder.iterdir()))):
        pytest.skip("the job finished (or was exiting) before SIGTERM reached it")
    assert job.returncode == EXIT_TERMINATED, err
    assert "stopped by SIGTERM" in err and "rerun the same command to resume" in err and "Traceback" not in err
    assert not (tmp_path / "scores.csv.lock").exists()
    if not started:
        pytest.skip("no rows within 300 s: SIGTERM stopped the start-up (message checked above)")
    kept = len(out.read_bytes().splitlines()) - 1
    assert kept >= 2
    summary = score_paths([folder], scorer, out, progress=False)
    assert summary.n_skipped >= kept - 1 and summary.n_files == 40  # a half last line is cut and rescored


def test_compare_and_evaluate_never_write_over_files_they_did_not_make(photos, scorer, tmp_path):
    import pandas as pd

    from kiqa.scoring.compare import compare_folders
    from kiqa.config import TrainConfig
    from kiqa.evaluate import evaluate_frame

    other = tmp_path / "other"
    for i, name in enumerate(["a.jpg", "b.png", "nested/c.jpg"]):
        write_photo(other / name, seed=20 + i)
    names = ["a.jpg", "b.png", "nested/c.jpg"]
    frame = pd.DataFrame({"image_name": names, "mos": [40.0, 60.0, 50.0], "path": [str(photos / n) for n in names]})
    config = TrainConfig.demo(weights="none", image_size=(32, 48))
    for name in ("per_image.csv", "compare.png", "model.json"):
        mine = tmp_path / f"cmp-{name}"
        mine.mkdir()
        (mine / name).write_text("my own file")
        for skip in (True, False):
            with pytest.raises(OutputIsInputError, match=name):
                compare_folders([str(photos), str(other)], scorer, mine, progress=False, n_resamples=10,
                                skip_existing=skip)
        assert (mine / name).read_text() == "my own file" and sorted(os.listdir(mine)) == [name]
    for name in ("predictions.csv", "metrics.json", "scatter.png"):
        mine = tmp_path / f"eval-{name}"
        mine.mkdir()
        (mine / name).write_text("my own file")
        with pytest.raises(OutputIsInputError, match=name):
            evaluate_frame(scorer, frame, config, out_dir=mine)
        assert (mine / name).read_text() == "my own file" and sorted(os.listdir(mine)) == [name]
    # kiqa's own folders are reused: a rerun into the same folders works.
    result = compare_folders([str(photos), str(other)], scorer, tmp_path / "cmp", progress=False, n_resamples=10)
    assert compare_folders([str(photos), str(other)], scorer, tmp_path / "cmp", progress=False,
                           n_resamples=10).n_common == result.n_common == 3
    evaluate_frame(scorer, frame, config, out_dir=tmp_path / "eval")
    evaluate_frame(scorer, frame, config, out_dir=tmp_path / "eval")


def test_beam_csv_rows_and_path_lists_use_the_same_cell_rule(monkeypatch):
    pipeline = pytest.importorskip("kiqa.beam.pipeline", reason="needs apache_beam (kiqa[beam])")
    monkeypatch.setenv(SPREADSHEET_SAFE_ENV, "1")
    for name in FORMULA_NAMES[:5]:
        line = pipeline._csv_line((name.encode(), 50.0, b"", []))  # a row: path, mos, error, extras
        cells = next(csv.reader(io.StringIO(line.decode())))
        assert cells[0] == "'" + name
        assert pipeline._list_entry(line, 0) == [pipeline._bytes(pipeline._normalise(name.strip()))]


def test_train_overwrite_never_removes_a_folder_that_is_not_a_run(tmp_path, capsys):
    from kiqa.cli import train as train_cli

    photos = tmp_path / "photos"
    write_photo(photos / "holiday.jpg")
    (tmp_path / "notes.txt").write_text("mine")
    for target in (photos, tmp_path / "notes.txt"):
        code = train_cli.main(["--run-dir", str(target), "--overwrite", "--weights", "none",
                               "--backbone", "small-cnn", "--epochs", "1"])
        assert code == EXIT_ERROR
        err = capsys.readouterr().err
        assert "not a kiqa run folder" in err and str(target) in err
    assert (photos / "holiday.jpg").is_file() and (tmp_path / "notes.txt").read_text() == "mine"
