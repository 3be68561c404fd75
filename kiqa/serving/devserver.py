"""A local development and test server that speaks TF Serving's gRPC API. It is NOT TF Serving.

The real `tensorflow_model_server` cannot be installed on every machine (it has no PyPI
or Debian package here), yet the export and the client must be tried end to end. This
module serves the versions under an export base path with TF Serving's own gRPC
services and protobufs (`tensorflow_serving.apis`): `PredictionService.Predict`,
`PredictionService.GetModelMetadata` and `ModelService.GetModelStatus`, answering with
the status codes TF Serving's sources use for the same situations:

- NOT_FOUND: unknown model name ("Servable not found for request: Latest(name)"),
  unknown or unloaded version, or no versions at all in GetModelStatus.
- FAILED_PRECONDITION: the requested signature is not in the SavedModel.
- INVALID_ARGUMENT: inputs missing, extra or of the wrong dtype, a tensor whose shape
  declares more elements than it carries (refused before it is expanded: TF itself
  would fill it up to the declared shape), a metadata field other than
  "signature_def", and errors the graph raises on bad input (an undecodable image, a
  header over the pixel cap, more than the export's maximum batch, NaN pixels).
- RESOURCE_EXHAUSTED: a message over `max_message_bytes` (128 MiB by default, not TF
  Serving's 2 GiB; see `kiqa.contract.MAX_REQUEST_BYTES`).
- UNIMPLEMENTED: Classify, Regress, MultiInference, HandleReloadConfigRequest, version
  labels.

Like TF Serving it loads the latest version by default (or all, or a given list;
a broken newest version leaves the newest good one serving, and is reported in
GetModelStatus as END with its error),
ignores directories whose names are not integers, replays the version's
`assets.extra/tf_serving_warmup_requests` before marking it AVAILABLE (a failing warmup
fails the load, state END with the error), and returns `mos` as `float_val`, as TF
Serving's Predict does. What it does not do: batching, GPU placement, REST, model
config files, version labels, monitoring, load retries, the op allow list (like TF
Serving, it runs whatever SavedModel it is given), and TF Serving's C++ runtime. Passing here
shows the protocol, signatures and error handling are right; it says nothing about TF
Serving's performance or memory use.

It binds 127.0.0.1 only: it is a developer tool, with no authentication or TLS.
"""

import logging
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from kiqa.contract import ASSETS_EXTRA, BYTES_SIGNATURE, MAX_REQUEST_BYTES, WARMUP_FILE
from kiqa.errors import NoExportError, PortError, ServingError
from kiqa.serving import savedmodel, warmup
from kiqa.tferrors import error_text, without_python_preamble

HOST = "127.0.0.1"
# TF Serving raises gRPC's message limit to INT32_MAX (model_servers/server.cc); this
# server takes kiqa.contract.MAX_REQUEST_BYTES (see there), as kiqa's client sends at most that.
MAX_MESSAGE_BYTES = MAX_REQUEST_BYTES
_log = logging.getLogger(__name__)


class _Abort(Exception):
    """A request failure with the gRPC status code TF Serving would return."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


class _Version:
    """One version directory: its state as GetModelStatus reports it, and the loaded model."""

    def __init__(self, number, path):
        self.number = number
        self.path = path
        self.state = get_model_status_pb2.ModelVersionStatus.LOADING
        self.error_code = 0
        self.error_message = ""
        self.loaded = None
        self.meta_graph = None


class DevServer:
    """Serves one model's SavedModel versions over TF Serving's gRPC API on 127.0.0.1.

    Use it as a context manager in tests:

        with DevServer("export/kiqa") as server:
            client = ServingClient(server.address)

    Args:
        base_path: the model base path (`export/kiqa`); versions are its integer-named
            subdirectories.
        model_name: name clients ask for; None takes the base path's last component.
        port: TCP port on 127.0.0.1; 0 picks a free one (read `port` after `start`).
        versions: "latest" (TF Serving's default policy: the highest version only),
            "all", or a list of version numbers (TF Serving's "specific" policy).
        warmup: replay each version's warmup records before serving it.
        max_workers: request threads.
        max_message_bytes: gRPC's send and receive limit (a larger request is refused
            with RESOURCE_EXHAUSTED before it is read).
    """

    def __init__(
        self, base_path, model_name=None, port=0, versions="latest", warmup=True, max_workers=4,
        max_message_bytes=MAX_MESSAGE_BYTES,
    ):
        self.base_path = Path(base_path)
        self.model_name = model_name or self.base_path.resolve().name
        self.requested_port = int(port)
        self.port = None
        self.warmup = warmup
        self.max_workers = max_workers
        self.max_message_bytes = int(max_message_bytes)
        if versions not in ("latest", "all"):
            versions = sorted(int(v) for v in versions)
        self.version_policy = versions
        self._versions = {}
        self._lock = threading.Lock()
        self._server = None
        self._poller = None
        self._stop_polling = threading.Event()

    # ------------------------------------------------------------------------- lifecycle

    @property
    def address(self):
        """"127.0.0.1:<port>" once started."""
        return f"{HOST}:{self.port}"

    def start(self, poll_seconds=None):
        """Loads the versions and starts serving.

        Args:
            poll_seconds: if set, re-scan the base path this often (TF Serving's
                file_system_poll_wait_seconds option, 1 by default there).

        Returns:
            self.

        Raises:
            NoExportError: the base path is missing.
            PortError: the port cannot be bound.
        """
        if not self.base_path.is_dir():
            raise NoExportError(
                f"export base path {self.base_path} not found; export a model into it first",
                base_path=str(self.base_path),
            )
        self.reload()
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_workers),
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                # One server per port: without this a second server could share the port.
                ("grpc.so_reuseport", 0),
            ],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_PredictionService(self), server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelService(self), server)
        address = f"{HOST}:{self.requested_port}"
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as err:
            port = 0
            reason = str(err)
        else:
            reason = "address in use?"
        if not port:
            raise PortError(f"cannot listen on {address} ({reason}); pick another port", address=address, reason=reason)
        self.port = port
        server.start()
        self._server = server
        if poll_seconds:
            self._stop_polling.clear()
            self._poller = threading.Thread(target=self._poll, args=(poll_seconds,), daemon=True)
            self._poller.start()
        return self

    def stop(self, grace=None):
        """Stops serving (in-flight requests get `grace` seconds)."""
        self._stop_polling.set()
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def wait(self):
        """Blocks until the server stops."""
        if self._server is not None:
            self._server.wait_for_termination()

    def __enter__(self):
        return self.start() if self._server is None else self

    def __exit__(self, *exc):
        self.stop()

    def _poll(self, seconds):
        while not self._stop_polling.wait(seconds):
            try:
                self.reload()
            except Exception:  # a poll must not kill the server; the next one retries
                _log.exception("reloading %s failed", self.base_path)

    # ------------------------------------------------------------------------- versions

    def reload(self):
        """Re-scans the base path: loads wanted new versions, unloads removed ones.

        Returns:
            The version numbers now AVAILABLE.
        """
        on_disk = savedmodel.list_versions(self.base_path)
        with self._lock:
            current = dict(self._versions)
        if self.version_policy == "latest":
            wanted = self._newest_good(on_disk, current)
        else:
            wanted = on_disk if self.version_policy == "all" else [v for v in self.version_policy if v in on_disk]
            for number in wanted:
                if number not in current:
                    current[number] = self._load(number)
        for number in list(current):
            if number not in wanted:
                del current[number]
        with self._lock:
            self._versions = current
        return self.available_versions()

    def _newest_good(self, on_disk, current):
        """The latest policy: the highest version, and, while the highest ones fail to
        load, the next lower ones down to the first that loads. A broken new version
        leaves the last good one serving (as TF Serving keeps it when a new version
        fails) and stays listed, state END with its error, in GetModelStatus. Versions
        are loaded once: a failed one is not retried until it is removed."""
        wanted = []
        for number in reversed(on_disk):
            if number not in current:
                current[number] = self._load(number)
            wanted.append(number)
            if current[number].loaded is not None:
                break
        return wanted

    def available_versions(self):
        """Sorted version numbers in state AVAILABLE."""
        with self._lock:
            return sorted(n for n, v in self._versions.items() if v.loaded is not None)

    def _load(self, number):
        version = _Version(number, self.base_path / str(number))
        try:
            version.meta_graph = savedmodel.read_meta_graph(version.path)
            version.loaded = tf.saved_model.load(str(version.path), tags=["serve"])
            if self.warmup:
                self._replay_warmup(version)
        except Exception as err:  # TF Serving reports any load failure in the version's status
            version.loaded = None
            version.state = get_model_status_pb2.ModelVersionStatus.END
            version.error_code = grpc.StatusCode.UNKNOWN.value[0]
            version.error_message = f"loading {version.path} failed: {err}"
            _log.error("%s", version.error_message)
            return version
        version.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return version

    def _replay_warmup(self, version):
        path = version.path / ASSETS_EXTRA / WARMUP_FILE
        if not path.is_file():
            return
        for log in warmup.read_warmup_file(path):
            if not log.HasField("predict_log"):
                raise ServingError(f"{path}: only predict_log warmup records are supported here")
            try:
                self._run_predict(version, log.predict_log.request)
            except _Abort as err:
                raise ServingError(f"warmup request from {path} failed: {err.message}") from err

    # ------------------------------------------------------------------------- requests

    def _find(self, model_spec):
        if model_spec.name != self.model_name:
            label = f"Specific({model_spec.name}, {model_spec.version.value})" if model_spec.HasField("version") else f"Latest({model_spec.name})"
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {label}")
        if model_spec.version_label:
            raise _Abort(grpc.StatusCode.UNIMPLEMENTED, "version labels are not supported by the kiqa dev server")
        with self._lock:
            available = {n: v for n, v in self._versions.items() if v.loaded is not None}
        if model_spec.HasField("version"):
            version = available.get(model_spec.version.value)
            if version is None:
                raise _Abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"Servable not found for request: Specific({model_spec.name}, {model_spec.version.value})",
                )
            return version
        if not available:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({model_spec.name})")
        return available[max(available)]

    def predict(self, request):
        """Answers a `PredictRequest` (the gRPC handler's body)."""
        version = self._find(request.model_spec)
        return self._run_predict(version, request)

    def _run_predict(self, version, request):
        name = request.model_spec.signature_name or BYTES_SIGNATURE
        if name not in version.meta_graph.signature_def:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{name}" not found.')
        signature = version.meta_graph.signature_def[name]
        expected, sent = set(signature.inputs), set(request.inputs)
        if expected != sent:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
                f"Missing but required: {{{','.join(sorted(expected - sent))}}}.",
            )
        outputs = list(request.output_filter) or sorted(signature.outputs)
        for alias in outputs:
            if alias not in signature.outputs:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output tensor alias not found in signature: {alias} Outputs expected to be "
                    f"in the set {{{','.join(sorted(signature.outputs))}}}.",
                )
        inputs = {}
        for key, proto in request.inputs.items():
            want = signature.inputs[key].dtype
            if proto.dtype != want:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Expects arg[{key}] to be {_dtype_word(want)} but {_dtype_word(proto.dtype)} is provided",
                )
            _check_declared_size(key, proto)
            try:
                inputs[key] = tf.constant(tf.make_ndarray(proto), dtype=tf.dtypes.as_dtype(want))
            except (TypeError, ValueError) as err:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"input {key!r} is not a valid tensor: {err}") from err
        function = version.loaded.signatures[name]
        try:
            result = function(**inputs)
        except tf.errors.OpError as err:
            raise _Abort(_grpc_code(err), without_python_preamble(error_text(err), fallback=type(err).__name__)) from err
        except (TypeError, ValueError) as err:  # shape or rank mismatch caught in Python
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(err).splitlines()[0]) from err
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.model_name
        response.model_spec.version.value = version.number
        response.model_spec.signature_name = name
        for alias in outputs:
            response.outputs[alias].CopyFrom(_as_proto_field(result[alias].numpy()))
        return response

    def model_metadata(self, request):
        """Answers a `GetModelMetadataRequest` (signature_def only, like TF Serving)."""
        if not request.metadata_field:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {field} is not supported")
        version = self._find(request.model_spec)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for key, signature in version.meta_graph.signature_def.items():
            signatures.signature_def[key].CopyFrom(signature)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.model_name
        response.model_spec.version.value = version.number
        response.metadata["signature_def"].Pack(signatures)
        return response

    def model_status(self, request):
        """Answers a `GetModelStatusRequest`."""
        spec = request.model_spec
        with self._lock:
            versions = dict(self._versions) if spec.name == self.model_name else {}
        if spec.HasField("version"):
            version = versions.get(spec.version.value)
            if version is None:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"Could not find version {spec.version.value} of model {spec.name}")
            chosen = [version]
        else:
            if not versions:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}")
            chosen = [versions[n] for n in sorted(versions)]
        response = get_model_status_pb2.GetModelStatusResponse()
        for version in chosen:
            entry = response.model_version_status.add()
            entry.version = version.number
            entry.state = version.state
            entry.status.error_code = version.error_code
            entry.status.error_message = version.error_message
        return response


# ----------------------------------------------------------------------------- gRPC glue


def _handle(context, method, request):
    try:
        return method(request)
    except _Abort as err:
        context.abort(err.code, err.message)


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, server):
        self._server = server

    def Predict(self, request, context):  # noqa: N802 (gRPC's method names)
        return _handle(context, self._server.predict, request)

    def GetModelMetadata(self, request, context):  # noqa: N802
        return _handle(context, self._server.model_metadata, request)


class _ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, server):
        self._server = server

    def GetModelStatus(self, request, context):  # noqa: N802
        return _handle(context, self._server.model_status, request)


def _grpc_code(err):
    """TF's error codes are the canonical gRPC codes, number for number."""
    for code in grpc.StatusCode:
        if code.value[0] == err.error_code:
            return code
    return grpc.StatusCode.UNKNOWN


# The TensorProto field holding each dtype's values when tensor_content is empty.
_VALUE_FIELDS = {
    types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_HALF: "half_val", types_pb2.DT_BFLOAT16: "half_val",
    types_pb2.DT_INT32: "int_val", types_pb2.DT_INT16: "int_val", types_pb2.DT_INT8: "int_val",
    types_pb2.DT_UINT8: "int_val", types_pb2.DT_UINT16: "int_val",
    types_pb2.DT_INT64: "int64_val", types_pb2.DT_UINT32: "uint32_val", types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_BOOL: "bool_val", types_pb2.DT_STRING: "string_val",
    types_pb2.DT_COMPLEX64: "scomplex_val", types_pb2.DT_COMPLEX128: "dcomplex_val",
}


def _check_declared_size(key, proto):
    """Refuses a TensorProto whose shape declares more elements than it carries.

    `tf.make_ndarray` (like TF's own Tensor::FromProto) fills a short repeated field up
    to the declared shape by repeating its last value, and an empty one with zeros: a
    55-byte request declaring [2000, 96, 128, 3] floats expands to 295 MB, a 44 KB one
    declaring 10000 strings to 440 MB. This is checked on the proto, before anything
    is expanded, so memory stays bounded by the message size.
    """
    dims = [int(d.size) for d in proto.tensor_shape.dim]
    if any(d < 0 for d in dims) or proto.tensor_shape.unknown_rank:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"input {key!r} has an unknown or negative dimension: {dims}")
    declared = int(np.prod(dims, dtype=object)) if dims else 1
    if proto.dtype == types_pb2.DT_STRING or not proto.tensor_content:
        field = _VALUE_FIELDS.get(proto.dtype)
        if field is None:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"input {key!r} has unsupported dtype {_dtype_word(proto.dtype)}")
        # Complex values take two numbers each.
        carried = len(getattr(proto, field)) // (2 if "complex" in field else 1)
        unit = "values"
    else:
        carried = len(proto.tensor_content) // tf.dtypes.as_dtype(proto.dtype).size
        unit = f"values in tensor_content ({len(proto.tensor_content)} bytes)"
    if carried != declared:
        raise _Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input {key!r} declares shape {dims} ({declared} elements) but carries {carried} "
            f"{unit}; send every element (this server does not expand short tensors)",
        )


def _dtype_word(enum_value):
    return tf.dtypes.as_dtype(enum_value).name if enum_value else "invalid"


def _as_proto_field(array):
    """A tensor as TF Serving's Predict returns it: typed repeated fields, not tensor_content."""
    array = np.asarray(array)
    if array.dtype == np.float32:
        proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=tf.TensorShape(array.shape).as_proto())
        proto.float_val.extend(array.ravel().tolist())
        return proto
    return tf.make_tensor_proto(array)
