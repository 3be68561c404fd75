"""A gRPC client for kiqa models served by TF Serving.

It uses the `tensorflow-serving-api` stubs: `PredictionService` (Predict,
GetModelMetadata) and `ModelService` (GetModelStatus). Files are sent as encoded bytes to
the `serving_default` signature (`image_bytes` string[-1] -> `mos` float[-1]); the server
decodes and resizes them with the same function training used.

What it takes care of:
- Batching: files go in requests of at most `batch_size` images and `max_batch_bytes`
  bytes (gRPC refuses messages over its limit; TF Serving raises its own to 2 GB, but
  proxies and clients default to 4 MB, so this client raises its limit too).
- Timeouts on every call, so a hung server is an error, not a hang.
- Checks before scoring: a version is AVAILABLE and its signature is the one kiqa
  exports; failures say what is wrong (no server at that address, model not loaded,
  wrong signature) and what to do.
- A bad image does not sink its batch: where the served version has the
  `score_bytes_lenient` signature (kiqa exports since it exists), each batch is one
  Predict whose answer says per image `mos` or `error`. With an older export, TF
  Serving answers the whole request with INVALID_ARGUMENT, so the client finds the
  failing item (the export names it, `image_bytes[i]`; otherwise by retrying items
  one by one), reports it by file name and scores the rest.
- At most `kiqa.contract.MAX_BATCH` images per request (the export refuses more).
"""

import base64
import dataclasses
import json
import re
import time
import urllib.error
import urllib.request
from typing import Optional

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from kiqa.contract import (
    BYTES_INPUT,
    BYTES_SIGNATURE,
    CLIENT_BATCH_SIZE,
    CLIENT_MAX_MESSAGE_BYTES,
    CLIENT_TIMEOUT,
    DEFAULT_MODEL_NAME,
    DEFAULT_SERVER,
    DIST_OUTPUT,
    ERROR_OUTPUT,
    LENIENT_SIGNATURE,
    MAX_BATCH,
    MOS_OUTPUT,
    PROVENANCE_INPUT,
    PROVENANCE_OUTPUT,
    PROVENANCE_SIGNATURE,
    QUALITY_MAP_OUTPUT,
    QUALITY_MAP_SIGNATURE,
    SD_OUTPUT,
)
from kiqa.errors import ImageError, KiqaError, MessageTooLargeError, ServingError, ServingStatusError, SignatureError
from kiqa.tferrors import clean_tf_message
from kiqa.contract import DEFAULT_MAX_BYTES
from kiqa.image import read_image_bytes
# Room for the request's own fields around the image bytes.
_MESSAGE_OVERHEAD = 64 * 1024

_INDEX = re.compile(re.escape(BYTES_INPUT) + r"\[(\d+)\]")
_STATE_NAMES = {value: name for name, value in get_model_status_pb2.ModelVersionStatus.State.items()}


@dataclasses.dataclass(frozen=True)
class ScoreResult:
    """One input's outcome: `mos` on 0-100, or `error` saying why it has none.

    From a distribution model's export (scored through its lenient signature), also
    `mos_sd` (the predicted spread of people's ratings, 0-100 points) and `shares` (the
    predicted shares p1..p5 of the five rating levels); None otherwise.
    """

    name: str
    mos: Optional[float] = None
    error: Optional[str] = None
    too_large: bool = False  # over the client's message limit: never sent
    mos_sd: Optional[float] = None
    shares: Optional[tuple] = None

    @property
    def ok(self):
        return self.error is None


@dataclasses.dataclass(frozen=True)
class VersionStatus:
    """A model version as GetModelStatus reports it."""

    version: int
    state: str
    error_code: int
    error_message: str


class ServingClient:
    """Scores images through a TF Serving endpoint over gRPC.

    Args:
        server: "host:port" of TF Serving's gRPC port (8500 by default; 8501 is REST).
        model_name: the model's name in models.config.
        version: a specific version number, or None for the latest AVAILABLE one.
        signature_name: the bytes signature kiqa exports.
        timeout: seconds allowed per call.
        max_message_bytes: gRPC send/receive limit of this client.

    Raises:
        ServingError: `server` is not "host:port".
    """

    def __init__(
        self,
        server=DEFAULT_SERVER,
        model_name=DEFAULT_MODEL_NAME,
        version=None,
        signature_name=BYTES_SIGNATURE,
        timeout=CLIENT_TIMEOUT,
        max_message_bytes=CLIENT_MAX_MESSAGE_BYTES,
    ):
        host, _, port = str(server).rpartition(":")
        if not host or not port.isdigit():
            raise ServingError(f"server must be host:port (e.g. localhost:8500), got {server!r}")
        if timeout <= 0:
            raise ServingError(f"timeout must be positive seconds, got {timeout}")
        self.server = server
        self.model_name = model_name
        self.version = None if version is None else int(version)
        self.signature_name = signature_name
        self.timeout = float(timeout)
        self.max_message_bytes = int(max_message_bytes)
        self._channel = grpc.insecure_channel(
            server,
            options=[
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
            ],
        )
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._lenient = None  # the lenient signature's name once known, "" when absent
        self._lenient_outputs = None  # its outputs (a regression or a distribution model's)

    def close(self):
        """Closes the channel."""
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------- status

    def _model_spec(self, signature=False):
        spec = model_pb2.ModelSpec(name=self.model_name)
        if self.version is not None:
            spec.version.value = self.version
        if signature:
            spec.signature_name = self.signature_name
        return spec

    def model_status(self):
        """The model's versions and their states (GetModelStatus).

        Returns:
            list of `VersionStatus`, by version.

        Raises:
            ServingError: no server, unknown model or version, timeout.
        """
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=self._model_spec())
        response = self._call(self._models.GetModelStatus, request, "GetModelStatus")
        return sorted(
            (
                VersionStatus(
                    version=int(s.version),
                    state=_STATE_NAMES.get(s.state, str(s.state)),
                    error_code=int(s.status.error_code),
                    error_message=s.status.error_message,
                )
                for s in response.model_version_status
            ),
            key=lambda s: s.version,
        )

    def _signature_defs(self):
        """(served version number, SignatureDefMap) from GetModelMetadata."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=self._model_spec(), metadata_field=["signature_def"]
        )
        response = self._call(self._predict.GetModelMetadata, request, "GetModelMetadata")
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        return int(response.model_spec.version.value), signatures

    def signature(self):
        """The served version's signature this client calls (GetModelMetadata).

        Returns:
            (version number, {"inputs": {key: [dtype, shape]}, "outputs": {...}}).

        Raises:
            ServingError: no server, model or version; or no such signature
                (FAILED_PRECONDITION, as Predict would answer).
        """
        version, signatures = self._signature_defs()
        if self.signature_name not in signatures.signature_def:
            names = sorted(k for k in signatures.signature_def if not k.startswith("__"))
            raise SignatureError(
                f"model {self.model_name!r} version {version} at "
                f"{self.server} has no signature {self.signature_name!r} (Predict would answer FAILED_PRECONDITION); "
                f"it has {names}. Ask for one of them, or re-export the model",
                server=self.server, model=self.model_name, version=version, signature=self.signature_name,
                available=names, problem="missing",
            )
        self._lenient, self._lenient_outputs = _lenient_outputs(self.signature_name, signatures)
        return version, _describe(signatures.signature_def[self.signature_name])

    @property
    def lenient(self):
        """Whether batches go to the lenient signature (one bad image costs nothing).

        True when this client calls `serving_default` and the served version also has
        `score_bytes_lenient` (kiqa exports since that signature was added), or when it
        calls the lenient signature itself. Asked once (GetModelMetadata), then cached;
        reset when the server stops knowing the signature (a roll-back to an old export).
        """
        if self._lenient is None:
            self._lenient, self._lenient_outputs = _lenient_outputs(self.signature_name, self._signature_defs()[1])
        return bool(self._lenient)

    def check(self):
        """Checks that a version is AVAILABLE and has kiqa's bytes signature.

        Returns:
            dict with "version" (the one requests go to), "versions" (all
            `VersionStatus`), "signature" and "lenient" (whether batches go to the
            lenient signature).

        Raises:
            ServingError: saying what is wrong: no server at the address, model or
                version not loaded (and each version's state and error), or a signature
                other than `image_bytes` string[-1] -> `mos` float[-1].
        """
        versions = self.model_status()
        available = [s.version for s in versions if s.state == "AVAILABLE"]
        if not available:
            states = "; ".join(
                f"version {s.version} is {s.state}" + (f" ({s.error_message})" if s.error_message else "")
                for s in versions
            )
            raise ServingError(
                f"model {self.model_name!r} at {self.server} has no AVAILABLE version: {states}. "
                f"Wait for loading to finish, or read the server's log for the load error"
            )
        version, signature = self.signature()
        want_in = {BYTES_INPUT: ["string", [-1]]}
        got_out = signature["outputs"].get(MOS_OUTPUT)
        if signature["inputs"] != want_in or got_out is None or got_out[0] != "float32":
            raise SignatureError(
                f"model {self.model_name!r} version {version} at {self.server}: signature "
                f"{self.signature_name!r} is {signature['inputs']} -> {signature['outputs']}, but kiqa "
                f"sends {BYTES_INPUT}: string[-1] and reads {MOS_OUTPUT}: float[-1]. Is this a kiqa "
                f"export? Re-export it, or ask for the right model and signature",
                server=self.server, model=self.model_name, version=version, signature=self.signature_name,
                available=(), problem="mismatch",
            )
        return {"version": version, "versions": versions, "signature": signature, "lenient": self.lenient}

    def provenance(self):
        """The served model's provenance record, from its `provenance` signature.

        Returns:
            A `kiqa.provenance.Provenance`, or None when the served version has no
            record (an export made before kiqa wrote them answers FAILED_PRECONDITION
            for the missing signature, a newer one without a record answers "").

        Raises:
            ServingError: no server, model or version, a timeout, or a record that is
                not valid JSON.
        """
        from kiqa.provenance import Provenance

        spec = self._model_spec()
        spec.signature_name = PROVENANCE_SIGNATURE
        request = predict_pb2.PredictRequest(model_spec=spec, output_filter=[PROVENANCE_OUTPUT])
        request.inputs[PROVENANCE_INPUT].CopyFrom(tf.make_tensor_proto(["kiqa"], dtype=tf.string, shape=[1]))
        try:
            response = self._predict.Predict(request, timeout=self.timeout)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                return None
            raise self._error(err, "Predict (provenance)") from err
        values = tf.make_ndarray(response.outputs[PROVENANCE_OUTPUT]).reshape(-1)
        text = values[0].decode("utf-8") if values.size else ""
        if not text:
            return None
        try:
            return Provenance.from_json(text, source=f"the provenance of model {self.model_name!r} at {self.server}")
        except KiqaError as err:
            raise ServingError(str(err)) from err

    def quality_map(self, contents, name="image"):
        """The served model's quality map of one encoded image (its `quality_map` signature).

        One image per request: a map request costs what a score request costs, and a bad
        image fails only its own request.

        Args:
            contents: encoded image bytes.
            name: what to call the image in error messages.

        Returns:
            (mos, float32 map [rows, cols] of local MOS on 0-100; its mean is `mos`).

        Raises:
            ImageError: the server rejected the image (INVALID_ARGUMENT), naming why.
            ServingError: no server, model or version, a timeout, or an export without
                the `quality_map` signature (FAILED_PRECONDITION).
        """
        spec = self._model_spec()
        spec.signature_name = QUALITY_MAP_SIGNATURE
        request = predict_pb2.PredictRequest(model_spec=spec, output_filter=[MOS_OUTPUT, QUALITY_MAP_OUTPUT])
        request.inputs[BYTES_INPUT].CopyFrom(tf.make_tensor_proto([contents], dtype=tf.string, shape=[1]))
        try:
            response = self._predict.Predict(request, timeout=self.timeout)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ImageError(self._rejection(name, err.details() or "")) from err
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise ServingError(
                    f"model {self.model_name!r} at {self.server} has no {QUALITY_MAP_SIGNATURE!r} "
                    f"signature (exported before kiqa had maps, or its head is not affine); export it again"
                ) from err
            raise self._error(err, "Predict (quality_map)") from err
        mos = tf.make_ndarray(response.outputs[MOS_OUTPUT]).reshape(-1)
        values = tf.make_ndarray(response.outputs[QUALITY_MAP_OUTPUT])
        if mos.shape[0] != 1 or values.ndim != 3 or values.shape[0] != 1:
            raise ServingError(
                f"model {self.model_name!r} at {self.server} answered {QUALITY_MAP_SIGNATURE!r} with "
                f"mos {list(mos.shape)} and map {list(values.shape)} for one image"
            )
        return float(mos[0]), values[0].astype(np.float32)

    # ------------------------------------------------------------------------- scoring

    def score_bytes(self, contents, names=None):
        """Scores encoded images in one Predict request.

        Args:
            contents: list of encoded image bytes.
            names: optional names for error messages (default `image_bytes[i]`).

        Returns:
            float32 numpy array [len(contents)] of MOS on 0-100.

        Raises:
            ServingError: the server rejected the request; an INVALID_ARGUMENT names the
                failing input(s) and why.
        """
        contents = list(contents)
        names = list(names) if names is not None else [f"{BYTES_INPUT}[{i}]" for i in range(len(contents))]
        results = self._score_batch(contents, names)
        failed = [r for r in results if not r.ok]
        if failed:
            raise ServingError("; ".join(r.error for r in failed))
        return np.array([r.mos for r in results], dtype=np.float32)

    def score_files(self, paths, batch_size=CLIENT_BATCH_SIZE, max_file_bytes=DEFAULT_MAX_BYTES, progress=None):
        """Scores image files in batches; a bad file is reported, not fatal.

        Args:
            paths: image files.
            batch_size: images per request (match TF Serving's max_batch_size).
            max_file_bytes: files larger than this are refused without sending.
            progress: optional callable(number of files done) called after each batch.

        Returns:
            list of `ScoreResult`, in the order of `paths`.

        Raises:
            ServingError: a failure that is not one file's fault (no server, model not
                loaded, timeout, wrong signature).
        """
        if not 1 <= batch_size <= MAX_BATCH:
            raise ServingError(
                f"batch_size must be 1 to {MAX_BATCH} (the most images a kiqa export takes in "
                f"one request), got {batch_size}"
            )
        limit = self.max_message_bytes - _MESSAGE_OVERHEAD
        results = {}
        pending = []  # (index, name, bytes)
        pending_bytes = 0
        done = 0

        def flush():
            nonlocal pending, pending_bytes, done
            if not pending:
                return
            scored = self._score_batch([c for _, _, c in pending], [n for _, n, _ in pending])
            for (index, _, _), result in zip(pending, scored):
                results[index] = result
            done += len(pending)
            pending, pending_bytes = [], 0
            if progress is not None:
                progress(done)

        for index, path in enumerate(paths):
            name = str(path)
            try:
                contents = read_image_bytes(path, max_bytes=max_file_bytes)
            except ImageError as err:
                results[index] = ScoreResult(name, error=str(err))
                continue
            if len(contents) > limit:
                results[index] = ScoreResult(
                    name,
                    error=f"{name}: {len(contents)} bytes is over this client's {self.max_message_bytes}-byte "
                    f"message limit",
                    too_large=True,
                )
                continue
            if len(pending) >= batch_size or pending_bytes + len(contents) > limit:
                flush()
            pending.append((index, name, contents))
            pending_bytes += len(contents)
        flush()
        return [results[i] for i in range(len(results))]

    def _score_batch(self, contents, names):
        """One round trip per batch where the server has the lenient signature; else
        serving_default with `_score_isolating`'s retries."""
        if contents and self.lenient:
            try:
                return self._predict_lenient(contents, names)
            except _MissingSignature:
                self._lenient = None  # the served version changed (a roll-back?): ask again
            except _Rejected as err:
                # Only the whole request can be refused here (over MAX_BATCH, a
                # malformed tensor): no image is to blame.
                raise ServingError(self._rejection(f"a batch of {len(contents)} images", err.details)) from err
        return self._score_isolating(contents, names)

    def _predict_lenient(self, contents, names):
        # A distribution model's lenient signature also has mos_sd and dist (see `_lenient_outputs`).
        distribution = self._lenient_outputs == _DISTRIBUTION_OUTPUTS
        extras = [SD_OUTPUT, DIST_OUTPUT] if distribution else []
        request = predict_pb2.PredictRequest(model_spec=self._model_spec(),
                                             output_filter=[MOS_OUTPUT, ERROR_OUTPUT, *extras])
        request.model_spec.signature_name = self._lenient
        request.inputs[BYTES_INPUT].CopyFrom(tf.make_tensor_proto(contents, dtype=tf.string, shape=[len(contents)]))
        response = self._send(request, len(contents), (MOS_OUTPUT, ERROR_OUTPUT) + ((SD_OUTPUT,) if distribution else ()))
        scores = tf.make_ndarray(response.outputs[MOS_OUTPUT]).reshape(-1)
        errors = tf.make_ndarray(response.outputs[ERROR_OUTPUT]).reshape(-1)
        if errors.shape[0] != len(contents):
            raise ServingError(
                f"model {self.model_name!r} at {self.server} returned {errors.shape[0]} errors for "
                f"{len(contents)} images"
            )
        if distribution:
            spreads = tf.make_ndarray(response.outputs[SD_OUTPUT]).reshape(-1)
            shares = tf.make_ndarray(response.outputs[DIST_OUTPUT]).reshape(len(contents), -1)
        return [
            ScoreResult(name, error=f"{name}: {error.decode('utf-8', 'replace')}") if error
            else ScoreResult(name, mos=float(score), **(dict(
                mos_sd=float(spreads[i]), shares=tuple(float(v) for v in shares[i])) if distribution else {}))
            for i, (name, score, error) in enumerate(zip(names, scores, errors))
        ]

    def _score_isolating(self, contents, names):
        """Scores a batch; on INVALID_ARGUMENT, finds the bad items and scores the rest."""
        results = [None] * len(contents)
        todo = list(range(len(contents)))
        while todo:
            try:
                scores = self._predict_once([contents[i] for i in todo])
            except _Rejected as err:
                culprit = err.index
                if culprit is not None and culprit < len(todo):
                    bad = todo[culprit]
                    results[bad] = ScoreResult(names[bad], error=self._rejection(names[bad], err.details))
                    todo = [i for i in todo if i != bad]
                    continue
                if len(todo) == 1:
                    results[todo[0]] = ScoreResult(names[todo[0]], error=self._rejection(names[todo[0]], err.details))
                    break
                # The message names no item: find the bad ones by sending each alone.
                for i in todo:
                    results[i] = self._score_isolating([contents[i]], [names[i]])[0]
                break
            for i, score in zip(todo, scores):
                results[i] = ScoreResult(names[i], mos=float(score))
            break
        return results

    def _predict_once(self, contents):
        request = predict_pb2.PredictRequest(model_spec=self._model_spec(signature=True), output_filter=[MOS_OUTPUT])
        request.inputs[BYTES_INPUT].CopyFrom(tf.make_tensor_proto(contents, dtype=tf.string, shape=[len(contents)]))
        return tf.make_ndarray(self._send(request, len(contents), (MOS_OUTPUT,)).outputs[MOS_OUTPUT]).reshape(-1)

    def _send(self, request, count, outputs):
        """Predict; INVALID_ARGUMENT and FAILED_PRECONDITION become `_Rejected`, every
        output must be there and hold one value per image."""
        try:
            response = self._predict.Predict(request, timeout=self.timeout)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                match = _INDEX.search(err.details() or "")
                raise _Rejected(int(match.group(1)) if match else None, err.details() or "") from err
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION and request.model_spec.signature_name == self._lenient:
                raise _MissingSignature(err.details() or "") from err
            raise self._error(err, "Predict") from err
        for output in outputs:
            if output not in response.outputs:
                raise ServingError(
                    f"model {self.model_name!r} at {self.server} answered without a {output!r} output "
                    f"(outputs: {sorted(response.outputs)}); is this a kiqa export?"
                )
            got = int(np.prod([d.size for d in response.outputs[output].tensor_shape.dim]))
            if got != count:
                raise ServingError(
                    f"model {self.model_name!r} at {self.server} returned {got} values of {output!r} "
                    f"for {count} images"
                )
        return response

    def _rejection(self, name, details):
        reason = clean_tf_message(details, fallback="no reason given")
        reason = _INDEX.sub("", reason, count=1).lstrip(": ").strip()
        return f"{name}: rejected by TF Serving (INVALID_ARGUMENT): {reason}"

    def _call(self, method, request, action):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as err:
            raise self._error(err, action) from err

    def _error(self, err, action):
        """A ServingError saying what went wrong and what to do, from a gRPC error."""
        code, details = err.code(), (err.details() or "").strip()
        model = f"model {self.model_name!r}" + (f" version {self.version}" if self.version is not None else "")
        if code == grpc.StatusCode.UNAVAILABLE and "queue" in details.lower():
            code = "QUEUE_FULL"  # TF Serving's batching answers UNAVAILABLE too
        template = _ERROR_MESSAGES.get(code, "{action} on {model} at {server} failed ({code}: {details})")
        message = template.format(action=action, model=model, server=self.server, details=details,
                                  timeout=self.timeout, signature=self.signature_name,
                                  code=getattr(code, "name", code))
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return MessageTooLargeError(message, limit=self.max_message_bytes)
        return ServingStatusError(message, code=getattr(code, "name", code), server=self.server,
                                  model=self.model_name, signature=self.signature_name, timeout=self.timeout)


# What each gRPC failure means here, and what to do about it (in the client's arguments:
# kiqa.cli.remedies names the flags, from the error's `code`).
_ERROR_MESSAGES = {
    "QUEUE_FULL": "TF Serving at {server} is overloaded: its batching queue is full ({details}); retry "
    "later, send fewer requests at once, or raise max_enqueued_batches",
    grpc.StatusCode.UNAVAILABLE: "no TF Serving at {server} ({details}). Start TF Serving (serving/README.md), or "
    "kiqa's loopback stand-in for a local test (`kiqa.serving.devserver`, not for production); or "
    "check the address: TF Serving's gRPC port is 8500 by default (8501 is REST)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "TF Serving at {server} did not answer {action} within {timeout:g} s; "
    "allow more time (a version's first requests can be slow) or check the server's load",
    grpc.StatusCode.NOT_FOUND: "{model} is not loaded at {server} (NOT_FOUND: {details}). Check the model "
    "name against the one in models.config, and the versions' states",
    grpc.StatusCode.FAILED_PRECONDITION: "{model} at {server} refused {action} (FAILED_PRECONDITION: "
    "{details}); the signature {signature!r} may be missing: ask for another or re-export",
    # The flags that fix this are the CLI's to name (kiqa predict): MessageTooLargeError.
    grpc.StatusCode.RESOURCE_EXHAUSTED: "{action} to {server} hit a size or memory limit "
    "(RESOURCE_EXHAUSTED: {details}); send fewer images per request or raise the client's "
    "message limit",
}


class _MissingSignature(Exception):
    """The served version has no lenient signature (any more)."""


class _Rejected(Exception):
    """A Predict answered INVALID_ARGUMENT; `index` is the named item, if any."""

    def __init__(self, index, details):
        super().__init__(details)
        self.index = index
        self.details = details


def _describe(signature):
    """A SignatureDef's inputs and outputs as {"inputs": {key: [dtype, shape]}, ...}."""
    def describe(infos):
        return {
            key: [tf.dtypes.as_dtype(info.dtype).name, [int(d.size) for d in info.tensor_shape.dim]]
            for key, info in sorted(infos.items())
        }

    return {"inputs": describe(signature.inputs), "outputs": describe(signature.outputs)}


_REGRESSION_OUTPUTS = {ERROR_OUTPUT: ["string", [-1]], MOS_OUTPUT: ["float32", [-1]]}
_DISTRIBUTION_OUTPUTS = {**_REGRESSION_OUTPUTS, SD_OUTPUT: ["float32", [-1]], DIST_OUTPUT: ["float32", [-1, 5]]}


def _lenient_outputs(signature_name, signatures):
    """(the lenient signature's name or "", its outputs: a regression or a distribution
    model's, or None)."""
    name = LENIENT_SIGNATURE if signature_name == BYTES_SIGNATURE else signature_name
    if name != LENIENT_SIGNATURE or name not in signatures.signature_def:
        return "", None
    found = _describe(signatures.signature_def[name])
    if found["inputs"] != {BYTES_INPUT: ["string", [-1]]}:
        return "", None
    for outputs in (_REGRESSION_OUTPUTS, _DISTRIBUTION_OUTPUTS):
        if found["outputs"] == dict(sorted(outputs.items())):
            return name, outputs
    return "", None


# ----------------------------------------------------------------------------- REST and waiting
# TF Serving's REST predict and the wait for a new version to load (the notebooks use them).


def rest_predict(address, contents, model_name=DEFAULT_MODEL_NAME, version=None,
                 signature_name=BYTES_SIGNATURE, timeout=30.0):
    """Scores encoded images through TF Serving's REST API (port 8501 by default).

    Sends `{"signature_name": ..., "instances": [{"b64": ...}, ...]}` to
    `POST /v1/models/<name>[/versions/<v>]:predict`: the bytes signature has a single
    input, so each instance is the base64-encoded file, as TF Serving's REST API
    requires for binary strings. TF Serving answers `{"predictions": [mos, ...]}`
    (one named output, so no names), or `{"error": ...}` with an HTTP error status.

    Args:
        address: "http://host:port" (a bare "host:port" gets "http://").
        contents: list of encoded image bytes.
        model_name: the served model's name.
        version: a version number, or None for the latest.
        signature_name: the bytes signature kiqa exports.
        timeout: seconds for the whole request.

    Returns:
        float32 numpy array of MOS, one per image.

    Raises:
        ServingError: no server, an HTTP error (with TF Serving's message), or an
            answer without one prediction per image.
    """
    base = address if "://" in address else f"http://{address}"
    url = f"{base.rstrip('/')}/v1/models/{model_name}"
    if version is not None:
        url += f"/versions/{int(version)}"
    url += ":predict"
    body = json.dumps({
        "signature_name": signature_name,
        "instances": [{"b64": base64.b64encode(bytes(c)).decode("ascii")} for c in contents],
    }).encode("utf-8")
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as err:
        detail = _rest_error_text(err.read().decode("utf-8", errors="replace"))
        raise ServingError(f"REST predict at {url} failed with HTTP {err.code}: {detail}") from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ServingError(
            f"no REST answer from {url} ({reason}); TF Serving's REST port is 8501 by default "
            "(its rest_api_port option), its gRPC port 8500"
        ) from err
    except ValueError as err:
        raise ServingError(f"REST predict at {url} did not answer JSON: {err}") from err
    predictions = answer.get("predictions") if isinstance(answer, dict) else None
    if not isinstance(predictions, list) or len(predictions) != len(contents):
        raise ServingError(
            f"REST predict at {url} answered {str(answer)[:200]!r}; expected "
            f"{{\"predictions\": [...]}} with {len(contents)} scores"
        )
    return np.asarray(predictions, dtype=np.float32).reshape(-1)


def _rest_error_text(body):
    """TF Serving's `{"error": ...}` message, or the body itself when it is not that JSON."""
    try:
        answer = json.loads(body)
    except ValueError:
        return body
    return answer.get("error", body) if isinstance(answer, dict) else body


def wait_until_available(client, version, timeout=60.0, poll=1.0):
    """Waits until a served model reports `version` AVAILABLE (TF Serving loads new
    versions from its base path on its own schedule, once a second by default).

    Args:
        client: a `ServingClient`.
        version: the version number to wait for.
        timeout: seconds to wait.
        poll: seconds between status calls.

    Returns:
        The list of `VersionStatus` once `version` is AVAILABLE.

    Raises:
        ServingError: the version failed to load (its error), or `timeout` passed.
    """

    deadline = time.monotonic() + timeout
    last = "no status yet"
    while True:
        try:
            statuses = client.model_status()
        except ServingError as err:
            statuses, last = [], str(err)
        for status in statuses:
            if status.version == int(version):
                if status.state == "AVAILABLE":
                    return statuses
                if status.state == "END" and status.error_message:
                    raise ServingError(
                        f"version {version} of {client.model_name!r} at {client.server} failed to load: "
                        f"{status.error_message}"
                    )
                last = f"version {version} is {status.state}"
        if time.monotonic() >= deadline:
            raise ServingError(
                f"version {version} of {client.model_name!r} at {client.server} was not AVAILABLE "
                f"after {timeout:g} s ({last}); is the server watching the export base path?"
            )
        time.sleep(poll)
