"""federation.devices: one worker process per device; two CPU workers give the one-process run's result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.config import load_config
from fedpeft.federation.devices import device_refusal, resolve_devices, spread
from fedpeft.federation.engine import run_experiment

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
QUIET = ["evaluation.every_rounds=0", "evaluation.before_training=false"]


def test_spread_gives_contiguous_near_equal_chunks():
    assert [list(r) for r in spread(5, 2)] == [[0, 1, 2], [3, 4]]
    assert [len(r) for r in spread(2, 3)] == [1, 1, 0]
    assert sum(len(r) for r in spread(17, 4)) == 17


def test_resolve_devices_and_refusals():
    assert resolve_devices(["cpu", "cpu"], cuda_count=0) == ["cpu", "cpu"]
    assert resolve_devices(2, cuda_count=2) == ["cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match="federation.devices=2: this machine has 0 CUDA"):
        resolve_devices(2, cuda_count=0)
    with pytest.raises(ValueError, match="cuda:1"):
        resolve_devices(["cuda:1"], cuda_count=1)
    cfg = load_config(TINY)
    assert device_refusal("fedit", cfg) is None
    assert "client store" in device_refusal("scaffold", cfg)
    with pytest.raises(Exception, match="not a device"):
        load_config(TINY, ["federation.devices=[gpu0]"])
    with pytest.raises(Exception, match="must be >= 1"):
        load_config(TINY, ["federation.devices=0"])


def test_two_cpu_workers_equal_the_one_process_run(tmp_path):
    common = [*QUIET, "federation.rounds=2", "federation.clients_per_round=3"]
    one = run_experiment(TINY, common, run_dir=tmp_path / "one")
    two = run_experiment(TINY, [*common, "federation.devices=[cpu,cpu]"], run_dir=tmp_path / "two")
    a = load_file(str(one.run_dir / "final" / "adapter_model.safetensors"))
    b = load_file(str(two.run_dir / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same threads: bit-identical
