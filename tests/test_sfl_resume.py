"""A split run killed mid-round (or while checkpointing) and resumed ends bit-identical to an uninterrupted one:
the per-client trunks and client parts live in the client store, the defence noise is seeded per job."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.federation.engine import KILL_ENV

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
ARGS = ["--config", str(TINY), "federation.rounds=3", "evaluation.every_rounds=0", "evaluation.before_training=false",
        "method.name=sfl", "method.options.cut=1-2", "method.options.trunk=per_client",
        "method.options.aggregate_client_parts=false", "method.options.activation_noise=0.05"]


def _run(args, env_extra=None):
    return subprocess.run([sys.executable, "-m", "fedpeft", "run", *args], env={**os.environ, **(env_extra or {})},
                          capture_output=True, text=True, timeout=300, check=False)


def _store_files(run_dir):
    return {p.relative_to(run_dir / "client_store"): load_file(str(p))
            for p in sorted((run_dir / "client_store").glob("*/*.safetensors"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sfl_ref") / "run"
    proc = _run([*ARGS, "--run-dir", str(run_dir)])
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.mark.parametrize("kill_at", ["client:2:1"])  # mid-round: staged private state matters
def test_split_run_resumes_bit_identically(tmp_path, reference, kill_at):
    run_dir = tmp_path / "run"
    killed = _run([*ARGS, "--run-dir", str(run_dir)], {KILL_ENV: kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = _run(["--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr
    ref = load_file(str(reference / "final" / "adapter_model.safetensors"))
    got = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    ref_store, got_store = _store_files(reference), _store_files(run_dir)
    assert any("sfl_trunk" in str(p) for p in ref_store) and any("sfl_client_parts" in str(p) for p in ref_store)
    assert ref_store.keys() == got_store.keys()
    for path in ref_store:
        assert all(torch.equal(ref_store[path][k], got_store[path][k]) for k in ref_store[path]), path

    def events(d):
        return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]

    def train(evs):
        return [(e["round"], e["client"], e["losses"]) for e in evs if e["event"] == "client_train"]

    def split_bytes(evs):
        return [e["split_clients"] for e in evs if e["event"] == "aggregate"]

    assert train(events(run_dir)) == train(events(reference))
    assert split_bytes(events(run_dir)) == split_bytes(events(reference))
