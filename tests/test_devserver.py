"""Tests for kiqa.serving.devserver, the local TF-Serving-API stand-in, through the raw gRPC stubs."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)
from helpers import EXPORT_SIZE as SIZE

from kiqa.serving import export, warmup
from kiqa.contract import MAX_REQUEST_BYTES
from kiqa.cli import serve_dev as serve_dev_cli
from kiqa.serving.devserver import DevServer
from kiqa.errors import NoExportError




@pytest.fixture(scope="module")
def stubs(server):
    channel = grpc.insecure_channel(server.address)
    yield (
        prediction_service_pb2_grpc.PredictionServiceStub(channel),
        model_service_pb2_grpc.ModelServiceStub(channel),
    )
    channel.close()


def bytes_request(contents, model="kiqa", signature="serving_default", version=None):
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model, signature_name=signature))
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(contents, dtype=tf.string))
    return request


def rpc_error(call, request):
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    return info.value.code(), info.value.details()


def test_binds_loopback_on_an_ephemeral_port(server):
    assert server.address.startswith("127.0.0.1:") and server.port > 0
    assert server.available_versions() == [1]


def test_predict_bytes_answers_like_tf_serving(stubs):
    predict, _ = stubs
    images = [c for _, c in warmup.generated_images(3)]
    response = predict.Predict(bytes_request(images), timeout=30)
    assert response.model_spec.name == "kiqa"
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    mos = response.outputs["mos"]
    assert len(mos.float_val) == 3 and not mos.tensor_content  # as_proto_field, like TF Serving
    assert [d.size for d in mos.tensor_shape.dim] == [3]
    assert np.all(np.isfinite(tf.make_ndarray(mos)))


def test_predict_pixels_signature(stubs):
    predict, _ = stubs
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="kiqa", signature_name="score_pixels"))
    pixels = np.random.default_rng(0).integers(0, 256, (2, *SIZE, 3)).astype(np.float32)
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(pixels))
    assert tf.make_ndarray(predict.Predict(request, timeout=30).outputs["mos"]).shape == (2,)


def test_status_codes_match_tf_serving(stubs):
    predict, models = stubs
    good = [warmup.generated_images(1)[0][1]]
    code, details = rpc_error(predict.Predict, bytes_request([good[0], b"junk"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "image_bytes[1]: image format not recognised" in details
    assert "Graph execution error" not in details  # TF's C++ message, as TF Serving returns it
    code, details = rpc_error(predict.Predict, bytes_request(good, model="other"))
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(other)")
    code, details = rpc_error(predict.Predict, bytes_request(good, version=5))
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "Servable not found for request: Specific(kiqa, 5)")
    code, details = rpc_error(predict.Predict, bytes_request(good, signature="classify"))
    assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION, 'Serving signature key "classify" not found.')

    wrong_key = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="kiqa"))
    wrong_key.inputs["images"].CopyFrom(tf.make_tensor_proto(good, dtype=tf.string))
    code, details = rpc_error(predict.Predict, wrong_key)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "Sent extra: {images}. Missing but required: {image_bytes}." in details

    wrong_dtype = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="kiqa"))
    wrong_dtype.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([1.0, 2.0]))
    code, details = rpc_error(predict.Predict, wrong_dtype)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "to be string but float32 is provided" in details

    status_request = get_model_status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name="other"))
    code, details = rpc_error(models.GetModelStatus, status_request)
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "Could not find any versions of model other")

    no_fields = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=model_pb2.ModelSpec(name="kiqa"))
    code, _ = rpc_error(predict.GetModelMetadata, no_fields)
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    code, _ = rpc_error(predict.Classify, classification_pb2.ClassificationRequest())
    assert code == grpc.StatusCode.UNIMPLEMENTED


def test_metadata_and_status(stubs):
    predict, models = stubs
    request = get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec=model_pb2.ModelSpec(name="kiqa"), metadata_field=["signature_def"]
    )
    response = predict.GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    assert {"serving_default", "score_pixels"} <= set(signatures.signature_def)
    assert response.model_spec.version.value == 1
    status = models.GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name="kiqa")), timeout=30
    )
    assert [(s.version, s.state, s.status.error_code) for s in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE, 0)
    ]


def test_reload_follows_versions_like_tf_serving(base, tmp_path):
    copy = tmp_path / "kiqa"
    shutil.copytree(base, copy)
    with DevServer(copy, port=0, warmup=False) as latest:
        assert latest.available_versions() == [1]
        shutil.copytree(copy / "1", copy / ".tmp-2-host-1")  # a version being written: ignored
        assert latest.reload() == [1]
        os.rename(copy / ".tmp-2-host-1", copy / "2")  # published
        assert latest.reload() == [2]  # "latest" unloads 1, as TF Serving's default policy
        # A "specific" policy pinned to 1 keeps serving 1 while 2 exists (a roll back).
        pinned = DevServer(copy, port=0, versions=[1], warmup=False)
        assert pinned.reload() == [1]
        shutil.rmtree(copy / "2")  # rolled back by deleting the version
        assert latest.reload() == [1]


def test_failing_warmup_fails_the_load(base, tmp_path):
    copy = tmp_path / "kiqa"
    shutil.copytree(base, copy)
    request = bytes_request([b"not an image"])
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    warmup.write_warmup_file(copy / "1" / "assets.extra" / "tf_serving_warmup_requests", [log])
    with DevServer(copy, port=0) as server:
        assert server.available_versions() == []
        status = server.model_status(
            get_model_status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name="kiqa"))
        )
    entry = status.model_version_status[0]
    assert entry.state == get_model_status_pb2.ModelVersionStatus.END
    assert "warmup request" in entry.status.error_message and "image format not recognised" in entry.status.error_message


def test_missing_base_path_is_an_error(tmp_path, capsys):
    with pytest.raises(NoExportError, match="export base path .* not found") as raised:
        DevServer(tmp_path / "nothing").start()
    assert raised.value.base_path == str(tmp_path / "nothing")
    # `kiqa serve-dev` says the command that makes one (kiqa.cli.remedies).
    assert serve_dev_cli.main(["--base", str(tmp_path / "nothing")]) == 1
    assert f"hint: export a model first: `kiqa export RUN --base {tmp_path / 'nothing'}`" in capsys.readouterr().err


def test_serve_dev_command_announces_itself_and_stops_on_ctrl_c(base, monkeypatch, capsys):
    answered = []

    def wait_then_interrupt(self):
        # Stands in for the blocking wait: query the running server, then Ctrl-C.
        with grpc.insecure_channel(self.address) as channel:
            status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
                get_model_status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name="kiqa")), timeout=30
            )
        answered.append([s.version for s in status.model_version_status])
        raise KeyboardInterrupt

    monkeypatch.setattr(DevServer, "wait", wait_then_interrupt)
    assert serve_dev_cli.main(["--base", str(base), "--port", "0", "--poll", "0", "--no-warmup"]) == 0
    out = capsys.readouterr().out
    assert "NOT TF Serving" in out and "versions [1]" in out and "127.0.0.1:" in out
    assert answered == [[1]]


def test_serve_dev_rejects_bad_versions(base, capsys):
    assert serve_dev_cli.main(["--base", str(base), "--versions", "1,two"]) == 1
    assert "--versions must be latest, all or numbers" in capsys.readouterr().err


# ----------------------------------------------------------------------------- hostile requests


def _declaring(key, dtype, dims, signature):
    """A PredictRequest whose tensor declares `dims` but carries what the caller adds."""
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="kiqa", signature_name=signature))
    proto = request.inputs[key]
    proto.dtype = dtype
    for size in dims:
        proto.tensor_shape.dim.add(size=size)
    return request, proto


def hostile_requests():
    """(name, request) of requests that declare far more than they carry."""
    strings, proto = _declaring("image_bytes", types_pb2.DT_STRING, [10000], "serving_default")
    proto.string_val.append(b"\xff\xd8\xff" + b"\x00" * 44000)  # 44 KB expanding to 440 MB
    lenient, proto = _declaring("image_bytes", types_pb2.DT_STRING, [10000], "score_bytes_lenient")
    proto.string_val.append(b"x" * 44000)
    floats, _ = _declaring("image", types_pb2.DT_FLOAT, [2000, 96, 128, 3], "score_pixels")  # 55 bytes, 295 MB
    content, proto = _declaring("image", types_pb2.DT_FLOAT, [2000, *SIZE, 3], "score_pixels")
    proto.tensor_content = b"\x00" * 16  # four floats of a 36 MB tensor
    return [("strings", strings), ("lenient", lenient), ("floats", floats), ("tensor_content", content)]


def test_requests_declaring_more_than_they_carry_are_refused(stubs):
    predict, _ = stubs
    for name, request in hostile_requests():
        code, details = rpc_error(predict.Predict, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, name
        assert "declares shape" in details and "carries" in details, details
    # More images than the maximum batch, all carried: the graph refuses them.
    tiny = warmup.generated_images(1)[0][1]
    code, details = rpc_error(predict.Predict, bytes_request([tiny] * (export.MAX_BATCH + 1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"at most {export.MAX_BATCH} images" in details


def test_non_finite_pixels_are_refused_over_grpc(stubs):
    predict, _ = stubs
    pixels = np.zeros((2, *SIZE, 3), np.float32)
    pixels[1, 0, 0, 0] = np.nan
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="kiqa", signature_name="score_pixels"))
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(pixels))
    code, details = rpc_error(predict.Predict, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "image[1]: pixels must be finite" in details


def test_lenient_signature_over_grpc_isolates_the_bad_item(stubs):
    predict, _ = stubs
    images = [c for _, c in warmup.generated_images(2)]
    response = predict.Predict(bytes_request([images[0], b"", images[1]], signature="score_bytes_lenient"), timeout=30)
    mos, errors = tf.make_ndarray(response.outputs["mos"]), tf.make_ndarray(response.outputs["error"])
    assert np.isfinite(mos[[0, 2]]).all() and np.isnan(mos[1])
    assert errors[0] == errors[2] == b"" and errors[1].startswith(b"image is empty")


def test_message_limit_defaults_agree():
    from kiqa.contract import CLIENT_MAX_MESSAGE_BYTES

    assert DevServer("x").max_message_bytes == MAX_REQUEST_BYTES == CLIENT_MAX_MESSAGE_BYTES
    assert serve_dev_cli.MAX_MESSAGE_MB * 2**20 == MAX_REQUEST_BYTES


def test_a_broken_newer_version_leaves_the_newest_good_one_serving(base, tmp_path):
    copy = tmp_path / "kiqa"
    shutil.copytree(base, copy)
    (copy / "2").mkdir()
    (copy / "2" / "saved_model.pb").write_bytes(b"not a SavedModel")
    status_request = get_model_status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name="kiqa"))
    images = [c for _, c in warmup.generated_images(2)]
    with DevServer(copy, port=0, warmup=False, max_message_bytes=2**20) as server:
        assert server.available_versions() == [1]
        assert server.predict(bytes_request(images)).model_spec.version.value == 1
        states = {s.version: s for s in server.model_status(status_request).model_version_status}
        assert states[1].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
        assert states[2].state == get_model_status_pb2.ModelVersionStatus.END
        assert "loading" in states[2].status.error_message and str(copy / "2") in states[2].status.error_message
        # Another broken one appears while serving: still version 1, both reported.
        (copy / "3").mkdir()
        assert server.reload() == [1]
        assert {s.version for s in server.model_status(status_request).model_version_status} == {1, 2, 3}
        # A good newer version replaces 1, and the broken ones are no longer listed.
        shutil.copytree(copy / "1", copy / "4")
        assert server.reload() == [4]
        assert [s.version for s in server.model_status(status_request).model_version_status] == [4]
        # The lowered message limit is enforced before the request is read.
        with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 2**23)]) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            code, _ = rpc_error(stub.Predict, bytes_request([b"\x00" * (2**20 + 10)]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


_MEMORY_CHILD = """
import sys
from kiqa.cli.serve_dev import main
main(["--base", sys.argv[1], "--port", "0", "--poll", "0", "--no-warmup"])
"""


def _vm_kb(pid, field):
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_hostile_requests_do_not_grow_the_server(base):
    # One child process runs `kiqa serve-dev`; this process sends it every hostile
    # request over loopback gRPC and reads the child's peak resident set (VmHWM).
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", _MEMORY_CHILD, str(base)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = child.stdout.readline()
        port = re.search(r"on 127\.0\.0\.1:(\d+)", line).group(1)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            predict = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            tiny = [c for _, c in warmup.generated_images(2)]
            for signature in ("serving_default", "score_bytes_lenient"):  # warm every path once
                predict.Predict(bytes_request(tiny, signature=signature), timeout=120)
            pixels = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="kiqa", signature_name="score_pixels"))
            pixels.inputs["image"].CopyFrom(tf.make_tensor_proto(np.zeros((1, *SIZE, 3), np.float32)))
            predict.Predict(pixels, timeout=120)
            over = [("over-batch", bytes_request([tiny[0]] * (export.MAX_BATCH + 1)))]
            for name, request in hostile_requests() + over:
                before = _vm_kb(child.pid, "VmHWM")
                code, _ = rpc_error(predict.Predict, request)
                growth_mb = (_vm_kb(child.pid, "VmHWM") - before) / 1024
                assert code == grpc.StatusCode.INVALID_ARGUMENT, name
                assert growth_mb < 300, f"{name}: peak RSS grew by {growth_mb:.0f} MB"
    finally:
        child.terminate()
        child.wait(timeout=60)
