"""A run killed at any moment and resumed ends bit-identical to an uninterrupted run.

The uninterrupted references run in this process (``reference_run``); every killed run and every
``--resume`` is a fresh ``fedpeft run`` process, so nothing carries over in memory."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.federation.engine import KILL_ENV
from helpers import TINY_CONFIG, assert_same_tensors, final_adapter, kill_and_resume, reference_run, run_cli, run_events

OVERRIDES = ["federation.rounds=3", "evaluation.every_rounds=1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(TINY_CONFIG, OVERRIDES, tmp_path_factory.mktemp("ref") / "run")


@pytest.mark.parametrize("kill_at", ["client:2:1", "checkpoint:2", "client:3:2", "client:1:1"])
def test_kill_and_resume_is_bit_identical(tmp_path, reference, kill_at):
    run_dir = tmp_path / "run"
    kill_and_resume(TINY_CONFIG, OVERRIDES, run_dir, kill_at)
    assert_same_tensors(final_adapter(reference), final_adapter(run_dir))
    # The event log reads like the uninterrupted run's: same rounds, same losses, no duplicates.
    def train_losses(run):
        return [(e["round"], e["client"], e["losses"]) for e in run_events(run, "client_train")]

    assert train_losses(run_dir) == train_losses(reference)
    assert [e["round"] for e in run_events(run_dir, "round_end")] == [1, 2, 3]


@pytest.fixture(scope="module")
def finished_and_resumed(reference, tmp_path_factory):
    """A copy of the finished reference run, its metrics log before, and ``fedpeft run --resume`` on it."""
    copy = tmp_path_factory.mktemp("finished") / "copy"
    shutil.copytree(reference, copy)
    before = (copy / "metrics.jsonl").read_bytes()
    return copy, before, run_cli(["--resume", copy])


def test_resume_of_a_finished_run_changes_nothing(reference, finished_and_resumed):
    copy, _, proc = finished_and_resumed
    assert proc.returncode == 0, proc.stderr
    for key, value in final_adapter(reference).items():
        assert torch.equal(final_adapter(copy)[key], value)


def test_resume_of_missing_dir_is_a_clear_error(tmp_path):
    proc = run_cli(["--resume", str(tmp_path / "nope")])
    assert proc.returncode == 2
    assert "no config.yaml" in proc.stderr


def test_resume_is_exact_when_the_method_changes_base_weights(tmp_path):
    """FLoRA merges every round into the base weights: they are checkpointed and restored exactly."""
    overrides = [*OVERRIDES, "method.name=flora", "evaluation.every_rounds=0"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    reference_run(TINY_CONFIG, overrides, ref_dir)
    kill_and_resume(TINY_CONFIG, overrides, run_dir, "client:3:1")
    for name in ("adapter_model.safetensors", "base_weights.safetensors"):
        ref, got = load_file(str(ref_dir / "final" / name)), load_file(str(run_dir / "final" / name))
        assert ref.keys() == got.keys() and len(ref) > 0
        for key in ref:
            assert torch.equal(ref[key], got[key]), (name, key)


def test_resume_is_exact_with_a_kept_local_optimizer(tmp_path, reference):
    """training.keep_optimizer: each client's AdamW state lives in its client store, committed with the
    round, so a run killed mid-round resumes it exactly; and it is a different run from fresh optimizers."""
    overrides = [*OVERRIDES, "training.keep_optimizer=true"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    reference_run(TINY_CONFIG, overrides, ref_dir)
    assert any(p.name.startswith("local_optimizer_default.") for p in (ref_dir / "client_store").glob("*/*"))
    kill_and_resume(TINY_CONFIG, overrides, run_dir, "client:3:1")
    ref, got, fresh = final_adapter(ref_dir), final_adapter(run_dir), final_adapter(reference)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert any(not torch.equal(ref[k], fresh[k]) for k in ref)


def _killed_run(run_dir, overrides=(), kill_at="client:3:1"):
    killed = run_cli(["--config", TINY_CONFIG, "--run-dir", run_dir, *OVERRIDES, *overrides], {KILL_ENV: kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return run_dir


@pytest.fixture(scope="module")
def killed_in_round_3(tmp_path_factory):
    """A run killed at its first client of round 3 (checkpoints of rounds 1 and 2 on disk); each test
    damages its own copy."""
    return _killed_run(tmp_path_factory.mktemp("killed") / "run")


@pytest.fixture
def killed_copy(killed_in_round_3, tmp_path):
    return Path(shutil.copytree(killed_in_round_3, tmp_path / "run"))


def _assert_same_final(ref_dir, run_dir):
    ref, got = final_adapter(ref_dir), final_adapter(run_dir)
    assert ref.keys() == got.keys() and len(ref) > 0
    for key in ref:
        assert torch.equal(ref[key], got[key]), key


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_latest_checkpoint_falls_back_and_ends_bit_identical(killed_copy, reference, damage):
    run_dir = killed_copy
    target = run_dir / "checkpoints" / "round_0002" / "global.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-2] ^= 0x04
        target.write_bytes(bytes(data))
    resumed = run_cli(["--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr
    assert "round_0002: global.safetensors does not match its SHA-256" in resumed.stderr
    assert "resuming from round_0001" in resumed.stderr
    _assert_same_final(reference, run_dir)
    assert [e["round"] for e in run_events(run_dir) if e["event"] == "round_end"] == [1, 2, 3]


def test_short_metrics_log_falls_back_to_an_older_checkpoint(killed_copy, reference):
    run_dir = killed_copy
    state = json.loads((run_dir / "checkpoints" / "round_0002" / "state.json").read_text())
    with open(run_dir / "metrics.jsonl", "r+b") as handle:
        handle.truncate(state["metrics_offset"] - 10)
    resumed = run_cli(["--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr
    assert "shorter than" in resumed.stderr
    assert b"\x00" not in (run_dir / "metrics.jsonl").read_bytes()
    _assert_same_final(reference, run_dir)
    (run_dir / "metrics.jsonl").unlink()  # nothing to fall back to: a clear error
    (run_dir / "final").rename(run_dir / "final.old")
    proc = run_cli(["--resume", str(run_dir)])
    assert proc.returncode == 2 and "metrics.jsonl is missing" in proc.stderr and "Traceback" not in proc.stderr


def test_deleted_client_store_file_is_never_a_silently_dropped_client(tmp_path):
    overrides = ["method.name=fedsa_lora", "evaluation.every_rounds=0"]
    ref_dir = reference_run(TINY_CONFIG, [*OVERRIDES, *overrides], tmp_path / "ref")
    run_dir = _killed_run(tmp_path / "run", overrides)
    index2 = json.loads((run_dir / "checkpoints" / "round_0002" / "state.json").read_text())["client_store_index"]
    index1 = json.loads((run_dir / "checkpoints" / "round_0001" / "state.json").read_text())["client_store_index"]
    newer = sorted(k for k, v in index2.items() if v == 2)
    assert newer, index2
    client, name = newer[0].split("/")
    (run_dir / "client_store" / client / f"{name}.r2.safetensors").unlink()
    resumed = run_cli(["--resume", str(run_dir)])  # round 1's files were kept: resume from there
    assert resumed.returncode == 0, resumed.stderr
    assert "client-store file(s) it references are missing" in resumed.stderr
    _assert_same_final(ref_dir, run_dir)
    assert index1  # round 1 had client state too, so the fallback restored it rather than dropping it


def test_resume_of_a_finished_run_logs_nothing(finished_and_resumed):
    copy, before, proc = finished_and_resumed
    assert proc.returncode == 0, proc.stderr
    assert "already finished" in proc.stderr
    assert (copy / "metrics.jsonl").read_bytes() == before


def test_concurrent_runs_on_one_directory(tmp_path):
    """Two runs started together: exactly one runs, the other fails at once (lock held, or the
    directory is no longer empty) and nothing is logged twice."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "fedpeft", "run", "--config", str(TINY_CONFIG), "--run-dir", str(run_dir),
            "federation.rounds=1"]
    procs = [subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in outs)
    assert codes == [0, 2], outs
    loser = next(err for code, err in outs if code == 2)
    assert "in use by process" in loser or "not empty" in loser
    assert [e["event"] for e in run_events(run_dir)].count("run_start") == 1


def test_config_and_resume_must_agree(tmp_path, reference):
    proc = run_cli(["--config", str(TINY_CONFIG), "--resume", str(reference)])  # without OVERRIDES
    assert proc.returncode == 2
    assert "evaluation.every_rounds: run directory has 1, --config gives 2" in proc.stderr
    agreeing = run_cli(["--config", str(TINY_CONFIG), "--resume", str(reference), *OVERRIDES])
    assert agreeing.returncode == 0 and "already finished" in agreeing.stderr


def test_config_with_resume_starts_a_new_run_there(tmp_path, reference):
    """``--config C --resume D`` starts the run in D when D holds none yet (a kill before config.yaml
    existed), and the same command resumes it later: one command that always works."""
    run_dir = tmp_path / "fresh"
    proc = run_cli(["--config", str(TINY_CONFIG), "--resume", str(run_dir), *OVERRIDES])
    assert proc.returncode == 0, proc.stderr
    _assert_same_final(reference, run_dir)


def test_max_grad_norm_minus_one_is_refused_before_anything(tmp_path):
    proc = run_cli(["--config", str(TINY_CONFIG), "--run-dir", str(tmp_path / "run"),
                 "training.max_grad_norm=-1"])
    assert proc.returncode == 2 and "training.max_grad_norm: Input should be greater than 0" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
