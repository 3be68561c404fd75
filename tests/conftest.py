"""Shared pytest fixtures and the `large` marker (opt in with --run-large)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The test files that take longest, longest first (each trains or starts TensorFlow in
# subprocesses). They start first: pytest-xdist (`--dist loadfile --no-loadscope-reorder`
# in setup.cfg) hands each worker whole files in collection order, so the two workers end
# together instead of one running a heavy file alone at the end. Files not listed follow
# in their usual order.
SLOWEST_FILES = (  # by junit time on 2026-12-06, longest first
    "test_crash_safety.py",
    "test_cli.py",
    "test_train.py",
    "test_hostile.py",
    "test_export.py",
    "test_maps.py",
    "test_notebooks.py",
    "test_evaluate.py",
    "test_provenance.py",
    "test_distribution.py",
    "test_prepared.py",
    "test_devserver.py",
)


def pytest_addoption(parser):
    parser.addoption(
        "--run-large", action="store_true", default=False,
        help="also run tests marked large (real-size ConvNeXt, long runs)",
    )


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept
    if config.getoption("--run-large"):
        return
    skip_large = pytest.mark.skip(reason="large test: run with --run-large")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip_large)


def _shared_data_dir():
    env = os.environ.get("KIQA_SHARED_DATA")
    if env:
        return Path(env)
    return PROJECT_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
    """The read-only reference data folder (../shared/data or $KIQA_SHARED_DATA)."""
    path = _shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"reference data not found at {path} (set KIQA_SHARED_DATA to ../shared/data)")
    return path


@pytest.fixture(scope="session")
def koniq_csv(shared_data):
    """The real KonIQ-10k label file with the official split."""
    path = shared_data / "koniq" / "koniq10k_distributions_sets.csv"
    if not path.is_file():
        pytest.skip(f"real KonIQ label file not found at {path}")
    return path


@pytest.fixture(scope="session")
def realset(shared_data):
    """The folder of 20 real rated photos (labels.csv + images/)."""
    path = shared_data / "realset"
    if not (path / "labels.csv").is_file():
        pytest.skip(f"real photo set not found at {path}")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Base path of the tiny model exported once per session (tests/helpers.shared_export)."""
    from helpers import shared_export

    return shared_export(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def server(base):
    """kiqa's local development gRPC server over `base`, on 127.0.0.1 and a free port."""
    from kiqa.serving.devserver import DevServer

    with DevServer(base, port=0) as running:
        yield running
