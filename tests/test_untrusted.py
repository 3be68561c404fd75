"""Untrusted files: model files that carry code, SavedModels that touch the file system,
and property-based tests of the two parsers that read user bytes (label CSVs, images).

A `.keras` file with a Lambda layer carries Python bytecode that runs when the model is
rebuilt; a SavedModel is a TensorFlow program. kiqa refuses the first unless the user
says --unsafe, and refuses to export or score with a graph holding any op outside its
allow list (kiqa.serving.ops; every hostile op kind is in tests/test_serving_ops.py).
kiqa.model.load_model's own refusal is tested in tests/test_model.py; here it is every
command that loads a model, and proof that the refused code never ran.
"""

import io
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from helpers import EXPORT_SIZE
from kiqa.serving import export, savedmodel
from kiqa.cli import compare as compare_cli
from kiqa.cli import evaluate as evaluate_cli
from kiqa.cli import export as export_cli
from kiqa.cli import score as score_cli
from kiqa.cli._common import EXIT_ERROR, EXIT_OK
from kiqa.config import TrainConfig
from kiqa.data.koniq import read_labels
from kiqa.errors import DataError, ExportError, LambdaLayerError, ModelError
from kiqa.image import decode_image
from kiqa.scoring.scorer import load_scorer
from kiqa.model import build_model


# ----------------------------------------------------------------------------- Lambda layers


@pytest.fixture(scope="module")
def lambda_model(tmp_path_factory):
    """A .keras file whose Lambda layer creates `marker` whenever its code runs (as a
    hostile one would do anything else), and a folder with one image to score."""
    folder = tmp_path_factory.mktemp("lambda")
    marker = folder / "the-lambda-ran"
    image = keras.Input((None, None, 3), name="image")
    # The path is a constant of the code itself (Keras 3.15 cannot reload a Lambda whose
    # function has default arguments).
    hostile = eval(f"lambda t: (open({str(marker)!r}, 'a').close(), t)[1]")  # noqa: S307
    touched = keras.layers.Lambda(hostile)(image)
    pooled = keras.layers.GlobalAveragePooling2D()(touched)
    mos = keras.layers.Dense(1)(pooled)
    path = folder / "model.keras"
    keras.Model(image, {"mos": mos}).save(path)
    marker.unlink()  # created while building it here
    photos = folder / "photos"
    photos.mkdir()
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(photos / "grey.png")
    return path, marker, photos


def _commands(model, photos, tmp_path):
    return {
        "score": (score_cli.main, [str(photos), "--model", str(model), "--image-size", "32", "48",
                                   "--out", str(tmp_path / "s.csv"), "--quiet"]),
        "export": (export_cli.main, [str(model), "--base", str(tmp_path / "kiqa"), "--image-size", "32", "48"]),
        "compare": (compare_cli.main, [str(photos), str(photos), "--model", str(model), "--image-size", "32",
                                       "48", "--out", str(tmp_path / "cmp"), "--quiet"]),
        "evaluate": (evaluate_cli.main, [str(model), "--image-size", "32", "48", "--out", str(tmp_path / "ev")]),
    }


@pytest.mark.parametrize("command", ["score", "export", "compare", "evaluate"])
def test_every_command_refuses_a_lambda_layer_without_running_it(command, lambda_model, tmp_path, capsys):
    model, marker, photos = lambda_model
    main, argv = _commands(model, photos, tmp_path)[command]
    assert main(argv) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "Lambda layer" in err and str(model) in err
    # evaluate has no way to opt out, so it must not name a flag it lacks
    assert ("--unsafe" in err) == (command != "evaluate")
    assert not marker.exists()  # the file's code never ran
    assert not (tmp_path / "kiqa").exists()  # nothing exported


def test_unsafe_runs_the_files_code_as_it_says(lambda_model, tmp_path):
    model, marker, photos = lambda_model
    with pytest.raises(LambdaLayerError, match="safe_mode=False"):
        load_scorer(model, image_size=EXPORT_SIZE)  # safe by default
    assert not marker.exists()
    main, argv = _commands(model, photos, tmp_path)["score"]
    assert main(argv + ["--unsafe"]) == EXIT_OK
    assert marker.exists()  # what safe mode protects against is real


# ----------------------------------------------------------------------------- file-system ops


class _Snoop(keras.layers.Layer):
    """Reads a file on every call and hides it in the output (times zero)."""

    def __init__(self, target, **kwargs):
        super().__init__(**kwargs)
        self.target = target

    def call(self, x):
        secret = tf.io.read_file(self.target)
        return x + 0.0 * tf.cast(tf.strings.length(secret), x.dtype)


def test_export_refuses_a_model_with_file_system_ops(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    image = keras.Input((None, None, 3))
    features = keras.layers.Conv2D(4, 3, strides=2)(_Snoop(str(secret))(image))
    model = build_model(TrainConfig.demo(weights="none", image_size=EXPORT_SIZE), backbone=keras.Model(image, features))
    base = tmp_path / "kiqa"
    with pytest.raises(ExportError, match=r"outside kiqa's allow list \['ReadFile'\]"):
        export.export_model(model, base_path=base, image_size=EXPORT_SIZE)
    assert savedmodel.list_versions(base) == [] and list(base.iterdir()) == []  # no version, no leftovers


class _Reader(tf.Module):
    """Looks like a kiqa export (both signatures, kiqa.json) but reads a file per call."""

    def __init__(self, target):
        super().__init__()
        height, width = EXPORT_SIZE

        @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32)])
        def score_pixels(image):
            leak = tf.cast(tf.strings.length(tf.io.read_file(target)), tf.float32)
            return {"mos": tf.reduce_mean(image, axis=[1, 2, 3]) * 0.0 + leak}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def serving_default(image_bytes):
            return {"mos": tf.zeros(tf.shape(image_bytes), tf.float32)}

        self.score_pixels, self.serving_default = score_pixels, serving_default


def test_scoring_refuses_a_savedmodel_with_file_system_ops(tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    version = tmp_path / "kiqa" / "1"
    reader = _Reader(str(secret))
    tf.saved_model.save(reader, str(version), signatures={
        "score_pixels": reader.score_pixels.get_concrete_function(),
        "serving_default": reader.serving_default.get_concrete_function(),
    })
    (version / "assets.extra").mkdir()
    (version / "assets.extra" / "kiqa.json").write_text(json.dumps({"image_size": list(EXPORT_SIZE)}))
    with pytest.raises(ModelError, match=r"allow list: \['ReadFile'\]\. A SavedModel is a program"):
        load_scorer(tmp_path / "kiqa")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(photos / "a.png")
    out = tmp_path / "scores.csv"
    assert score_cli.main([str(photos), "--model", str(version), "--out", str(out), "--quiet"]) == EXIT_ERROR
    assert "ReadFile" in capsys.readouterr().err and not out.exists()


# ----------------------------------------------------------------------------- properties: CSV

_COLUMNS = ["image_name", "MOS", "MOS_zscore", "set", "SD", "c_total", "source_image", "other", ""]
_CELLS = st.one_of(
    st.text(max_size=12),
    st.text(alphabet=',"\n\r\t ;.-1a', max_size=8),  # separators, quotes and line breaks
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**20), 10**20).map(str),
    st.sampled_from(["training", "validation", "test", "", "nan", "inf", "-1", "100", "1e309", "NULL"]),
)


def _assert_labels_or_data_error(path):
    try:
        frame = read_labels(path)
    except DataError:
        return
    # Anything accepted is a usable label table.
    assert len(frame) > 0 and frame["image_name"].notna().all()
    assert frame["mos"].between(0, 100).all() and not frame["image_name"].duplicated().any()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    header=st.lists(st.sampled_from(_COLUMNS), min_size=1, max_size=6),
    rows=st.lists(st.lists(_CELLS, max_size=7), max_size=6),
    separator=st.sampled_from([",", ";", "\t"]),
)
def test_label_reader_raises_only_data_error_on_garbled_csv(tmp_path, header, rows, separator):
    text = separator.join(header) + "\n" + "\n".join(separator.join(row) for row in rows)
    path = tmp_path / "labels.csv"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _assert_labels_or_data_error(path)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prefix=st.sampled_from([b"", b"image_name,MOS_zscore\n", b"image_name,MOS,set\n", b"\xef\xbb\xbfimage_name,MOS_zscore\n"]),
    body=st.binary(max_size=300),
)
def test_label_reader_raises_only_data_error_on_random_bytes(tmp_path, prefix, body):
    path = tmp_path / "labels.csv"
    path.write_bytes(prefix + body)
    _assert_labels_or_data_error(path)


def test_rows_longer_than_the_header_are_refused_not_shifted(tmp_path):
    # pandas would take the first column as the index and shift every column by one:
    # image_name would hold the scores.
    path = tmp_path / "labels.csv"
    path.write_text("image_name,MOS_zscore\na.jpg,50,extra\nb.jpg,40,extra\n")
    with pytest.raises(DataError, match="more fields than the header"):
        read_labels(path)


# ----------------------------------------------------------------------------- properties: bytes


def _seed_images():
    y, x = np.mgrid[0:20, 0:28]
    pixels = np.stack([x * 9, y * 12, (x + y) * 5], -1).astype(np.uint8)
    image = Image.fromarray(pixels)

    def encoded(fmt, **options):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        return buffer.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "jpeg": encoded("JPEG"),
        "progressive": encoded("JPEG", progressive=True),
        "exif": encoded("JPEG", exif=exif.tobytes()),
        "png": encoded("PNG"),
        "gif": encoded("GIF", save_all=True, append_images=[Image.fromarray(255 - pixels)]),
        "bmp": encoded("BMP"),
        "webp": encoded("WEBP"),
        "webp-lossless": encoded("WEBP", lossless=True),
    }


SEEDS = _seed_images()
SIZE = (16, 24)


def _assert_decodes_or_invalid_argument(contents):
    try:
        image = decode_image(contents, SIZE, max_pixels=1_000_000).numpy()
    except tf.errors.InvalidArgumentError:
        return
    assert image.shape == (*SIZE, 3) and image.dtype == np.float32
    assert 0 <= image.min() and image.max() <= 255


@settings(max_examples=50, deadline=None)
@given(
    seed=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=10),
    cut=st.one_of(st.none(), st.integers(0, 2000)),
    insert=st.tuples(st.integers(0, 2000), st.binary(max_size=32)),
)
def test_decode_image_raises_only_invalid_argument_on_mutated_images(seed, edits, cut, insert):
    data = bytearray(SEEDS[seed][:cut])
    for position, value in edits:
        if position < len(data):
            data[position] = value
    data[insert[0] : insert[0]] = insert[1]
    _assert_decodes_or_invalid_argument(bytes(data))


@settings(max_examples=50, deadline=None)
@given(
    prefix=st.sampled_from([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
                            b"II*\x00", b"\xff\x0a"]),
    body=st.binary(max_size=400),
)
def test_decode_image_raises_only_invalid_argument_on_random_bytes(prefix, body):
    _assert_decodes_or_invalid_argument(prefix + body)


def test_the_mutation_seeds_decode():
    # The mutations start from files that decode: a broken seed would test nothing.
    for name, contents in SEEDS.items():
        assert decode_image(contents, SIZE).shape == (*SIZE, 3), name
