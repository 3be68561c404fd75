"""Tests for kiqa.serving.ops, the op allow list, through every path that checks it.

Each hostile SavedModel below is built with a plain tf.Module, as an attacker would,
and does one thing a request must never make a server do. Each must be refused by
name, before any of it runs, by `kiqa score` (kiqa.scoring.scorer) and by the export's own
check; kiqa's own exports must pass.
"""

import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from helpers import EXPORT_SIZE
from kiqa.serving import export, ops as serving_ops, savedmodel
from kiqa.cli import score as score_cli
from kiqa.cli._common import EXIT_ERROR, EXIT_OK
from kiqa.errors import ExportError, UntrustedModelError
from kiqa.scoring.scorer import load_scorer

HEIGHT, WIDTH = EXPORT_SIZE


def _pixels_spec():
    return [tf.TensorSpec([None, HEIGHT, WIDTH, 3], tf.float32)]


def _bytes_spec():
    return [tf.TensorSpec([None], tf.string)]


def _looks_like_kiqa(leak):
    """A module with kiqa's three signatures whose score_pixels adds `leak()` (a float
    scalar computed by hostile ops) times zero to an ordinary score."""

    class Module(tf.Module):
        @tf.function(input_signature=_pixels_spec())
        def score_pixels(self, image):
            return {"mos": tf.reduce_mean(image, axis=[1, 2, 3]) + 0.0 * leak()}

        @tf.function(input_signature=_bytes_spec())
        def serving_default(self, image_bytes):
            return {"mos": tf.zeros(tf.shape(image_bytes), tf.float32)}

        @tf.function(input_signature=_bytes_spec())
        def score_bytes_lenient(self, image_bytes):
            return {"mos": tf.zeros(tf.shape(image_bytes), tf.float32), "error": tf.fill(tf.shape(image_bytes), "")}

    return Module()


def _save(module, version):
    tf.saved_model.save(module, str(version), signatures={
        name: getattr(module, name).get_concrete_function()
        for name in ("score_pixels", "serving_default", "score_bytes_lenient")
    })
    (version / "assets.extra").mkdir()
    (version / "assets.extra" / "kiqa.json").write_text(json.dumps({"image_size": list(EXPORT_SIZE)}))
    return version


def _length(text):
    return tf.cast(tf.strings.length(text), tf.float32)


@tf.function
def _hidden_reader(path):
    """A nested function two calls down, inside a tf.cond branch."""
    return tf.cond(tf.strings.length(path) > 0, lambda: tf.io.read_file(path), lambda: tf.constant(""))


def _leaks(root):
    """(name, leak function, ops that must be named) per hostile model."""
    secret = str(root / "secret.txt")
    written = str(root / "written.txt")
    checkpoint = str(root / "stolen")
    return [
        ("text-line-dataset", lambda: tf.cast(
            tf.data.TextLineDataset(secret).reduce(tf.constant(0, tf.int64), lambda n, _: n + 1), tf.float32),
         {"TextLineDataset"}),
        ("read-file", lambda: _length(tf.io.read_file(secret)), {"ReadFile"}),
        ("write-file", lambda: _write_and_count(written), {"WriteFile"}),
        ("save-v2", lambda: _save_v2(checkpoint), {"SaveV2"}),
        ("restore-v2", lambda: tf.reduce_sum(tf.raw_ops.RestoreV2(
            prefix=checkpoint, tensor_names=["x"], shape_and_slices=[""], dtypes=[tf.float32])[0]), {"RestoreV2"}),
        ("matching-files", lambda: tf.cast(tf.size(tf.io.matching_files(str(root / "*"))), tf.float32),
         {"MatchingFiles"}),
        ("py-function", lambda: tf.numpy_function(lambda: np.float32(1.0), [], tf.float32), {"PyFunc"}),
        ("nested-function", lambda: _length(_hidden_reader(tf.constant(secret))), {"ReadFile"}),
    ]


def _write_and_count(path):
    with tf.control_dependencies([tf.io.write_file(path, "pwned")]):
        return tf.constant(0.0)


def _save_v2(prefix):
    with tf.control_dependencies([tf.raw_ops.SaveV2(
        prefix=prefix, tensor_names=["x"], shape_and_slices=[""], tensors=[tf.constant([1.0])],
    )]):
        return tf.constant(0.0)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """{name: (version dir, ops to name)}, one SavedModel per hostile op."""
    root = tmp_path_factory.mktemp("hostile-models")
    (root / "secret.txt").write_text("root:x:0:0\n")
    built = {}
    for name, leak, ops in _leaks(root):
        built[name] = (_save(_looks_like_kiqa(leak), root / name / "1"), ops)
    return root, built


HOSTILE = ("text-line-dataset", "read-file", "write-file", "save-v2", "restore-v2", "matching-files",
           "py-function", "nested-function")


def test_the_hostile_list_is_complete(tmp_path):
    assert tuple(name for name, _, _ in _leaks(tmp_path)) == HOSTILE


@pytest.mark.parametrize("name", HOSTILE)
def test_each_hostile_savedmodel_is_refused_by_name(hostile, name):
    root, built = hostile
    version, ops = built[name]
    refused = set(serving_ops.refused_ops(savedmodel.read_meta_graph(version)))
    assert ops <= refused, f"{name}: refused {sorted(refused)}"
    with pytest.raises(UntrustedModelError) as info:
        load_scorer(version)
    assert ops <= set(info.value.ops) and all(op in str(info.value) for op in ops)
    with pytest.raises(ExportError, match="outside kiqa's allow list") as info:
        savedmodel.check_saved_model(version)
    assert ops <= set(info.value.refused_ops)
    # Refused before anything ran: no file was written, no checkpoint saved.
    assert not (root / "written.txt").exists() and not list(root.glob("stolen*"))


def test_kiqa_score_refuses_with_the_op_names_and_unsafe_runs_it(hostile, tmp_path, capsys):
    root, built = hostile
    version, _ = built["read-file"]
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8)).save(photos / "a.png")
    out = tmp_path / "scores.csv"
    assert score_cli.main([str(photos), "--model", str(version), "--out", str(out), "--quiet"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "['ReadFile']" in err and "--unsafe" in err and not out.exists()
    # --unsafe is the user's word that they trust it: it runs (and reads the secret).
    assert score_cli.main([str(photos), "--model", str(version), "--out", str(out), "--quiet", "--unsafe"]) == EXIT_OK
    assert out.read_text().splitlines()[1].startswith(str(photos / "a.png"))


def test_checkpoint_ops_are_allowed_only_in_the_saver(base):
    meta_graph = savedmodel.read_meta_graph(base / "1")
    assert serving_ops.refused_ops(meta_graph) == []
    # The export's saver does use them: they pass only because that is where they are.
    assert {"SaveV2", "RestoreV2"} <= savedmodel.ops_used(meta_graph)
    assert not serving_ops.ALLOWED_OPS & {"SaveV2", "RestoreV2", "ReadFile", "WriteFile", "MatchingFiles"}
    # Pointing the saver at a signature's node does not lend it the saver's allowance.
    saver_trick = type(meta_graph)()
    saver_trick.CopyFrom(meta_graph)
    library = {f.signature.name: f for f in saver_trick.graph_def.library.function}
    restore = next(f for name, f in library.items() if "traced_restore" in name)
    bait = next(f for name, f in library.items() if "traced_restore" not in name and "traced_save" not in name)
    bait.node_def.add().CopyFrom(next(n for n in restore.node_def if n.op == "RestoreV2"))
    signature_node = saver_trick.signature_def["score_pixels"].outputs["mos"].name
    saver_trick.saver_def.save_tensor_name = signature_node
    assert "RestoreV2" in serving_ops.refused_ops(saver_trick)


@pytest.mark.large
def test_convnext_tiny_exports_use_only_allowed_ops(tmp_path):
    # Real-size structure, no weights (offline); both depthwise forms.
    from kiqa.config import TrainConfig
    from kiqa.model import build_model

    for fast in (True, False):
        config = TrainConfig(weights="none", image_size=(64, 64), fast_depthwise=fast)
        path = export.export_model(build_model(config), base_path=tmp_path / f"fast-{fast}", image_size=(64, 64), config=config)
        assert serving_ops.refused_ops(savedmodel.read_meta_graph(path)) == []
