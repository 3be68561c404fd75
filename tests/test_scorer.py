"""Tests for kiqa.scoring.scorer: loading run dirs, .keras files and SavedModels as scorers."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import keras
import tensorflow as tf

from kiqa.config import TrainConfig
from kiqa.cli.remedies import remedy_for
from kiqa.errors import ImageSizeError, ModelError, ModelNotFoundError
from kiqa.scoring import scorer as inference
from kiqa.scoring.scorer import DEFAULT_IMAGE_SIZE, load_scorer

import helpers

SIZE = helpers.EXPORT_SIZE


def make_tiny_run(run_dir):
    return helpers.make_tiny_run(run_dir, seed=0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("inference") / "run"
    model = make_tiny_run(run_dir)
    return run_dir, model


def pixels(n, size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *size, 3)).astype(np.float32)


def test_run_directory_scorer_matches_the_keras_model(tiny_run):
    run_dir, model = tiny_run
    scorer = load_scorer(run_dir)
    assert scorer.kind == "keras"
    assert scorer.image_size == SIZE  # from config.json
    assert scorer.max_pixels == TrainConfig.demo().max_pixels
    batch = pixels(5)
    mos = scorer.predict_pixels(batch)
    assert mos.shape == (5,) and mos.dtype == np.float32
    assert np.all(np.isfinite(mos)) and np.all((mos >= 0) & (mos <= 100))
    expected = keras.ops.convert_to_numpy(model(batch, training=False)["mos"]).reshape(-1)
    np.testing.assert_allclose(mos, expected, atol=1e-4)
    # A different batch size goes through the same traced function.
    np.testing.assert_allclose(scorer.predict_pixels(batch[:2]), mos[:2], atol=1e-4)
    assert scorer.predict_pixels(np.zeros((0, *SIZE, 3), np.float32)).shape == (0,)


def test_keras_file_finds_config_beside_it_or_above_checkpoints(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    assert load_scorer(run_dir / "model.keras").image_size == SIZE
    run_copy = tmp_path / "run"
    (run_copy / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "config.json", run_copy / "config.json")
    shutil.copy(run_dir / "model.keras", run_copy / "checkpoints" / "best.keras")
    assert load_scorer(run_copy / "checkpoints" / "best.keras").image_size == SIZE


def test_bare_keras_file_needs_its_size(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    bare = tmp_path / "bare.keras"
    shutil.copy(run_dir / "model.keras", bare)
    with pytest.warns(UserWarning, match="no config.json"):
        scorer = load_scorer(bare)
    assert scorer.image_size == DEFAULT_IMAGE_SIZE
    scorer = load_scorer(bare, image_size=(40, 56))
    assert scorer.image_size == (40, 56)
    assert scorer.predict_pixels(pixels(2, (40, 56))).shape == (2,)


def test_wrong_batch_shape_is_a_model_error(tiny_run):
    scorer = load_scorer(tiny_run[0])
    with pytest.raises(ModelError, match=r"\[batch, 32, 48, 3\]"):
        scorer.predict_pixels(pixels(2, (48, 32)))
    with pytest.raises(ModelError):
        scorer.predict_pixels(np.zeros((32, 48, 3), np.float32))


def test_unusable_model_paths_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(ModelNotFoundError, match="missing-run does not exist"):
        load_scorer(tmp_path / "missing-run")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes").mkdir()
    with pytest.raises(ModelError, match="empty is not a model.*kiqa export"):
        load_scorer(empty)
    text = tmp_path / "model.h5"
    text.write_text("not a model")
    with pytest.raises(ModelError, match=r"model\.h5 is not a \.keras file"):
        load_scorer(text)
    broken = tmp_path / "broken.keras"
    broken.write_text("not a zip")
    with pytest.raises(ModelError, match="broken.keras"):
        load_scorer(broken, image_size=SIZE)


# --------------------------------------------------------------------- SavedModel branch


class _OffsetModule(tf.Module):
    """A stand-in export: MOS = mean pixel / 255 * 50 + offset, with kiqa's signatures."""

    def __init__(self, offset, size=SIZE):
        super().__init__()
        self.offset = tf.Variable(float(offset))
        height, width = size

        @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.float32)])
        def score_pixels(image):
            return {"mos": tf.reduce_mean(image, axis=[1, 2, 3]) / 255.0 * 50.0 + self.offset}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def serving_default(image_bytes):
            return {"mos": tf.zeros(tf.shape(image_bytes), tf.float32) + self.offset}

        self.score_pixels = score_pixels
        self.serving_default = serving_default


def write_saved_model(version_dir, offset, size=SIZE, info=True,
                      signatures=("score_pixels", "serving_default")):
    module = _OffsetModule(offset, size)
    tf.saved_model.save(
        module, str(version_dir),
        signatures={name: getattr(module, name).get_concrete_function() for name in signatures},
    )
    if info:
        (version_dir / "assets.extra").mkdir(exist_ok=True)
        (version_dir / "assets.extra" / "kiqa.json").write_text(
            json.dumps({"image_size": list(size), "max_pixels": 1_000_000})
        )


@pytest.fixture(scope="module")
def handmade_export(tmp_path_factory):
    base = tmp_path_factory.mktemp("export") / "kiqa"
    base.mkdir()
    write_saved_model(base / "1", offset=1.0)
    write_saved_model(base / "3", offset=3.0)
    (base / "12-not-a-version").mkdir()  # TF Serving ignores non-integer names; so must we
    (base / ".tmp-4-host-1").mkdir()
    return base


def test_saved_model_base_path_uses_the_highest_version(handmade_export):
    scorer = load_scorer(handmade_export)
    assert scorer.kind == "savedmodel"
    assert scorer.source.endswith("3")
    assert scorer.image_size == SIZE and scorer.max_pixels == 1_000_000
    batch = pixels(3)
    expected = batch.mean(axis=(1, 2, 3)) / 255.0 * 50.0 + 3.0
    np.testing.assert_allclose(scorer.predict_pixels(batch), expected, rtol=1e-5)


def test_saved_model_version_directory(handmade_export):
    scorer = load_scorer(handmade_export / "1")
    batch = pixels(2, seed=1)
    expected = batch.mean(axis=(1, 2, 3)) / 255.0 * 50.0 + 1.0
    np.testing.assert_allclose(scorer.predict_pixels(batch), expected, rtol=1e-5)
    # Its own size is fine; another size does not fit the fixed signature.
    assert load_scorer(handmade_export / "1", image_size=SIZE).image_size == SIZE
    # The error carries the sizes; `kiqa score` phrases the flags (test_score.py).
    with pytest.raises(ImageSizeError, match="exported for 32x48.*not 64x64") as raised:
        load_scorer(handmade_export / "1", image_size=(64, 64))
    assert raised.value.expected == SIZE and raised.value.requested == (64, 64)
    assert remedy_for(raised.value, "score") == (
        "drop --image-size, or export again at that size: `kiqa export MODEL --image-size 64 64`")


def test_saved_model_without_metadata_or_pixel_signature(tmp_path):
    write_saved_model(tmp_path / "no-info", offset=0.0, info=False)
    with pytest.raises(ModelError, match=r"no-info has no readable assets.extra/kiqa.json.*kiqa export"):
        load_scorer(tmp_path / "no-info")
    write_saved_model(tmp_path / "bytes-only", offset=0.0, signatures=("serving_default",))
    with pytest.raises(ModelError, match="no 'score_pixels' signature.*serving_default"):
        load_scorer(tmp_path / "bytes-only")


def test_scorer_is_immutable_but_replaceable(tiny_run):
    scorer = load_scorer(tiny_run[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        scorer.max_pixels = 1
    assert dataclasses.replace(scorer, max_pixels=10).max_pixels == 10


def test_saved_model_batches_are_split_at_the_exports_maximum(base):
    from kiqa.serving import export

    assert inference.SAVED_MODEL_MAX_BATCH == export.MAX_BATCH
    scorer = load_scorer(base)
    pixels = np.random.default_rng(0).integers(0, 256, (export.MAX_BATCH + 3, *scorer.image_size, 3))
    mos = scorer.predict_pixels(pixels.astype(np.float32))
    assert mos.shape == (export.MAX_BATCH + 3,) and np.all(np.isfinite(mos))
    np.testing.assert_allclose(mos[-3:], scorer.predict_pixels(pixels[-3:].astype(np.float32)), atol=1e-4)


def test_an_unfinished_run_names_its_best_checkpoint(tmp_path):
    from kiqa.run import resolve_model

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.keras").write_bytes(b"placeholder")
    with pytest.raises(ModelError, match=r"has no model\.keras \(the run may not have finished\); its best checkpoint is .*best\.keras"):
        resolve_model(run)
    (run / "checkpoints" / "best.keras").unlink()
    with pytest.raises(ModelError, match="is not a model"):
        resolve_model(run)
