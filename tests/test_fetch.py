"""kiqa.data.fetch against a local HTTP server on 127.0.0.1 serving small fixture archives."""

import hashlib
import http.server
import io
import json
import logging
import re
import threading
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kiqa.data import fetch
from kiqa.cli import fetch as fetch_cli
from kiqa.errors import DataError, DownloadError

IMAGES_ZIP = "koniq10k_1024x768.zip"
SCORES_ZIP = "koniq10k_scores_and_distributions.zip"
NAMES = ("100.jpg", "200.jpg", "300.jpg")
TIMEOUT = 5.0


def jpeg_bytes(seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def labels_csv(names=NAMES, split=False):
    rows = [
        dict(image_name=n, c1=0.1, c2=0.2, c3=0.3, c4=0.3, c5=0.1, c_total=100, MOS=3.0, SD=0.5,
             **({"set": "training"} if split else {"MOS_zscore": 50.0 + i}))
        for i, n in enumerate(names)
    ]
    if split:
        for row in rows:
            row["MOS"] = 50.0
    return pd.DataFrame(rows).to_csv(index=False).encode()


def zip_bytes(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        for name, data in members.items():
            zipped.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()


def koniq_archives(image_names=NAMES, label_names=NAMES):
    """The two default archives in KonIQ's layout: 1024x768/<id>.jpg and the score CSV."""
    return {
        IMAGES_ZIP: zip_bytes({f"1024x768/{n}": jpeg_bytes(i) for i, n in enumerate(image_names)}),
        SCORES_ZIP: zip_bytes({"koniq10k_scores_and_distributions.csv": labels_csv(label_names)}),
    }


def sha(data):
    return hashlib.sha256(data).hexdigest()


class FileServer:
    """Serves `files` by name with Range support; records every request."""

    def __init__(self):
        self.files = {}
        self.requests = []  # (path, Range header or None)
        self.if_range = []  # If-Range header of every request
        self.etag = '"v1"'
        self.ignore_range = False
        self.truncate_once = set()  # names whose next response stops halfway
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = urllib.parse.unquote(self.path.lstrip("/"))
                requested = self.headers.get("Range")
                server.requests.append((name, requested))
                server.if_range.append(self.headers.get("If-Range"))
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = 0
                match = re.match(r"bytes=(\d+)-$", requested or "")
                # If-Range: resume only if the file is still the one the client started on.
                unchanged = self.headers.get("If-Range") in (None, server.etag)
                if match and unchanged and not server.ignore_range:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", server.etag)
                self.end_headers()
                if name in server.truncate_once:
                    server.truncate_once.discard(name)
                    body = body[: len(body) // 2]  # then HTTP/1.0 closes the connection
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = TIMEOUT
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/archives/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def serve(self, files):
        self.files.update({f"archives/{name}": data for name, data in files.items()})

    def names_requested(self):
        return [name.rpartition("/")[2] for name, _ in self.requests]


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(fetch, "RETRY_BACKOFF", 0.0)
    files = FileServer()
    files.thread.start()
    yield files
    files.httpd.shutdown()
    files.httpd.server_close()
    files.thread.join(timeout=TIMEOUT)


def run_fetch(server, out_dir, **kwargs):
    options = dict(base_url=server.url, progress=False, split_file_url=None, timeout=TIMEOUT, retries=3)
    options.update(kwargs)
    return fetch.fetch_koniq(out_dir, **options)


def test_clean_download_extracts_and_checks_every_image(server, tmp_path):
    archives = koniq_archives()
    server.serve(archives)
    expected = {name: {"sha256": sha(data), "size": len(data)} for name, data in archives.items()}
    labels = run_fetch(server, tmp_path / "koniq", expected=expected)
    assert labels == tmp_path / "koniq" / "koniq10k_scores_and_distributions.csv"
    for i, name in enumerate(NAMES):
        assert (tmp_path / "koniq" / "1024x768" / name).read_bytes() == jpeg_bytes(i)
    assert (tmp_path / "koniq" / IMAGES_ZIP).read_bytes() == archives[IMAGES_ZIP]
    assert not list((tmp_path / "koniq").glob("*.part*"))
    assert not list((tmp_path / "koniq").glob(".*.extracting"))
    state = json.loads((tmp_path / "koniq" / fetch.STATE_FILE).read_text())
    assert state["files"][IMAGES_ZIP]["sha256"] == sha(archives[IMAGES_ZIP])
    assert state["files"][IMAGES_ZIP]["image_roots"] == ["1024x768"]


def test_unknown_checksum_is_recorded_and_logged(server, tmp_path, caplog):
    archives = koniq_archives()
    server.serve(archives)
    with caplog.at_level(logging.INFO, logger="kiqa.data.fetch"):
        run_fetch(server, tmp_path)
    assert f"{IMAGES_ZIP}: sha256 {sha(archives[IMAGES_ZIP])}" in caplog.text
    state = json.loads((tmp_path / fetch.STATE_FILE).read_text())
    assert state["files"][SCORES_ZIP]["sha256"] == sha(archives[SCORES_ZIP])


def test_rerun_after_success_makes_no_request(server, tmp_path):
    server.serve(koniq_archives())
    first = run_fetch(server, tmp_path)
    count = len(server.requests)
    assert count == 2
    assert run_fetch(server, tmp_path) == first
    assert len(server.requests) == count


def test_truncated_download_is_resumed_with_a_range_request(server, tmp_path):
    archives = koniq_archives()
    server.serve(archives)
    server.truncate_once.add(f"archives/{IMAGES_ZIP}")
    expected = {IMAGES_ZIP: {"sha256": sha(archives[IMAGES_ZIP])}}
    run_fetch(server, tmp_path, expected=expected)
    image_requests = [rng for name, rng in server.requests if name.endswith(IMAGES_ZIP)]
    half = len(archives[IMAGES_ZIP]) // 2
    assert image_requests == [None, f"bytes={half}-"]
    if_range = [h for (name, _), h in zip(server.requests, server.if_range) if name.endswith(IMAGES_ZIP)]
    assert if_range == [None, '"v1"']  # resume only if the file did not change meanwhile
    assert (tmp_path / IMAGES_ZIP).read_bytes() == archives[IMAGES_ZIP]


def test_existing_part_file_is_resumed(server, tmp_path):
    archives = koniq_archives()
    server.serve(archives)
    data = archives[IMAGES_ZIP]
    (tmp_path / f"{IMAGES_ZIP}.part").write_bytes(data[:1000])
    run_fetch(server, tmp_path, expected={IMAGES_ZIP: {"sha256": sha(data)}})
    assert (f"archives/{IMAGES_ZIP}", "bytes=1000-") in server.requests
    assert (tmp_path / IMAGES_ZIP).read_bytes() == data


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    archives = koniq_archives()
    server.serve(archives)
    server.ignore_range = True
    data = archives[IMAGES_ZIP]
    # A stale partial file whose bytes are wrong: appending to it would corrupt the archive.
    (tmp_path / f"{IMAGES_ZIP}.part").write_bytes(b"x" * 1000)
    run_fetch(server, tmp_path, expected={IMAGES_ZIP: {"sha256": sha(data)}})
    assert (f"archives/{IMAGES_ZIP}", "bytes=1000-") in server.requests
    assert (tmp_path / IMAGES_ZIP).read_bytes() == data
    assert (tmp_path / "1024x768" / NAMES[0]).is_file()


def test_file_changed_on_the_server_since_the_partial_download_restarts(server, tmp_path):
    archives = koniq_archives()
    server.serve(archives)
    server.truncate_once.add(f"archives/{IMAGES_ZIP}")
    server.etag = '"old"'
    with pytest.raises(DataError, match="failed 1 times"):
        run_fetch(server, tmp_path, retries=1)
    assert (tmp_path / f"{IMAGES_ZIP}.part").stat().st_size == len(archives[IMAGES_ZIP]) // 2
    server.etag = '"new"'  # the archive was replaced on the server meanwhile
    run_fetch(server, tmp_path, expected={IMAGES_ZIP: {"sha256": sha(archives[IMAGES_ZIP])}})
    last = [(r, h) for (name, r), h in zip(server.requests, server.if_range) if name.endswith(IMAGES_ZIP)][-1]
    half = len(archives[IMAGES_ZIP]) // 2
    assert last == (f"bytes={half}-", '"old"')  # asked to resume, was sent the whole new file
    assert (tmp_path / IMAGES_ZIP).read_bytes() == archives[IMAGES_ZIP]


def test_wrong_checksum_deletes_the_file_and_extracts_nothing(server, tmp_path):
    archives = koniq_archives()
    server.serve(archives)
    wrong = "0" * 64
    with pytest.raises(DataError) as err:
        run_fetch(server, tmp_path, expected={IMAGES_ZIP: {"sha256": wrong}})
    message = str(err.value)
    assert IMAGES_ZIP in message and wrong in message and sha(archives[IMAGES_ZIP]) in message
    assert "Rerun" in message and "--" not in message  # the CLI names the flag
    assert (err.value.name, err.value.problem, err.value.expected) == (IMAGES_ZIP, "sha256", wrong)
    assert not (tmp_path / IMAGES_ZIP).exists()
    assert not list(tmp_path.glob("*.part*"))
    assert not (tmp_path / "1024x768").exists()


def test_wrong_size_announced_by_the_server_is_refused(server, tmp_path):
    archives = koniq_archives()
    server.serve(archives)
    with pytest.raises(DataError, match="serves .* bytes but 5 are expected"):
        run_fetch(server, tmp_path, expected={IMAGES_ZIP: {"size": 5}})
    assert not (tmp_path / IMAGES_ZIP).exists()


def test_missing_image_is_listed(server, tmp_path):
    server.serve(koniq_archives(image_names=NAMES[:2]))
    with pytest.raises(DataError) as err:
        run_fetch(server, tmp_path)
    assert "1 of 3 images" in str(err.value) and NAMES[2] in str(err.value)
    assert NAMES[0] not in str(err.value)


@pytest.mark.parametrize("member", ["../evil.jpg", "/tmp/kiqa-evil.jpg", "1024x768/../../evil.jpg", "C:/evil.jpg"])
def test_zip_slip_member_is_refused_before_anything_is_written(server, tmp_path, member):
    archives = koniq_archives()
    archives[IMAGES_ZIP] = zip_bytes({"1024x768/100.jpg": jpeg_bytes(0), member: b"evil"})
    server.serve(archives)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="refusing to extract") as err:
        run_fetch(server, out)
    assert member in str(err.value)
    assert not (out / "1024x768").exists()
    assert not list(tmp_path.rglob("evil.jpg"))


def test_symlink_member_is_refused(server, tmp_path):
    archives = koniq_archives()
    link = zipfile.ZipInfo("1024x768/link.jpg")
    link.external_attr = (0o120777 << 16)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        zipped.writestr(link, "/etc/passwd")
    archives[IMAGES_ZIP] = buffer.getvalue()
    server.serve(archives)
    with pytest.raises(DataError, match="link.jpg"):
        run_fetch(server, tmp_path)


def test_split_file_is_fetched_and_preferred(server, tmp_path):
    archives = koniq_archives()
    split = labels_csv(split=True)
    server.serve({**archives, fetch.SPLIT_FILE: split})
    labels = run_fetch(
        server, tmp_path, split_file_url=server.url + fetch.SPLIT_FILE,
        expected={fetch.SPLIT_FILE: {"sha256": sha(split), "size": len(split)}},
    )
    assert labels == tmp_path / fetch.SPLIT_FILE
    assert labels.read_bytes() == split


def test_split_file_failure_is_only_a_warning(server, tmp_path, caplog):
    server.serve(koniq_archives())
    with caplog.at_level(logging.WARNING, logger="kiqa.data.fetch"):
        labels = run_fetch(server, tmp_path, split_file_url=server.url + "missing.csv")
    assert labels.name == "koniq10k_scores_and_distributions.csv"
    assert "official split file not fetched" in caplog.text and "404" in caplog.text
    assert not (tmp_path / fetch.SPLIT_FILE).exists()


def test_split_file_with_a_wrong_checksum_is_dropped_with_a_warning(server, tmp_path, caplog):
    split = labels_csv(split=True)
    server.serve({**koniq_archives(), fetch.SPLIT_FILE: split})
    with caplog.at_level(logging.WARNING, logger="kiqa.data.fetch"):
        labels = run_fetch(server, tmp_path, split_file_url=server.url + fetch.SPLIT_FILE,
                           expected={fetch.SPLIT_FILE: {"sha256": "b" * 64, "size": len(split)}})
    assert labels.name == "koniq10k_scores_and_distributions.csv"
    assert "sha256 mismatch" in caplog.text
    assert not list(tmp_path.glob(fetch.SPLIT_FILE + "*"))


def test_archives_downloaded_by_hand_are_used_without_a_request(server, tmp_path):
    for name, data in koniq_archives().items():
        (tmp_path / name).write_bytes(data)
    run_fetch(server, tmp_path)
    assert server.requests == []
    assert (tmp_path / "1024x768" / NAMES[1]).is_file()


def test_not_found_is_a_clear_error_not_retried(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404.*check the address") as err:
        run_fetch(server, tmp_path)
    assert err.value.status == 404 and err.value.name == IMAGES_ZIP
    assert server.names_requested() == [IMAGES_ZIP]


def test_unreachable_server_gives_up_after_the_retries(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "RETRY_BACKOFF", 0.0)
    # A port nobody listens on: bind one, close it, use its number.
    probe = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    port = probe.server_address[1]
    probe.server_close()
    with pytest.raises(DataError, match="failed 2 times.*rerun the same command to resume"):
        fetch.fetch_koniq(tmp_path, base_url=f"http://127.0.0.1:{port}/", progress=False,
                          split_file_url=None, timeout=TIMEOUT, retries=2)


def test_cli_fetches_and_prints_the_label_file(server, tmp_path, capsys):
    archives = koniq_archives()
    server.serve(archives)
    code = fetch_cli.main([str(tmp_path), "--base-url", server.url, "--no-split-file", "--quiet",
                           "--timeout", str(TIMEOUT)], prog="kiqa fetch-koniq")
    assert code == 0
    out, err = capsys.readouterr()
    assert "kiqa train --labels" in out
    # The library records and logs the digests; the command says the flag that pins them.
    assert f"pass --sha256 {IMAGES_ZIP}={sha(archives[IMAGES_ZIP])}" in err


def test_cli_wrong_sha256_exits_1_naming_the_archive(server, tmp_path, capsys):
    server.serve(koniq_archives())
    code = fetch_cli.main([str(tmp_path), "--base-url", server.url, "--no-split-file", "--quiet",
                           "--sha256", f"{IMAGES_ZIP}={'a' * 64}"], prog="kiqa fetch-koniq")
    assert code == 1
    err = capsys.readouterr().err
    assert f"{IMAGES_ZIP}: sha256 mismatch" in err
    assert f"--sha256 {IMAGES_ZIP}=<the new digest>" in err  # the remedy, in this command's flags


@pytest.mark.parametrize("value, message", [
    ("koniq10k_1024x768.zip", "NAME=HEX"),
    ("koniq10k_1024x768.zip=xyz", "64 hex digits"),
    (f"other.zip={'a' * 64}", "does not download"),
])
def test_cli_rejects_malformed_checksums(tmp_path, capsys, value, message):
    code = fetch_cli.main([str(tmp_path), "--sha256", value, "--quiet"], prog="kiqa fetch-koniq")
    assert code == 1
    assert message in capsys.readouterr().err


def test_download_sizes_come_from_one_table(capsys):
    """--help and the training docs quote the archive table's sizes, and nothing else (issue 15, item 11)."""
    with pytest.raises(SystemExit):
        fetch_cli.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    project = Path(__file__).resolve().parents[1]
    readme = " ".join(" ".join(p.read_text() for p in (project / "README.md", project / "docs" / "training.md")).split())
    for archives in (fetch.DEFAULT_ARCHIVES, fetch.SMALL_ARCHIVES):
        for name in (*archives, fetch.SPLIT_FILE):
            quoted = f"{name} ({fetch.EXPECTED[name].about})"
            assert quoted in help_text and quoted in readme
    assert fetch.describe_downloads() in help_text
    assert not re.search(r"(?<![\d.])(2\.5|6) GB\b", help_text + readme)
