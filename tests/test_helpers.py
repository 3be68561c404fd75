"""The test helpers that the suite's speed depends on (tests/helpers.py)."""

import threading
import time

import pytest

from helpers import session_cache


class _WorkerTemp:
    """What pytest's tmp_path_factory gives an xdist worker: its own basetemp in the session's."""

    def __init__(self, path):
        self.path = path

    def getbasetemp(self):
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path


def test_session_cache_builds_once_for_all_workers_and_retries_a_failed_build(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    builds, folders = [], []

    def build(folder):
        builds.append(folder)
        time.sleep(0.3)  # long enough for the other worker to ask meanwhile
        (folder / "model").write_text("built")

    workers = [_WorkerTemp(tmp_path / f"popen-gw{i}") for i in range(2)]
    threads = [threading.Thread(target=lambda w=w: folders.append(session_cache(w, "thing", build)))
               for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(builds) == 1 and folders == [builds[0]] * 2
    assert builds[0].parent.parent == tmp_path and (builds[0] / "model").read_text() == "built"

    def broken(folder):
        (folder / "half").write_text("")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        session_cache(workers[0], "other", broken)
    again = session_cache(workers[1], "other", build)
    assert sorted(p.name for p in again.iterdir()) == ["model"]  # rebuilt from empty
