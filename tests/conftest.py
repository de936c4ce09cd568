import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Converted models are cached per user; tests share one cache across the session, not the user's.
    if "FEDPEFT_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("FEDPEFT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fedpeft-cache"))


@pytest.fixture
def tiny_config_path():
    return REPO / "configs" / "tiny.yaml"
