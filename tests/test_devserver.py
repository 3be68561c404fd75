"""Tests for kiqa.serving.devserver, the local TF-Serving-API stand-in, through the raw gRPC stubs."""

import os
import shutil

import grpc
import numpy as np
import pytest
import tensorflow as tf
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

from kiqa.serving import export
from kiqa.cli import serve_dev as serve_dev_cli
from kiqa.serving.devserver import DevServer
from kiqa.errors import ServingError




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
    images = [c for _, c in export.generated_images(3)]
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
    good = [export.generated_images(1)[0][1]]
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
    export.write_warmup_file(copy / "1" / "assets.extra" / "tf_serving_warmup_requests", [log])
    with DevServer(copy, port=0) as server:
        assert server.available_versions() == []
        status = server.model_status(
            get_model_status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name="kiqa"))
        )
    entry = status.model_version_status[0]
    assert entry.state == get_model_status_pb2.ModelVersionStatus.END
    assert "warmup request" in entry.status.error_message and "image format not recognised" in entry.status.error_message


def test_missing_base_path_is_an_error(tmp_path):
    with pytest.raises(ServingError, match="export base path .* not found"):
        DevServer(tmp_path / "nothing").start()


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
