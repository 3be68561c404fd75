"""Tests for kiqa.serving.client and `kiqa predict`, end to end against the dev server.

The server is kiqa.serving.devserver (TF Serving's gRPC services and protobufs over the exported
SavedModel, on 127.0.0.1, ephemeral port), not TF Serving itself: see serving/README.md
for what that does and does not prove.
"""

import csv
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from helpers import write_generated_images
from kiqa.serving import export
from kiqa.cli import predict as predict_cli
from kiqa.serving.devserver import DevServer
from kiqa.errors import ServingError, ServingStatusError, SignatureError
from kiqa.serving.client import ServingClient

CORRUPT = b"\xff\xd8\xff\xe0 a JPEG that stops here"




@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Seven generated image files and one corrupt JPEG, in that order."""
    folder = tmp_path_factory.mktemp("images")
    paths = [folder / name for name in write_generated_images(folder, 7, seed=3)]
    (folder / "corrupt.jpg").write_bytes(CORRUPT)
    return paths, folder / "corrupt.jpg"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def direct_scores(base):
    """Scores from the exported SavedModel itself, without the server."""
    loaded = tf.saved_model.load(str(base / "1"))
    return lambda contents: loaded.signatures["serving_default"](image_bytes=tf.constant(contents))["mos"].numpy()


def test_check_reports_version_and_signature(server):
    with ServingClient(server.address, timeout=30) as client:
        info = client.check()
    assert info["version"] == 1
    assert [(s.version, s.state) for s in info["versions"]] == [(1, "AVAILABLE")]
    assert info["signature"] == {"inputs": {"image_bytes": ["string", [-1]]}, "outputs": {"mos": ["float32", [-1]]}}


def test_score_files_in_batches_matches_the_savedmodel(server, direct_scores, images, monkeypatch):
    paths, corrupt = images
    with ServingClient(server.address, timeout=30) as client:
        requests = []
        real_send = client._send
        monkeypatch.setattr(client, "_send", lambda request, count, outputs: requests.append(count) or real_send(request, count, outputs))
        results = client.score_files(paths, batch_size=3)
        assert client.lenient
    assert requests == [3, 3, 1]
    assert [r.name for r in results] == [str(p) for p in paths]
    assert all(r.ok for r in results)
    expected = direct_scores([p.read_bytes() for p in paths])
    np.testing.assert_allclose([r.mos for r in results], expected, rtol=0, atol=1e-4)


def test_corrupt_file_is_named_and_the_rest_are_scored_in_one_round_trip(server, direct_scores, images, monkeypatch):
    paths, corrupt = images
    files = [paths[0], corrupt, paths[1], paths[2]]
    with ServingClient(server.address, timeout=30) as client:
        calls = []
        real_send = client._send
        monkeypatch.setattr(client, "_send", lambda *args: calls.append(args[0].model_spec.signature_name) or real_send(*args))
        results = client.score_files(files, batch_size=4)
    assert calls == ["score_bytes_lenient"]  # the bad file cost the others nothing
    assert [r.ok for r in results] == [True, False, True, True]
    # The words `kiqa score` writes for the same file.
    assert results[1].error == f"{corrupt}: JPEG header is unreadable (truncated or malformed, {len(CORRUPT)} bytes); re-encode the file, e.g. as PNG"
    expected = direct_scores([paths[0].read_bytes(), paths[1].read_bytes(), paths[2].read_bytes()])
    np.testing.assert_allclose([results[i].mos for i in (0, 2, 3)], expected, rtol=0, atol=1e-4)


def test_score_bytes_raises_naming_the_bad_input(server, images):
    paths, _ = images
    with ServingClient(server.address, timeout=30) as client:
        scores = client.score_bytes([paths[0].read_bytes(), paths[1].read_bytes()])
        assert scores.shape == (2,) and scores.dtype == np.float32
        with pytest.raises(ServingError, match=r"^upload-2\.png: image format not recognised"):
            client.score_bytes([paths[0].read_bytes(), b"plain text"], names=["upload-1.jpg", "upload-2.png"])


def test_unknown_model_is_not_found(server):
    with ServingClient(server.address, model_name="resnet", timeout=30) as client:
        with pytest.raises(ServingError, match=r"model 'resnet' is not loaded at 127\.0\.0\.1:\d+ \(NOT_FOUND"):
            client.check()
        with pytest.raises(ServingError, match=r"NOT_FOUND: Servable not found for request: Latest\(resnet\)"):
            client.score_bytes([b"x"])


def test_unknown_version_is_not_found(server):
    with ServingClient(server.address, version=9, timeout=30) as client:
        with pytest.raises(ServingError, match=r"model 'kiqa' version 9 is not loaded.*NOT_FOUND"):
            client.check()


def test_wrong_signature_is_explained(server, images):
    paths, _ = images
    with ServingClient(server.address, signature_name="predict", timeout=30) as client:
        with pytest.raises(ServingError, match=r"has no signature 'predict'.*\['provenance', 'quality_map', 'score_bytes_lenient', 'score_pixels', 'serving_default'\]"):
            client.check()
        with pytest.raises(ServingError, match=r"FAILED_PRECONDITION: Serving signature key \"predict\" not found"):
            client.score_bytes([paths[0].read_bytes()])
    # The pixel signature exists but is not one this client can send bytes to.
    with ServingClient(server.address, signature_name="score_pixels", timeout=30) as client:
        with pytest.raises(SignatureError, match=r"signature 'score_pixels' is .*image.*kiqa sends image_bytes") as err:
            client.check()
        assert (err.value.signature, err.value.problem) == ("score_pixels", "mismatch")


def test_server_down_is_a_clear_error():
    port = free_port()
    with ServingClient(f"127.0.0.1:{port}", timeout=5) as client:
        with pytest.raises(ServingStatusError, match=rf"^no TF Serving at 127\.0\.0\.1:{port} .*check the address") as err:
            client.check()
        assert (err.value.code, err.value.server) == ("UNAVAILABLE", f"127.0.0.1:{port}")
        # Issue 20.8: "Start it" led nowhere. The message names the loopback stand-in, and
        # `kiqa predict` adds the command that starts it.
        assert "kiqa.serving.devserver" in str(err.value)
        from kiqa.cli.remedies import remedy_for

        assert "`kiqa serve-dev --base" in remedy_for(err.value, "predict")
        with pytest.raises(ServingError, match=rf"^no TF Serving at 127\.0\.0\.1:{port}"):
            client.score_bytes([b"x"])


def test_model_that_failed_to_load_is_reported(tmp_path):
    base = tmp_path / "kiqa"
    (base / "1").mkdir(parents=True)
    (base / "1" / "saved_model.pb").write_bytes(b"not a protobuf")
    with DevServer(base, port=0) as broken, ServingClient(broken.address, timeout=30) as client:
        assert [(s.version, s.state) for s in client.model_status()] == [(1, "END")]
        with pytest.raises(ServingError, match=r"no AVAILABLE version: version 1 is END \(loading .* failed"):
            client.check()


def test_oversized_file_is_refused_before_sending(server, images):
    paths, _ = images
    small = min(paths, key=lambda p: p.stat().st_size)
    limit = small.stat().st_size + 1
    with ServingClient(server.address, timeout=30, max_message_bytes=64 * 1024 + limit) as client:
        results = client.score_files(paths, batch_size=8)
    by_name = {r.name: r for r in results}
    assert by_name[str(small)].ok
    too_big = [p for p in paths if p.stat().st_size > limit]
    assert too_big and all("message limit" in by_name[str(p)].error for p in too_big)


def test_predict_cli_names_the_flag_for_oversized_files(server, images, capsys):
    paths, _ = images
    small = min(paths, key=lambda p: p.stat().st_size)
    limit_mb = (64 * 1024 + small.stat().st_size + 1) / 2**20
    code = predict_cli.main(["--server", server.address, "--max-message-mb", str(limit_mb), *map(str, paths)])
    assert code == 3
    err = capsys.readouterr().err
    assert "message limit" in err and "raise --max-message-mb" in err


def test_client_validates_its_arguments():
    with pytest.raises(ServingError, match="host:port"):
        ServingClient("localhost")
    with pytest.raises(ServingError, match="timeout"):
        ServingClient("localhost:8500", timeout=0)


def test_predict_cli_writes_csv_and_reports_partial_failure(server, images, tmp_path, capsys):
    paths, corrupt = images
    out = tmp_path / "scores.csv"
    code = predict_cli.main(["--server", server.address, "--batch-size", "4", "--out", str(out),
                             str(paths[0]), str(corrupt), str(paths[1])])
    assert code == 3  # EXIT_PARTIAL
    rows = list(csv.DictReader(out.open()))
    assert b"\r" not in out.read_bytes()  # issue 20.8: csv.writer's default CRLF
    assert [r["path"] for r in rows] == [str(paths[0]), str(corrupt), str(paths[1])]
    assert rows[0]["mos"] and rows[2]["mos"] and not rows[1]["mos"]
    assert rows[1]["error"].startswith(f"{corrupt}: JPEG header is unreadable")
    err = capsys.readouterr().err
    assert "3 files: 2 scored, 1 failed" in err and str(corrupt) in err


def test_predict_cli_scores_a_folder_to_stdout(server, images, capsys):
    paths, corrupt = images
    code = predict_cli.main(["--server", server.address, str(paths[0].parent)])
    assert code == 3
    printed = capsys.readouterr().out
    lines = printed.strip().splitlines()
    assert lines[0] == "path,mos,error" and len(lines) == 1 + len(paths) + 1 and "\r" not in printed


def test_predict_cli_status(server, capsys):
    assert predict_cli.main(["--server", server.address, "--status"]) == 0
    out = capsys.readouterr().out
    assert "version 1: AVAILABLE" in out and "input image_bytes: string[-1]" in out


def test_predict_cli_server_down(capsys):
    port = free_port()
    assert predict_cli.main(["--server", f"127.0.0.1:{port}", "--timeout", "5", "--status"]) == 1
    err = capsys.readouterr().err
    assert f"error: no TF Serving at 127.0.0.1:{port}" in err
    assert "check --server" in err  # the remedy, in kiqa predict's flags


@pytest.fixture(scope="module")
def old_export(base, tmp_path_factory):
    """The shared export re-saved without the lenient signature, as exports made before
    it existed are (and without warmup records, which name it)."""
    old = tmp_path_factory.mktemp("old") / "kiqa"
    loaded = tf.saved_model.load(str(base / "1"))
    tf.saved_model.save(loaded, str(old / "1"), signatures={
        name: loaded.signatures[name] for name in ("serving_default", "score_pixels")
    })
    (old / "1" / "assets.extra").mkdir()
    shutil.copy(base / "1" / "assets.extra" / "kiqa.json", old / "1" / "assets.extra" / "kiqa.json")
    return old


def test_without_the_lenient_signature_the_client_falls_back(old_export, direct_scores, images):
    paths, corrupt = images
    with DevServer(old_export, port=0, warmup=False) as old:
        with ServingClient(old.address, timeout=30) as client:
            assert client.check()["lenient"] is False
            results = client.score_files([paths[0], corrupt, paths[1]], batch_size=4)
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error.startswith(f"{corrupt}: rejected by TF Serving (INVALID_ARGUMENT): JPEG header is unreadable")
    expected = direct_scores([paths[0].read_bytes(), paths[1].read_bytes()])
    np.testing.assert_allclose([results[0].mos, results[2].mos], expected, rtol=0, atol=1e-4)


def test_batch_size_over_the_maximum_batch_is_refused(server, images):
    with ServingClient(server.address, timeout=30) as client:
        with pytest.raises(ServingError, match=rf"batch_size must be 1 to {export.MAX_BATCH}"):
            client.score_files(images[0], batch_size=export.MAX_BATCH + 1)


def test_predict_cli_round_trips_non_utf8_file_names(server, images, tmp_path, capsys):
    paths, corrupt = images
    folder = tmp_path / "latin1"
    folder.mkdir()
    names = [b"caf\xe9.jpg", b"\xff\xfe-bad.png", b"plain.png"]
    for name, source in zip(names, (paths[0], corrupt, paths[1])):
        (folder / os.fsdecode(name)).write_bytes(source.read_bytes())
    out = tmp_path / "scores.csv"
    assert predict_cli.main(["--server", server.address, "--out", str(out), str(folder)]) == 3
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        rows = {os.fsencode(r["path"]): r for r in csv.DictReader(handle)}
    assert sorted(rows) == sorted(os.fsencode(folder / os.fsdecode(n)) for n in names)
    by_name = {Path(os.fsdecode(k)).name.encode("utf-8", "surrogateescape"): r for k, r in rows.items()}
    assert by_name[b"caf\xe9.jpg"]["mos"] and by_name[b"plain.png"]["mos"]
    assert not by_name[b"\xff\xfe-bad.png"]["mos"] and "JPEG header is unreadable" in by_name[b"\xff\xfe-bad.png"]["error"]
    # The raw bytes are in the file, as kiqa score writes them.
    assert b"caf\xe9.jpg" in out.read_bytes()


def test_predict_out_keeps_another_served_models_csv_unless_overwrite(server, images, tmp_path, capsys):
    """Issue 20: a predictions CSV from another served model is kept unless --overwrite."""
    import json

    from kiqa.provenance import sidecar_path

    paths, _ = images
    out = tmp_path / "scores.csv"
    command = ["--server", server.address, "--out", str(out), str(paths[0])]
    assert predict_cli.main(command) == 0
    assert predict_cli.main(command) == 0  # the same model again: replaced
    sidecar = json.loads(sidecar_path(out).read_text())
    sidecar["source"] = "127.0.0.1:9/another"
    sidecar_path(out).write_text(json.dumps(sidecar))
    before = out.read_bytes()
    capsys.readouterr()
    assert predict_cli.main(command) == 1
    err = capsys.readouterr().err
    assert "127.0.0.1:9/another" in err and "--overwrite" in err and out.read_bytes() == before
    assert predict_cli.main([*command, "--overwrite"]) == 0
    assert json.loads(sidecar_path(out).read_text())["source"] == f"{server.address}/kiqa"
