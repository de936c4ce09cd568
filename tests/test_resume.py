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


def _killed_run(tmp_path, config, args=(), kill_at="client:3:1"):
    run_dir = tmp_path / "run"
    killed = _run(["--config", str(config), "--run-dir", str(run_dir), *OVERRIDES, *args], {KILL_ENV: kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return run_dir


def _assert_same_final(ref_dir, run_dir):
    ref, got = _final(ref_dir), _final(run_dir)
    assert ref.keys() == got.keys() and len(ref) > 0
    for key in ref:
        assert torch.equal(ref[key], got[key]), key


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_latest_checkpoint_falls_back_and_ends_bit_identical(tmp_path, reference, tiny_config_path_module,
                                                                      damage):
    run_dir = _killed_run(tmp_path, tiny_config_path_module)  # checkpoints of rounds 1 and 2 on disk
    target = run_dir / "checkpoints" / "round_0002" / "global.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-2] ^= 0x04
        target.write_bytes(bytes(data))
    resumed = _run(["--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr
    assert "round_0002: global.safetensors does not match its SHA-256" in resumed.stderr
    assert "resuming from round_0001" in resumed.stderr
    _assert_same_final(reference, run_dir)
    assert [e["round"] for e in _events(run_dir) if e["event"] == "round_end"] == [1, 2, 3]


def test_short_metrics_log_falls_back_to_an_older_checkpoint(tmp_path, reference, tiny_config_path_module):
    run_dir = _killed_run(tmp_path, tiny_config_path_module)
    state = json.loads((run_dir / "checkpoints" / "round_0002" / "state.json").read_text())
    with open(run_dir / "metrics.jsonl", "r+b") as handle:
        handle.truncate(state["metrics_offset"] - 10)
    resumed = _run(["--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr
    assert "shorter than" in resumed.stderr
    assert b"\x00" not in (run_dir / "metrics.jsonl").read_bytes()
    _assert_same_final(reference, run_dir)
    (run_dir / "metrics.jsonl").unlink()  # nothing to fall back to: a clear error
    (run_dir / "final").rename(run_dir / "final.old")
    proc = _run(["--resume", str(run_dir)])
    assert proc.returncode == 2 and "metrics.jsonl is missing" in proc.stderr and "Traceback" not in proc.stderr


def test_deleted_client_store_file_is_never_a_silently_dropped_client(tmp_path, tiny_config_path_module):
    args = ["method.name=fedsa_lora", "evaluation.every_rounds=0"]
    ref_dir = tmp_path / "ref"
    assert _run(["--config", str(tiny_config_path_module), "--run-dir", str(ref_dir), *OVERRIDES, *args]).returncode == 0
    run_dir = _killed_run(tmp_path, tiny_config_path_module, args)
    index2 = json.loads((run_dir / "checkpoints" / "round_0002" / "state.json").read_text())["client_store_index"]
    index1 = json.loads((run_dir / "checkpoints" / "round_0001" / "state.json").read_text())["client_store_index"]
    newer = sorted(k for k, v in index2.items() if v == 2)
    assert newer, index2
    client, name = newer[0].split("/")
    (run_dir / "client_store" / client / f"{name}.r2.safetensors").unlink()
    resumed = _run(["--resume", str(run_dir)])  # round 1's files were kept: resume from there
    assert resumed.returncode == 0, resumed.stderr
    assert "client-store file(s) it references are missing" in resumed.stderr
    _assert_same_final(ref_dir, run_dir)
    assert index1  # round 1 had client state too, so the fallback restored it rather than dropping it


def test_resume_of_a_finished_run_logs_nothing(tmp_path, reference):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    before = (copy / "metrics.jsonl").read_bytes()
    proc = _run(["--resume", str(copy)])
    assert proc.returncode == 0, proc.stderr
    assert "already finished" in proc.stderr
    assert (copy / "metrics.jsonl").read_bytes() == before


def test_concurrent_runs_on_one_directory(tmp_path, tiny_config_path_module):
    """Two runs started together: exactly one runs, the other fails at once (lock held, or the
    directory is no longer empty) and nothing is logged twice."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "fedpeft", "run", "--config", str(tiny_config_path_module), "--run-dir", str(run_dir),
            "federation.rounds=1"]
    procs = [subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in outs)
    assert codes == [0, 2], outs
    loser = next(err for code, err in outs if code == 2)
    assert "in use by process" in loser or "not empty" in loser
    assert [e["event"] for e in _events(run_dir)].count("run_start") == 1


def test_config_and_resume_must_agree(tmp_path, reference, tiny_config_path_module):
    proc = _run(["--config", str(tiny_config_path_module), "--resume", str(reference)])  # without OVERRIDES
    assert proc.returncode == 2
    assert "evaluation.every_rounds: run directory has 1, --config gives 2" in proc.stderr
    agreeing = _run(["--config", str(tiny_config_path_module), "--resume", str(reference), *OVERRIDES])
    assert agreeing.returncode == 0 and "already finished" in agreeing.stderr


def test_config_with_resume_starts_a_new_run_there(tmp_path, reference, tiny_config_path_module):
    """``--config C --resume D`` starts the run in D when D holds none yet (a kill before config.yaml
    existed), and the same command resumes it later: one command that always works."""
    run_dir = tmp_path / "fresh"
    proc = _run(["--config", str(tiny_config_path_module), "--resume", str(run_dir), *OVERRIDES])
    assert proc.returncode == 0, proc.stderr
    _assert_same_final(reference, run_dir)


def test_max_grad_norm_minus_one_is_refused_before_anything(tmp_path, tiny_config_path_module):
    proc = _run(["--config", str(tiny_config_path_module), "--run-dir", str(tmp_path / "run"),
                 "training.max_grad_norm=-1"])
    assert proc.returncode == 2 and "training.max_grad_norm: Input should be greater than 0" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
