"""Every hostile file of issue 8 through every path that meets user files.

The files and the table of expected outcomes are in tests/hostile_corpus.py. Each path
must decode a file correctly (the same pixels as its reference image) or reject it with
a message that names the file and matches the table's reason. No path may hang: every
call here is bounded by a timeout.

Crashes and memory are checked out of process (`hostile_corpus.probe` in a subprocess):
a crash then fails a test instead of killing pytest, a hang is ended by the subprocess
timeout, and memory is measured from a clean process (TF keeps freed memory for reuse,
so a long test session can hide an allocation). The peak resident set while every
hostile file goes through every path must stay under MAX_GROWTH_MB above the resident
set after warm-up (the 20000x20000 PNG alone would take 1.2 GB if it were decoded).
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_service_pb2_grpc

from helpers import EXPORT_SIZE, demo_subset, shared_export
import hostile_corpus
from hostile_corpus import DECODER_REASONS, HUGE_PNG_SIZE, check_png_is_complete, huge_png, write_corpus
from kiqa.cli import predict as predict_cli
from kiqa.cli import score as score_cli
from kiqa.cli._common import EXIT_PARTIAL
from kiqa.config import TrainConfig
from kiqa.data import koniq
from kiqa.data.pipeline import make_dataset
from kiqa.data.validate import find_bad_images
from kiqa.serving.devserver import DevServer
from kiqa.image import decode_image, describe_decode_error, read_image_bytes
from kiqa.scoring.scorer import load_scorer
from kiqa.model import small_cnn
from kiqa.scoring.table import read_scores, score_paths
from kiqa.train import train

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MAX_GROWTH_MB = 200
# Seconds any one call may take before the test calls it a hang (CPU is shared and busy).
CALL_TIMEOUT = 180


# ----------------------------------------------------------------------------- helpers


def bounded(function, *args, timeout=CALL_TIMEOUT, **kwargs):
    """Runs `function` in a thread; a call still running after `timeout` fails the test
    (a hang is reported instead of blocking the run). Returns its result or re-raises."""
    outcome = {}

    def run():
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as err:  # handed back to the test thread below
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"{getattr(function, '__name__', function)} did not return within {timeout} s (hang)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def reference_pixels(corpus, case):
    return decode_image((corpus.references / case.reference).read_bytes(), EXPORT_SIZE).numpy()


def assert_message(text, case, path, raw=False):
    """`raw`: a gRPC status as the server sends it, which (as from TF Serving) carries
    TF's node annotation `[[{{node ...}}]]`; the client strips it."""
    outcome = case.expected(path)
    assert not outcome.decoded, f"{case.name} should have decoded on the {path} path, got {text!r}"
    reason = outcome.reason
    if path == "serving" and reason in DECODER_REASONS:
        # A graph cannot capture the decoder's own message: the signatures name the format.
        reason = f"(?:{reason})|(?:decoder refused its data)"
    assert re.search(reason, text, re.I), (
        f"{path}: {case.name}: expected a reason matching /{outcome.reason}/, got {text!r}"
    )
    assert "Graph execution error" not in text
    if not raw:
        assert "[[" not in text and "{{" not in text  # no TF graph traces for users


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(run directory, export base path) of the tiny model shared with the export tests."""
    return shared_export(tmp_path_factory)


@pytest.fixture(scope="module")
def config():
    return TrainConfig.demo(weights="none", image_size=EXPORT_SIZE, cache="none", batch_size=8)


@pytest.fixture(scope="module")
def validated(corpus, config):
    """The training path's pre-validation pass over the corpus label file."""
    frame = koniq.read_labels(corpus.labels)
    paths, rejects = bounded(find_bad_images, frame, corpus.images, config, progress=False)
    return frame, paths, rejects


@pytest.fixture(scope="module")
def scored(corpus, exported, tmp_path_factory):
    """`kiqa score` over the corpus folder: (exit code, rows by file name)."""
    run_dir, _ = exported
    out = tmp_path_factory.mktemp("scores") / "scores.csv"
    code = bounded(score_cli.main, [str(corpus.images), "--model", str(run_dir), "--out", str(out), "--quiet"])
    rows = {Path(path).name: (mos, error) for path, (mos, error) in read_scores(out).items()}
    return code, rows


@pytest.fixture(scope="module")
def server(exported):
    with DevServer(exported[1], port=0) as running:
        yield running


# ----------------------------------------------------------------------------- the corpus


def test_the_corpus_is_the_issue_list(corpus):
    kinds = " | ".join(c.kind for c in corpus.cases).lower()
    for word in ("zero-byte", "cut in half", "corrupt jpeg", "text file", "tiff", "cmyk", "16-bit",
                 "greyscale", "animated gif", "webp", "announcing 30000x30000", "20000x20000",
                 "/dev/zero", "outside the folder", "'../'", "absolute path", "exif orientation",
                 "frame bomb", "local colour tables", "last frame truncated", "zero frames", "animated webp",
                 "animated png", "header claims 7999x7999", "text bomb", "scan bomb", "comment segments"):
        assert word in kinds, f"the corpus has no {word!r} case:\n{corpus.table()}"
    assert (corpus.images / "zero.jpg").resolve() == Path("/dev/zero")
    assert not (corpus.images / "link-out.png").resolve().is_relative_to(corpus.images.resolve())
    assert (corpus.images / "claims-30000.jpg").stat().st_size < 1000
    assert (corpus.images / "huge.png").stat().st_size < 2_000_000
    assert (corpus.root / "escape.png").is_file()  # '../escape.png' names a real file
    listed = pd.read_csv(corpus.labels).image_name.tolist()
    assert listed == [c.name for c in corpus.cases]


def test_the_huge_png_builder_makes_real_pngs(tmp_path):
    # The same builder at 1000x700 decodes in TF and Pillow to black pixels of that size,
    # so the 20000x20000 one is a real image, not just a header (checked in full, 1.2 GB
    # inflated in pieces, by the large test below).
    from PIL import Image

    small = tmp_path / "small.png"
    small.write_bytes(huge_png(1000, 700))
    pixels = tf.io.decode_png(small.read_bytes()).numpy()
    assert pixels.shape == (700, 1000, 3) and pixels.max() == 0
    with Image.open(small) as image:
        image.load()
        assert image.size == (1000, 700) and image.mode == "RGB"
    assert check_png_is_complete(small) == (1000, 700, 700 * (1 + 3 * 1000))


@pytest.mark.large
def test_the_20000_pixel_png_inflates_to_1_2_gb(corpus):
    width, height = HUGE_PNG_SIZE
    assert check_png_is_complete(corpus.images / "huge.png") == (width, height, height * (1 + 3 * width))


# ----------------------------------------------------------------------------- training


def test_training_prevalidation_rejects_each_file_by_name_and_reason(corpus, validated):
    frame, paths, rejects = validated
    reasons = dict(zip(rejects.image_name, rejects.reason))
    for case, path in zip(corpus.cases, paths):
        if case.training.decoded:
            assert path is not None and case.name not in reasons, f"{case.name}: {reasons.get(case.name)}"
        else:
            assert path is None and case.name in reasons, f"{case.name} was not rejected"
            assert_message(reasons[case.name], case, "training")
    assert len(rejects) == sum(not c.training.decoded for c in corpus.cases)


def test_training_pipeline_decodes_the_kept_files_correctly(corpus, validated, config):
    frame, paths, _ = validated
    kept = [(case, path) for case, path in zip(corpus.cases, paths) if path is not None]
    dataset = make_dataset([p for _, p in kept], np.zeros(len(kept)), config, training=False, with_index=True)
    images = {}
    for features, _ in bounded(list, dataset):
        images.update(zip(features["index"].numpy().tolist(), features["image"].numpy()))
    assert sorted(images) == list(range(len(kept)))
    for index, (case, _) in enumerate(kept):
        image = images[index]
        assert image.shape == (*EXPORT_SIZE, 3) and 0 <= image.min() and image.max() <= 255
        if case.reference:
            difference = np.abs(image - reference_pixels(corpus, case)).mean()
            assert difference <= case.tolerance, f"{case.name}: {difference:.2f} levels from its reference"


def test_training_pipeline_safety_net_drops_hostile_files_without_validation(corpus, config):
    # Files that go bad after the pre-validation pass must not abort model.fit. Links are
    # left out: only pre-validation keeps tf.io.read_file away from /dev/zero.
    files = [c for c in corpus.files() if c.sends_bytes]
    dataset = make_dataset([str(corpus.images / c.name) for c in files], np.zeros(len(files)), config,
                           training=False, with_index=True)
    batches = bounded(list, dataset)
    kept = sorted(i for features, _ in batches for i in features["index"].numpy().tolist())
    assert [files[i].name for i in kept] == [c.name for c in files if c.training.decoded]


def test_a_training_run_goes_on_without_the_rejected_files_and_lists_them(corpus, tmp_path):
    # The corpus next to demo photos in one image folder (links copied as links).
    images = tmp_path / "images"
    shutil.copytree(corpus.images, images, symlinks=True)
    demo_csv = demo_subset(tmp_path, per_source=2)
    demo = pd.read_csv(demo_csv)
    for name in demo.image_name:
        shutil.copy(demo_csv.parent / "images" / name, images / name)
    hostile = pd.read_csv(corpus.labels)
    (tmp_path / "escape.png").write_bytes((corpus.root / "escape.png").read_bytes())
    labels = tmp_path / "labels.csv"
    pd.concat([demo[["image_name", "MOS_zscore"]], hostile]).to_csv(labels, index=False)
    config = TrainConfig.demo(
        labels=str(labels), images=str(images), run_dir=str(tmp_path / "run"), weights="none",
        image_size=(32, 32), batch_size=8, epochs=1, patience=1, cache="none", max_bad_fraction=0.5,
    )
    result = bounded(train, config, backbone=small_cnn((8,)), progress=False)

    rejects = pd.read_csv(result.run_dir / "rejects.csv")
    expected = [c for c in corpus.cases if not c.training.decoded]
    assert sorted(rejects.image_name) == sorted(c.name for c in expected)
    for case in expected:
        assert_message(rejects.loc[rejects.image_name == case.name, "reason"].iat[0], case, "training")
    split = pd.read_csv(result.run_dir / "split.csv")
    assert set(split.image_name) == set(demo.image_name) | {c.name for c in corpus.cases if c.training.decoded}
    assert result.metrics["n"] == (split.part == "test").sum() > 0  # trained and evaluated
    assert (result.run_dir / "model.keras").is_file()


# ----------------------------------------------------------------------------- kiqa score


def test_kiqa_score_gives_every_file_a_row_with_its_outcome(corpus, scored):
    code, rows = scored
    assert code == EXIT_PARTIAL
    files = corpus.files()
    assert sorted(rows) == sorted(c.name for c in files)
    for case in files:
        mos, error = rows[case.name]
        if case.score.decoded:
            assert error == "" and 0 <= mos <= 100, f"{case.name}: {error}"
        else:
            assert mos is None
            assert_message(error, case, "score")


def test_kiqa_score_decodes_like_training(corpus, exported, scored):
    # A score is the model applied to decode_image's pixels of the file: the same
    # pixels the training pipeline produced above (checked against the references).
    _, rows = scored
    scorer = load_scorer(exported[0])
    for case in corpus.files():
        if case.score.decoded:
            pixels = decode_image((corpus.images / case.name).read_bytes(), EXPORT_SIZE)[None]
            assert rows[case.name][0] == pytest.approx(float(scorer.predict_pixels(pixels)[0]), abs=1e-3)


def test_score_many_decides_every_file_like_kiqa_score(corpus, exported, scored):
    # The Python API: a row per file, the same score or the same reason.
    _, rows = scored
    files = [c for c in corpus.files() if c.sends_bytes]
    table = bounded(load_scorer(exported[0]).score_many, [corpus.images / c.name for c in files], batch_size=4)
    for case, (_, row) in zip(files, table.iterrows()):
        assert row["path"] == str(corpus.images / case.name)
        if case.score.decoded:
            assert row["error"] is None and row["mos"] == pytest.approx(rows[case.name][0], abs=1e-3), case.name
        else:
            assert np.isnan(row["mos"])
            assert_message(row["error"], case, "score")


def test_a_link_to_dev_zero_named_directly_is_refused_before_reading(corpus, exported, tmp_path):
    # A path given on the command line is taken as given, link or not; /dev/zero is then
    # refused because it is not a regular file (tf.io.read_file would read it forever).
    summary = bounded(score_paths, [corpus.images / "zero.jpg"], load_scorer(exported[0]), tmp_path / "z.csv",
                      progress=False)
    assert summary.n_failed == 1 and "not a regular file" in summary.failures[0][1]


def test_tiff_files_in_a_folder_are_listed_not_skipped(corpus, scored):
    # Skipping them would report a folder as fully scored with files missing.
    _, rows = scored
    assert re.search(r"TIFF.*convert it", rows["scan.tiff"][1])


# ----------------------------------------------------------------------------- serving


def _predict_raw(stub, contents):
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="kiqa"))
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(contents, dtype=tf.string, shape=[len(contents)]))
    try:
        response = stub.Predict(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, tf.make_ndarray(response.outputs["mos"])


def test_bytes_signature_answers_each_file_or_invalid_argument(corpus, server, scored):
    _, rows = scored
    with grpc.insecure_channel(server.address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        good = read_image_bytes(corpus.images / "good.jpg")
        _predict_raw(stub, [good])  # first call of the signature
        for case in corpus.files():
            if not case.sends_bytes:
                continue
            contents = read_image_bytes(corpus.images / case.name)
            code, answer = bounded(_predict_raw, stub, [good, contents])
            if case.serving.decoded:
                assert code == grpc.StatusCode.OK, f"{case.name}: {answer}"
                assert answer[1] == pytest.approx(rows[case.name][0], abs=1e-3)  # as kiqa score
            else:
                assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{case.name}: {code} {answer}"
                assert_message(answer, case, "serving", raw=True)
                assert "image_bytes[1]: " in answer  # every failure names its item


def test_serving_default_called_directly_decides_like_kiqa_score(corpus, exported, scored):
    # The SavedModel itself, as TF Serving runs it: no server, no client in between.
    _, rows = scored
    signature = tf.saved_model.load(str(exported[1] / "1")).signatures["serving_default"]
    good = read_image_bytes(corpus.images / "good.jpg")
    for case in corpus.files():
        if not case.sends_bytes:
            continue
        batch = tf.constant([good, read_image_bytes(corpus.images / case.name)])
        try:
            mos = bounded(signature, image_bytes=batch)["mos"].numpy()
        except tf.errors.InvalidArgumentError as err:
            assert_message(describe_decode_error(err), case, "serving")
            if case.serving.reason not in DECODER_REASONS:
                assert describe_decode_error(err).startswith("image_bytes[1]: "), err.message
        else:
            assert case.serving.decoded, f"{case.name} was scored by serving_default: {mos}"
            assert mos[1] == pytest.approx(rows[case.name][0], abs=1e-3)


def test_lenient_signature_isolates_each_refused_file(corpus, exported, scored):
    # score_bytes_lenient, as TF Serving runs it: a bad item gets NaN and its reason,
    # the good item beside it is still scored.
    _, rows = scored
    lenient = tf.saved_model.load(str(exported[1] / "1")).signatures["score_bytes_lenient"]
    good = read_image_bytes(corpus.images / "good.jpg")
    for case in corpus.files():
        if not case.sends_bytes:
            continue
        result = bounded(lenient, image_bytes=tf.constant([good, read_image_bytes(corpus.images / case.name)]))
        mos, errors = result["mos"].numpy(), [e.decode() for e in result["error"].numpy()]
        assert errors[0] == "" and mos[0] == pytest.approx(rows["good.jpg"][0], abs=1e-3)
        if case.serving.decoded:
            assert errors[1] == "" and mos[1] == pytest.approx(rows[case.name][0], abs=1e-3), case.name
        else:
            assert np.isnan(mos[1])
            assert_message(errors[1], case, "serving")


def test_kiqa_predict_names_each_rejected_file(corpus, server, scored, tmp_path):
    _, rows = scored
    out = tmp_path / "predicted.csv"
    code = bounded(predict_cli.main, [str(corpus.images), "--server", server.address, "--out", str(out),
                                      "--batch-size", "4", "--timeout", str(CALL_TIMEOUT)])
    assert code == EXIT_PARTIAL
    with open(out, newline="") as handle:
        predicted = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    assert sorted(predicted) == sorted(c.name for c in corpus.files())
    for case in corpus.files():
        row = predicted[case.name]
        if case.serving.decoded:
            assert row["error"] == "" and float(row["mos"]) == pytest.approx(rows[case.name][0], abs=1e-3)
        else:
            assert row["mos"] == "" and row["error"].startswith(str(corpus.images / case.name))
            assert_message(row["error"], case, "serving")


# ----------------------------------------------------------------------------- out of process


def test_no_hostile_file_crashes_hangs_or_grows_memory(exported, tmp_path):
    run_dir, base = exported
    out = tmp_path / "probe.json"
    process = subprocess.run(
        [sys.executable, str(Path(hostile_corpus.__file__)), "probe", str(tmp_path / "corpus"), str(run_dir),
         str(base), ",".join(map(str, EXPORT_SIZE)), str(out)],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]),
                 TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True, text=True, timeout=CALL_TIMEOUT * 2,
    )
    assert process.returncode == 0, f"the probe crashed (code {process.returncode}): {process.stderr[-3000:]}"
    result = json.loads(out.read_text())
    print(f"\npeak RSS growth (MB) over {result['baseline_mb']:.0f} MB after warm-up, limit {MAX_GROWTH_MB}:")
    for key, growth in result["per_file"].items():
        print(f"  {key:<55} {growth:7.1f}")
    print(f"  {'highest peak of the whole run':<55} {result['overall_growth_mb']:7.1f}")
    assert result["exact"], "VmHWM could not be reset (/proc/self/clear_refs): peaks not measured"
    assert result["control_mb"] > 50  # the measure sees a real 60 MB decode
    assert result["overall_growth_mb"] < MAX_GROWTH_MB
    assert all(growth < MAX_GROWTH_MB for key, growth in result["per_file"].items() if not key.startswith("control"))


_BOUNDED_DECODE = """
import json, resource, re, sys, time
import tensorflow as tf
from kiqa.image import decode_image
size = int(re.search(r"^VmSize:\\s+(\\d+) kB", open("/proc/self/status").read(), re.M).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 1024**3, size + 1024**3))  # 1 GiB more than now
results = {}
for path in sys.argv[1:]:
    start = time.monotonic()
    try:
        decode_image(open(path, "rb").read(), (32, 48), name=path)
        outcome = "decoded"
    except tf.errors.InvalidArgumentError as err:
        outcome = err.message
    results[path] = (outcome, time.monotonic() - start)
print(json.dumps(results))
"""


def test_decode_cost_bombs_are_refused_within_a_memory_limit(tmp_path):
    # Out of process, under RLIMIT_AS of 1 GiB above the process's size after importing
    # TF: a PNG of 200 zTXt chunks would make libpng inflate 1.6 GB (and take ~10 s), the
    # scan bomb (a 47 KB file) takes ~30 s to decode; both must be refused at once.
    from PIL import Image

    png = hostile_corpus._encode(Image.new("RGB", (64, 48), (10, 20, 30)), "PNG")
    flat = hostile_corpus._encode(Image.new("RGB", (2048, 1536), (90, 140, 60)), "JPEG", progressive=True)
    files = {"text.png": hostile_corpus.png_with_text_chunks(png, 200, hostile_corpus.TEXT_BOMB_INFLATED),
             "scans.jpg": hostile_corpus.scan_bomb(flat, hostile_corpus.SCAN_BOMB_REPEATS)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    process = subprocess.run(
        [sys.executable, "-c", _BOUNDED_DECODE, *(str(tmp_path / name) for name in files)],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]),
                 TF_CPP_MIN_LOG_LEVEL="2"),
        capture_output=True, text=True, timeout=CALL_TIMEOUT,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    results = json.loads(process.stdout.strip().splitlines()[-1])
    text, text_seconds = results[str(tmp_path / "text.png")]
    scans, scan_seconds = results[str(tmp_path / "scans.jpg")]
    assert re.search(hostile_corpus.TOO_MANY_TEXT_CHUNKS, text), text
    assert re.search(hostile_corpus.TOO_MANY_SCANS, scans), scans
    assert scan_seconds < 10  # the first call traces the image function; no decode runs
