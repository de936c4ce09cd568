import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
LONG_TESTS_ENV = "FEDPEFT_LONG_TESTS"


def pytest_collection_modifyitems(config, items):
    """``long`` tests (a second, multi-minute real-process check of what faster tests already assert) run
    only with FEDPEFT_LONG_TESTS=1, so the default suite stays well inside CI's time."""
    if os.environ.get(LONG_TESTS_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"long test: set {LONG_TESTS_ENV}=1 to run it")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _private_tempdir():
    """Temporary files of the session (Flower workers' fedpeft-w-* sockets, pid and log files; those of
    the processes the tests start, through TMPDIR) go to one folder removed at the end."""
    folder = tempfile.mkdtemp(prefix="fedpeft-tests-")
    saved_env, saved_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = folder, folder
    yield Path(folder)
    tempfile.tempdir = saved_dir
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Converted models are cached per user; tests share one cache across the session, not the user's.
    if "FEDPEFT_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("FEDPEFT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fedpeft-cache"))


@pytest.fixture(scope="session")
def six_block_model(tmp_path_factory):
    """A saved 6-block tiny-llama (FedOT needs blocks to keep, drop and train), read-only once written."""
    from fedpeft.models.registry import tiny_llama

    folder = tmp_path_factory.mktemp("tiny6")
    model, tok = tiny_llama(layers=6)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_config_path():
    return REPO / "configs" / "tiny.yaml"
