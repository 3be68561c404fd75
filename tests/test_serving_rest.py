"""Tests for kiqa.serving.client's REST predict and its wait for a version to load."""

import base64
import http.server
import json
import threading

import numpy as np
import pytest

from helpers import send_json
from kiqa.errors import ServingError
from kiqa.serving import client as serving_client
from kiqa.serving.client import VersionStatus


class FakeRest(http.server.BaseHTTPRequestHandler):
    """Answers like TF Serving's REST predict: checks the request, scores = byte counts."""

    requests = []

    def do_POST(self):  # noqa: N802 (http.server's method names)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeRest.requests.append((self.path, body))
        if not self.path.startswith("/v1/models/kiqa") or not self.path.endswith(":predict"):
            return self._answer(404, {"error": f"Servable not found for request: {self.path}"})
        instances = body.get("instances")
        if body.get("signature_name") != "serving_default" or not all(set(i) == {"b64"} for i in instances):
            return self._answer(400, {"error": "bad request format"})
        sizes = [len(base64.b64decode(i["b64"])) for i in instances]
        if self.path.startswith("/v1/models/kiqa/versions/9"):
            sizes = sizes[:-1]  # a wrong answer: one score short
        self._answer(200, {"predictions": [float(s) for s in sizes]})

    def _answer(self, code, payload):
        send_json(self, code, payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def rest_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeRest)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeRest.requests = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_rest_predict_sends_tf_serving_rest_format(rest_server):
    contents = [b"\xff\xd8abc", b"\x89PNG" * 10]
    scores = serving_client.rest_predict(rest_server, contents)
    assert scores.dtype == np.float32
    assert scores.tolist() == [float(len(c)) for c in contents] == [5.0, 40.0]
    path, body = FakeRest.requests[-1]
    assert path == "/v1/models/kiqa:predict"
    assert [base64.b64decode(i["b64"]) for i in body["instances"]] == contents
    serving_client.rest_predict(rest_server.removeprefix("http://"), contents, version=3)
    assert FakeRest.requests[-1][0] == "/v1/models/kiqa/versions/3:predict"


def test_rest_predict_errors_say_what_happened(rest_server):
    with pytest.raises(ServingError, match="HTTP 404: Servable not found"):
        serving_client.rest_predict(rest_server, [b"x"], model_name="other")
    with pytest.raises(ServingError, match="with 2 scores"):
        serving_client.rest_predict(rest_server, [b"x", b"y"], version=9)
    closed = rest_server.rsplit(":", 1)[0] + ":1"
    with pytest.raises(ServingError, match="REST port is 8501"):
        serving_client.rest_predict(closed, [b"x"], timeout=5)


class FakeClient:
    """Stands in for ServingClient.model_status: plays back a list of answers."""

    model_name, server = "kiqa", "host:8500"

    def __init__(self, answers):
        self.answers = list(answers)

    def model_status(self):
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def status(version, state, message=""):
    return VersionStatus(version=version, state=state, error_code=0, error_message=message)


def test_wait_until_available_polls_until_the_version_loads():
    client = FakeClient([ServingError("no model yet"), [status(1, "AVAILABLE")], [status(1, "AVAILABLE"), status(2, "LOADING")],
                         [status(2, "AVAILABLE")]])
    assert serving_client.wait_until_available(client, 2, timeout=60, poll=0) == [status(2, "AVAILABLE")]
    assert client.answers == [[status(2, "AVAILABLE")]]


def test_wait_until_available_reports_a_failed_load_and_a_timeout():
    failed = FakeClient([[status(2, "END", "Could not find meta graph def")]])
    with pytest.raises(ServingError, match="failed to load: Could not find meta graph def"):
        serving_client.wait_until_available(failed, 2, timeout=60, poll=0)
    loading = FakeClient([[status(2, "LOADING")]])
    with pytest.raises(ServingError, match=r"not AVAILABLE after 0 s \(version 2 is LOADING\)"):
        serving_client.wait_until_available(loading, 2, timeout=0, poll=0)
