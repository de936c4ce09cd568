"""A run killed at any moment and resumed ends bit-identical to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.federation.engine import KILL_ENV

OVERRIDES = ["federation.rounds=3", "evaluation.every_rounds=1"]


def _run(args, env_extra=None, cwd=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "fedpeft", "run", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _final(run_dir):
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def _events(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_config_path_module):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = _run(["--config", str(tiny_config_path_module), "--run-dir", str(run_dir), *OVERRIDES])
    assert proc.returncode == 0, proc.stderr
    return run_dir


@pytest.fixture(scope="module")
def tiny_config_path_module():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.mark.parametrize("kill_at", ["client:2:1", "checkpoint:2", "client:3:2", "client:1:1"])
def test_kill_and_resume_is_bit_identical(tmp_path, reference, tiny_config_path_module, kill_at):
    run_dir = tmp_path / "run"
    killed = _run(["--config", str(tiny_config_path_module), "--run-dir", str(run_dir), *OVERRIDES], {KILL_ENV: kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (run_dir / "final").exists()
    resumed = _run(["--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr
    ref, got = _final(reference), _final(run_dir)
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    # The event log reads like the uninterrupted run's: same rounds, same losses, no duplicates.
    def train_losses(events):
        return [(e["round"], e["client"], e["losses"]) for e in events if e["event"] == "client_train"]

    assert train_losses(_events(run_dir)) == train_losses(_events(reference))
    assert [e["round"] for e in _events(run_dir) if e["event"] == "round_end"] == [1, 2, 3]


def test_resume_of_a_finished_run_changes_nothing(tmp_path, reference):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    proc = _run(["--resume", str(copy)])
    assert proc.returncode == 0, proc.stderr
    for key, value in _final(reference).items():
        assert torch.equal(_final(copy)[key], value)


def test_resume_of_missing_dir_is_a_clear_error(tmp_path):
    proc = _run(["--resume", str(tmp_path / "nope")])
    assert proc.returncode == 2
    assert "no config.yaml" in proc.stderr


def test_resume_is_exact_when_the_method_changes_base_weights(tmp_path, tiny_config_path_module):
    """FLoRA merges every round into the base weights: they are checkpointed and restored exactly."""
    args = ["--config", str(tiny_config_path_module), *OVERRIDES, "method.name=flora", "evaluation.every_rounds=0"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    assert _run([*args, "--run-dir", str(ref_dir)]).returncode == 0
    killed = _run([*args, "--run-dir", str(run_dir)], {KILL_ENV: "client:3:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = _run(["--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr
    for name in ("adapter_model.safetensors", "base_weights.safetensors"):
        ref, got = load_file(str(ref_dir / "final" / name)), load_file(str(run_dir / "final" / name))
        assert ref.keys() == got.keys() and len(ref) > 0
        for key in ref:
            assert torch.equal(ref[key], got[key]), (name, key)


def test_resume_is_exact_with_a_kept_local_optimizer(tmp_path, reference, tiny_config_path_module):
    """training.keep_optimizer: each client's AdamW state lives in its client store, committed with the
    round, so a run killed mid-round resumes it exactly; and it is a different run from fresh optimizers."""
    args = ["--config", str(tiny_config_path_module), *OVERRIDES, "training.keep_optimizer=true"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    assert _run([*args, "--run-dir", str(ref_dir)]).returncode == 0
    assert any(p.name.startswith("local_optimizer_default.") for p in (ref_dir / "client_store").glob("*/*"))
    killed = _run([*args, "--run-dir", str(run_dir)], {KILL_ENV: "client:3:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = _run(["--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr
    ref, got, fresh = _final(ref_dir), _final(run_dir), _final(reference)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert any(not torch.equal(ref[k], fresh[k]) for k in ref)
