"""Tests for kiqa.serving.export: atomic versioned SavedModel export for TF Serving.

One tiny-backbone model is exported once per session (`shared_export`, reused by
tests/test_serving_client.py and tests/test_devserver.py); the few tests that need
their own export (failure cleanup, overwrite, kill -9) say why.
"""

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from kiqa.serving import export, ops as serving_ops, savedmodel, warmup
from kiqa.cli import export as export_cli
from kiqa.config import TrainConfig
from kiqa.errors import ExportError, VersionExistsError
from kiqa.image import decode_image, describe_decode_error
from kiqa.model import build_model, load_model

from helpers import EXPORT_SIZE as SIZE, shared_export, bad_image_kinds, good_image_kinds

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAVED_MODEL_CLI = Path(sys.executable).parent / "saved_model_cli"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run_dir, base = shared_export(tmp_path_factory)
    return run_dir, base, load_model(run_dir / "model.keras")


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(str(exported[1] / "1"))


def png_header(width, height):
    """A PNG whose IHDR announces width x height (no pixel data to speak of)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- layout


def test_export_layout_and_metadata(exported):
    run_dir, base, model = exported
    assert savedmodel.list_versions(base) == [1]
    # Nothing but the version: the temporary directory was renamed, not copied.
    assert sorted(p.name for p in base.iterdir()) == ["1"]
    version = base / "1"
    assert (version / "saved_model.pb").is_file()
    assert (version / "variables" / "variables.index").is_file()
    info = savedmodel.read_export_metadata(version)
    assert info["model_name"] == "kiqa" and info["version"] == 1
    assert info["image_size"] == list(SIZE)  # from the run's config.json
    assert info["max_pixels"] == TrainConfig.demo().max_pixels
    assert info["tf_version"] == tf.__version__ and info["keras_version"] == keras.__version__
    assert info["config"] == TrainConfig.load(run_dir / "config.json").to_dict()
    assert info["parameters"] == model.count_params() == info["stored_parameters"]
    assert info["parity"]["max_abs_diff_bytes"] <= export.PARITY_TOLERANCE
    assert info["parity"]["images"] == len(warmup.generated_images())
    assert info["source"] == str(run_dir / "model.keras")


def test_signatures_are_batch_first_and_named(exported):
    meta_graph = savedmodel.read_meta_graph(exported[1] / "1")
    described = savedmodel.describe_signatures(meta_graph)
    # The quality map (kiqa.maps): local MOS per cell of the last feature map, tests/test_maps.py.
    quality_map = described.pop("quality_map")
    assert quality_map["inputs"] == {"image_bytes": ["DT_STRING", [-1]]}
    assert quality_map["outputs"]["mos"] == ["DT_FLOAT", [-1]]
    assert quality_map["outputs"]["quality_map"][0] == "DT_FLOAT" and quality_map["outputs"]["quality_map"][1][0] == -1
    assert described == {
        "serving_default": {"inputs": {"image_bytes": ["DT_STRING", [-1]]}, "outputs": {"mos": ["DT_FLOAT", [-1]]}},
        "score_pixels": {"inputs": {"image": ["DT_FLOAT", [-1, *SIZE, 3]]}, "outputs": {"mos": ["DT_FLOAT", [-1]]}},
        "score_bytes_lenient": {
            "inputs": {"image_bytes": ["DT_STRING", [-1]]},
            "outputs": {"error": ["DT_STRING", [-1]], "mos": ["DT_FLOAT", [-1]]},
        },
        # The model's provenance record for remote clients (tests/test_provenance.py).
        "provenance": {"inputs": {"request": ["DT_STRING", [-1]]}, "outputs": {"provenance": ["DT_STRING", [-1]]}},
    }
    # The bytes signature decodes in the graph: no op may read a path.
    ops = savedmodel.ops_used(meta_graph)
    assert "DecodeImage" in ops or "DecodeJpeg" in ops
    assert serving_ops.refused_ops(meta_graph) == []  # kiqa's own export passes its allow list


def test_each_weight_is_stored_once(exported):
    _, base, model = exported
    prefix = str(base / "1" / "variables" / "variables")
    stored = [(name, shape) for name, shape in tf.train.list_variables(prefix) if name != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert sum(int(np.prod(shape)) for _, shape in stored) == model.count_params()
    assert len(stored) == len(model.weights)
    # And the bytes on disk are the float32 weights once, not twice.
    data_bytes = sum(p.stat().st_size for p in (base / "1" / "variables").glob("variables.data-*"))
    assert data_bytes < 1.5 * 4 * model.count_params() + 4096


def test_the_graph_holds_each_function_once(exported):
    # tf.saved_model.save traced tf.function attributes a second time (the save context
    # is part of TF's tracing key) and each signature inlined its own copy of the model:
    # ConvNeXt-Tiny's saved_model.pb was 7.3 MB (1.08x the weights with them), now 2.3.
    meta_graph = savedmodel.read_meta_graph(exported[1] / "1")
    names = [f.signature.name for f in meta_graph.graph_def.library.function]
    # (One small signature_wrapper per signature is TF's own, not a copy.)
    traced = [re.sub(r"_\d+$", "", n) for n in names
              if n.startswith("__inference_") and not n.startswith("__inference_signature_wrapper")]
    assert sorted(set(traced)) == sorted(traced), sorted(n for n in set(traced) if traced.count(n) > 1)
    # The model's forward pass (its Dense head) is stored once, shared by every scoring
    # signature; the quality map runs the same Dense on every cell, in one function of its own.
    heads = [f.signature.name for f in meta_graph.graph_def.library.function
             if any(node.op == "MatMul" for node in f.node_def)]
    map_heads = [name for name in heads if name.startswith("__inference_quality_map")]
    assert len(map_heads) <= 1 and len(heads) - len(map_heads) == 1, heads


def test_in_graph_decode_equals_decode_image_item_by_item():
    # serving_default and the lenient signature decode the whole request in one
    # tf.data pass (header half and GIF cut before it, decoder and resize in it): the
    # pixels must be the image function's, item by item, with bad neighbours or without.
    import io

    from PIL import Image

    goods = list(good_image_kinds().values())
    for orientation in (3, 6, 8):  # EXIF turns, applied in the dataset's function
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        Image.fromarray(np.arange(40 * 56 * 3, dtype=np.uint8).reshape(40, 56, 3)).save(buffer, "JPEG", exif=exif)
        goods.append(buffer.getvalue())
    bads = list(bad_image_kinds().values())
    mixed = [item for pair in zip(goods, bads) for item in pair] + bads[len(goods):]
    mixed = mixed[: export.MAX_BATCH]

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def decode(image_bytes):
        plans = export._header_plans(image_bytes, SIZE, 64_000_000)
        index, images = export._decode_batch(image_bytes, plans, SIZE)
        return index, images, export._decoder_errors(image_bytes, plans[0], index)

    expected = {i: decode_image(c, SIZE).numpy() for i, c in enumerate(mixed) if c in goods}
    for batch, want in ((goods, dict(enumerate(decode_image(c, SIZE).numpy() for c in goods))), (mixed, expected)):
        index, images, errors = decode(tf.constant(batch))
        assert sorted(index.numpy().tolist()) == sorted(want)
        for i, image in zip(index.numpy(), images.numpy()):
            np.testing.assert_array_equal(image, want[int(i)])
        assert [bool(e) for e in errors.numpy()] == [i not in want for i in range(len(batch))]


def test_duplicate_storage_is_detected(exported, tmp_path):
    # Keras' own model.export() is the known offender (keras issue 23553); the check
    # export_model runs before publishing must refuse its output.
    _, _, model = exported
    target = tmp_path / "keras_export"
    model.export(str(target), verbose=False)
    if savedmodel.stored_parameter_count(target) == model.count_params():
        pytest.skip("this Keras stores each variable once: keras issue 23553 is fixed")
    with pytest.raises(ExportError, match="stored twice.*23553"):
        export._check_stored_once(target, model)


# ----------------------------------------------------------------------------- behaviour


def test_bytes_signature_agrees_with_keras_on_real_photos(exported, loaded, realset):
    _, _, model = exported
    files = sorted((realset / "images").iterdir())
    assert len(files) == 20
    inputs = [(str(p), p.read_bytes()) for p in files] + warmup.generated_images()
    served = np.concatenate([
        loaded.signatures["serving_default"](image_bytes=tf.constant([c for _, c in inputs[i : i + 8]]))["mos"].numpy()
        for i in range(0, len(inputs), 8)
    ])
    pixels = tf.stack([decode_image(c, SIZE) for _, c in inputs])
    expected = np.reshape(model(pixels, training=False)["mos"], [-1])
    assert served.shape == (len(inputs),)
    np.testing.assert_allclose(served, expected, atol=export.PARITY_TOLERANCE, rtol=0)
    # The scores differ between images, so agreement is not agreement on a constant.
    assert np.ptp(expected) > 1e-3
    by_pixels = loaded.signatures["score_pixels"](image=pixels)["mos"].numpy()
    np.testing.assert_allclose(by_pixels, expected, atol=export.PARITY_TOLERANCE, rtol=0)


def test_bytes_signature_rejects_undecodable_and_oversized_input(loaded):
    good = warmup.generated_images(1)[0][1]
    score = loaded.signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image_bytes\[1\]: image format not recognised"):
        score(image_bytes=tf.constant([good, b"this is not an image"]))
    # A 20000x20000 PNG header (400 MP) is refused before decoding, whatever its size.
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image_bytes\[0\].*over the cap"):
        score(image_bytes=tf.constant([png_header(20000, 20000)]))
    assert score(image_bytes=tf.constant([good]))["mos"].shape == (1,)


def test_empty_batch_gives_empty_scores(loaded):
    assert loaded.signatures["serving_default"](image_bytes=tf.zeros([0], tf.string))["mos"].shape == (0,)
    assert loaded.signatures["score_pixels"](image=tf.zeros([0, *SIZE, 3]))["mos"].shape == (0,)


def test_warmup_records_replay_on_the_export(exported, loaded):
    logs = warmup.read_warmup_file(exported[1] / "1" / "assets.extra" / "tf_serving_warmup_requests")
    expected = [(sig, batch) for sig in ("serving_default", "score_bytes_lenient") for batch in warmup.WARMUP_BATCH_SIZES]
    assert len(logs) == len(expected)
    for log, (signature, batch) in zip(logs, expected):
        request = log.predict_log.request
        assert request.model_spec.name == "kiqa"
        assert request.model_spec.signature_name == signature
        contents = tf.make_ndarray(request.inputs["image_bytes"])
        assert contents.shape == (batch,)
        mos = loaded.signatures[signature](image_bytes=tf.constant(contents))["mos"]
        assert mos.shape == (batch,) and np.all(np.isfinite(mos))


def test_saved_model_cli_show_and_scan_run_clean(exported):
    version = str(exported[1] / "1")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    # Both at once: each spends its time importing TensorFlow.
    show, scan = (
        subprocess.Popen([str(SAVED_MODEL_CLI), *args, "--dir", version], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for args in (["show", "--all"], ["scan"])
    )
    show_out, show_err = show.communicate(timeout=300)
    scan_out, scan_err = scan.communicate(timeout=300)
    assert show.returncode == 0, show_err[-2000:]
    for text in ("signature_def['serving_default']", "signature_def['score_pixels']", "image_bytes", "DT_STRING"):
        assert text in show_out
    assert scan.returncode == 0, scan_err[-2000:]
    assert "does not contain the default denylisted ops" in scan_out
    assert "contains the following denylisted ops" not in scan_out


def test_check_refuses_file_system_ops(tmp_path):
    class Reader(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def serve(self, image_bytes):
            return {"mos": tf.strings.to_number(tf.io.read_file(image_bytes[0]))[None]}

    reader = Reader()
    tf.saved_model.save(reader, str(tmp_path / "m"), signatures={"serving_default": reader.serve})
    with pytest.raises(ExportError, match=r"outside kiqa's allow list \['ReadFile', 'StringToNumber'\]") as info:
        savedmodel.check_saved_model(tmp_path / "m")
    assert info.value.refused_ops == ("ReadFile", "StringToNumber")


# ----------------------------------------------------------------------------- versions


def test_export_options_take_overrides_by_name_and_refuse_the_rest():
    options = export.ExportOptions(version=3, overwrite=True)
    assert export.ExportOptions.of(options, base_path="b") == export.ExportOptions(base_path="b", version=3, overwrite=True)
    assert export.ExportOptions.of() == export.ExportOptions()
    with pytest.raises(TypeError, match="base_path=... by name"):
        export.ExportOptions.of("export/kiqa")
    with pytest.raises(TypeError):
        export.ExportOptions.of(None, versoin=2)


def test_versions_are_integer_directories_only(tmp_path):
    for name in ("1", "3", "12-not-a-version", ".tmp-5-somehost-1", "latest"):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a version")
    assert savedmodel.list_versions(tmp_path) == [1, 3]
    assert savedmodel.choose_version(tmp_path, None, overwrite=False) == 4
    assert savedmodel.list_versions(tmp_path / "missing") == []


def test_existing_version_is_never_overwritten_without_the_flag(exported, tmp_path, capsys):
    run_dir, base, _ = exported
    before = (base / "1" / "assets.extra" / "kiqa.json").read_bytes()
    with pytest.raises(VersionExistsError, match=r"version 1 already exists") as refused:
        export.export_model(run_dir, base_path=base, version=1)
    assert (refused.value.version, refused.value.existing, refused.value.next_free) == (1, (1,), 2)
    assert export_cli.main([str(run_dir), "--base", str(base), "--version", "1"]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--version (next free: 2)" in err and "--overwrite" in err
    assert (base / "1" / "assets.extra" / "kiqa.json").read_bytes() == before
    assert sorted(p.name for p in base.iterdir()) == ["1"]


def test_cli_overwrite_replaces_the_version(exported, tmp_path, capsys):
    # Its own export: the version is replaced, with a changed pixel cap to tell them apart.
    run_dir, base, _ = exported
    copy = tmp_path / "kiqa"
    shutil.copytree(base, copy)
    code = export_cli.main([str(run_dir), "--base", str(copy), "--version", "1", "--overwrite", "--max-pixels", "1000000"])
    out = capsys.readouterr().out
    assert code == 0
    assert "exported version 1" in out and "stored once" in out
    # Issue 20.8: the end leads to the loopback server, whose parser takes what is printed.
    from kiqa.cli import serve_dev as serve_dev_cli
    import shlex

    line = out.split("to try it on this machine: ")[1].split(", then")[0]
    words = shlex.split(line)
    assert words[words.index("serve-dev") + 1:] == ["--base", str(copy)]
    serve_dev_cli.build_parser().parse_args(words[words.index("serve-dev") + 1:])
    assert savedmodel.read_export_metadata(copy / "1")["max_pixels"] == 1_000_000
    assert sorted(p.name for p in copy.iterdir()) == ["1"]  # the old one was deleted, no leftovers
    # The new cap is in the graph: a 1200x1000 header is now refused.
    loaded = tf.saved_model.load(str(copy / "1"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="over the cap"):
        loaded.signatures["serving_default"](image_bytes=tf.constant([png_header(1200, 1000)]))


def test_failed_check_leaves_no_numeric_directory(exported, tmp_path, monkeypatch):
    # Its own export, failing a check after the SavedModel was written: the stored
    # variables are made to look doubled, as keras issue 23553 would leave them.
    run_dir, _, _ = exported
    base = tmp_path / "kiqa"
    real_count = savedmodel.stored_parameter_count
    monkeypatch.setattr(savedmodel, "stored_parameter_count", lambda path: 2 * real_count(path))
    with pytest.raises(ExportError, match="stored twice.*nothing was published"):
        export.export_model(run_dir, base_path=base)
    assert list(base.iterdir()) == []


def test_parity_failure_is_reported_with_the_image(exported, loaded, monkeypatch):
    # The parity check on an already written export (no new export needed).
    _, _, model = exported
    monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)
    inputs = export.parity_inputs(None)
    with pytest.raises(ExportError, match=r"parity check failed: on generated-\d\.(jpg|png) the Keras model says"):
        export._check_parity(model, loaded, inputs, SIZE, TrainConfig.demo().max_pixels)


def test_kill_9_during_export_leaves_no_version(exported, tmp_path):
    # Its own export in a subprocess, paused once the SavedModel is written to the
    # temporary directory (when its checks begin); then SIGKILL.
    run_dir, _, _ = exported
    base, marker = tmp_path / "kiqa", tmp_path / "written"
    script = (
        "import pathlib, sys, time\n"
        "from kiqa.serving import export, savedmodel\n"
        "def paused(temp, image_size=None, check_ops=True):\n"
        "    pathlib.Path(sys.argv[3]).write_text(str(temp))\n"
        "    time.sleep(600)\n"
        "savedmodel.check_saved_model = paused\n"
        "export.export_model(sys.argv[1], base_path=sys.argv[2])\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(run_dir), str(base), str(marker)],
        cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if process.poll() is not None:
                pytest.fail(f"export subprocess ended early: {process.stderr.read().decode()[-2000:]}")
            assert time.monotonic() < deadline, "export subprocess never reached the rename"
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    temp = Path(marker.read_text())
    assert savedmodel.list_versions(base) == []
    assert [p.name for p in base.iterdir()] == [temp.name] and temp.name.startswith(".tmp-1-")
    assert (temp / "saved_model.pb").is_file()  # a written SavedModel TF Serving never saw
    # The next export on this host removes what the killed one left behind.
    savedmodel.recover_interrupted(base)
    assert list(base.iterdir()) == []


# ----------------------------------------------------------------------------- serving/


def test_serving_files_agree_with_the_export():
    # Parsed with TF Serving's own config protobuf; nothing here runs TF Serving.
    import yaml
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    serving = PROJECT_ROOT / "serving"
    config = text_format.Parse((serving / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert model.name == "kiqa" and model.model_platform == "tensorflow"
    assert model.model_version_policy.WhichOneof("policy_choice") == "latest"

    compose = yaml.safe_load((serving / "compose.yaml").read_text())["services"]["tf-serving"]
    assert compose["image"] == f"tensorflow/serving:{tf.__version__}-gpu"
    assert {"8500:8500", "8501:8501"} <= set(compose["ports"])
    mounts = {volume.rsplit(":", 2)[1]: volume for volume in compose["volumes"]}
    assert model.base_path in mounts and mounts[model.base_path].endswith(":ro")
    assert compose["environment"]["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    flags = dict(flag.lstrip("-").split("=", 1) for flag in compose["command"])
    for name in ("model_config_file", "batching_parameters_file", "monitoring_config_file"):
        assert (serving / Path(flags[name]).name).is_file(), name
    assert float(flags["per_process_gpu_memory_fraction"]) < 1

    # Warmup covers every batch size the batching layer pads to.
    batching = (serving / "batching_parameters.txt").read_text()
    allowed = tuple(int(v) for v in re.findall(r"^allowed_batch_sizes: (\d+)", batching, re.M))
    max_batch = int(re.search(r"^max_batch_size \{ value: (\d+) \}", batching, re.M).group(1))
    assert allowed == warmup.WARMUP_BATCH_SIZES and allowed[-1] == max_batch
    # The batching layer's largest batch is the one the signatures check in the graph.
    assert max_batch == export.MAX_BATCH


# ----------------------------------------------------------------------------- large


@pytest.mark.large
def test_convnext_tiny_export_stores_its_27m_weights_once(tmp_path):
    config = TrainConfig.demo(weights="none", image_size=(64, 64))
    model = build_model(config)
    path = export.export_model(model, base_path=tmp_path / "kiqa", image_size=(64, 64), config=config)
    info = savedmodel.read_export_metadata(path)
    assert info["stored_parameters"] == model.count_params() > 27_000_000
    # ~4 bytes per parameter once (~111 MB), not twice (~216 MB, keras issue 23553).
    assert info["variables_bytes"] < 1.1 * 4 * model.count_params()
    assert info["xla_must_compile_functions"] == 0  # fast depthwise: no XLA-only grouped convs
    assert json.loads((path / "assets.extra" / "kiqa.json").read_text())["parity"]["max_abs_diff_bytes"] <= 0.05


# ----------------------------------------------------------------------------- hostile requests


def _score_text(contents, tmp_path, name):
    """What `kiqa score` writes in the error column for a file holding `contents`."""
    from kiqa.scoring import batches as score

    path = tmp_path / name
    path.write_bytes(contents)
    pixels, error = score.load_pixels(str(path), score.image_decoder(SIZE), 64_000_000, 10**8)
    return error


def test_every_bad_file_is_named_by_index_and_isolated_by_the_lenient_signature(loaded, tmp_path):
    goods = list(good_image_kinds().values())
    strict = loaded.signatures["serving_default"]
    lenient = loaded.signatures["score_bytes_lenient"]
    reference = strict(image_bytes=tf.constant(goods))["mos"].numpy()
    # Unusual but valid files are scored alike by both signatures.
    both = lenient(image_bytes=tf.constant(goods))
    np.testing.assert_allclose(both["mos"].numpy(), reference, atol=1e-4)
    assert list(both["error"].numpy()) == [b""] * len(goods)
    # Every bad kind in one batch (within the maximum), the good files in front.
    bad = bad_image_kinds()
    batch = goods + list(bad.values())
    assert len(batch) <= export.MAX_BATCH
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        strict(image_bytes=tf.constant(batch))
    named = dict(re.findall(r"image_bytes\[(\d+)\]: (.*?)(?=; image_bytes\[|$)", describe_decode_error(info.value)))
    result = lenient(image_bytes=tf.constant(batch))
    mos, errors = result["mos"].numpy(), [e.decode() for e in result["error"].numpy()]
    np.testing.assert_allclose(mos[: len(goods)], reference, atol=1e-4)  # bad neighbours change nothing
    assert errors[: len(goods)] == [""] * len(goods)
    assert sorted(int(i) for i in named) == list(range(len(goods), len(batch)))  # each bad item, by index
    for i, (kind, contents) in enumerate(bad.items(), start=len(goods)):
        assert np.isnan(mos[i]) and errors[i], kind
        assert named[str(i)] == errors[i], kind  # both signatures say the same
        # The words kiqa score writes for the same file: the same text for kiqa's own
        # checks; for a decoder's refusal, the same sentence with the format in place
        # of TF's message (which a graph cannot catch).
        scored = _score_text(contents, tmp_path, f"{kind}.img")
        if scored.startswith("cannot decode the image ("):
            assert re.fullmatch(
                r"cannot decode the image \(the \w+ decoder refused its data\); the file is corrupt "
                r"or truncated: re-encode or replace it", errors[i]), (kind, errors[i])
        else:
            assert errors[i] == scored, kind
    empty = lenient(image_bytes=tf.zeros([0], tf.string))
    assert empty["mos"].shape == (0,) and empty["error"].shape == (0,)


def test_every_signature_refuses_more_than_the_maximum_batch(loaded):
    tiny = warmup.generated_images(1)[0][1]
    over = export.MAX_BATCH + 1
    calls = {
        "serving_default": {"image_bytes": tf.constant([tiny] * over)},
        "score_bytes_lenient": {"image_bytes": tf.constant([tiny] * over)},
        "score_pixels": {"image": tf.zeros([over, *SIZE, 3])},
    }
    for name, inputs in calls.items():
        with pytest.raises(tf.errors.InvalidArgumentError, match=rf"at most {export.MAX_BATCH} images"):
            loaded.signatures[name](**inputs)
    full = loaded.signatures["score_bytes_lenient"](image_bytes=tf.constant([tiny] * export.MAX_BATCH))
    assert np.all(np.isfinite(full["mos"].numpy()))


def test_score_pixels_refuses_nan_infinite_and_out_of_range_pixels(loaded):
    score = loaded.signatures["score_pixels"]
    for value, what in ((np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"), (-np.inf, "NaN or infinite"),
                        (-1.0, "outside 0..255"), (255.5, "outside 0..255")):
        pixels = np.full((3, *SIZE, 3), 100.0, np.float32)
        pixels[1, 5, 7, 2] = value
        with pytest.raises(tf.errors.InvalidArgumentError, match=rf"image\[1\]: pixels must be .*{what}"):
            score(image=tf.constant(pixels))
    edges = np.zeros((2, *SIZE, 3), np.float32)
    edges[1] = 255.0
    assert np.all(np.isfinite(score(image=tf.constant(edges))["mos"].numpy()))
