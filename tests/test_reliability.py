"""Run directory lock, verified checkpoints, client store, metrics log, and bad input: each test is a
reproduction of a finding of issue 14 that failed before."""

import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fedpeft.config import ConfigError, load_config
from fedpeft.federation.checkpoint import Checkpoint, pack_state, read_checkpoint, save_checkpoint, unpack_state
from fedpeft.federation.client_store import ClientStore, ClientStoreError
from fedpeft.federation.durable import StorageError, verify_manifest, write_bytes_durable
from fedpeft.federation.metrics_log import MetricsLog
from fedpeft.federation.run_dir import RunDirectory, RunDirError, check_metrics_log, choose_checkpoint, config_differences

TINY = "configs/tiny.yaml"


def _ckpt(round_idx, value=1.0):
    strategy = {"control": {"a": torch.full((2, 3), value)}, "steps": 3, "hyper": {"lr": 0.5},
                "pair": (1, [2.0, None]), "arr": np.arange(4, dtype=np.uint32)}
    state = {"round": round_idx, "metrics_offset": 0, "client_store_index": {}}
    return Checkpoint(round_idx, {"g": torch.arange(6.0).reshape(2, 3) * value}, strategy, {}, state)


# --- checkpoints -----------------------------------------------------------------------------------------
def test_strategy_state_round_trips_without_pickle(tmp_path):
    random.seed(3)
    path = save_checkpoint(tmp_path, _ckpt(1))
    assert sorted(p.name for p in path.iterdir()) == ["global.safetensors", "manifest.json", "state.json",
                                                      "strategy.json", "strategy.safetensors"]
    got = read_checkpoint(path)
    assert torch.equal(got.strategy_state["control"]["a"], torch.full((2, 3), 1.0))
    assert got.strategy_state["pair"] == (1, [2.0, None]) and got.strategy_state["hyper"] == {"lr": 0.5}
    assert got.strategy_state["arr"].dtype == np.uint32 and got.strategy_state["arr"].tolist() == [0, 1, 2, 3]
    expected = random.random()
    random.seed(99)
    random.setstate(got.rng["python"])  # the saved RNG state is the one at save time
    assert random.random() == expected


def test_objects_that_need_pickle_are_refused():
    with pytest.raises(TypeError, match="cannot store a object"):
        pack_state({"x": object()})
    skeleton, tensors = pack_state({"t": torch.ones(2), "nested": [{"u": torch.zeros(1)}]})
    assert json.loads(json.dumps(skeleton)) == skeleton
    assert torch.equal(unpack_state(skeleton, tensors)["nested"][0]["u"], torch.zeros(1))


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete"])
def test_manifest_catches_damage(tmp_path, damage):
    path = save_checkpoint(tmp_path, _ckpt(1))
    assert verify_manifest(path) is None
    target = path / "global.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "bitflip":
        data[-3] ^= 0x01  # one bit of one tensor value: safetensors itself would load it silently
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    assert "global.safetensors" in verify_manifest(path)


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    for r in (1, 2, 3):
        save_checkpoint(run / "checkpoints", _ckpt(r, float(r)), keep=3)
    flipped = run / "checkpoints" / "round_0003" / "strategy.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0x80
    flipped.write_bytes(bytes(data))
    (run / "checkpoints" / "round_0002" / "state.json").write_text("{}")  # also damaged
    point = choose_checkpoint(run, rounds=5)
    assert point.checkpoint.name == "round_0001" and point.round == 1
    text = "\n".join(point.notes)
    assert "round_0003: strategy.safetensors does not match its SHA-256" in text
    assert "round_0002: state.json does not match" in text
    assert "resuming from round_0001" in text


def test_deleted_latest_does_not_restart_from_round_one(tmp_path):
    run = tmp_path / "run"
    (run / "metrics.jsonl").parent.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    for r in (1, 2):
        save_checkpoint(run / "checkpoints", _ckpt(r))
    (run / "checkpoints" / "LATEST").unlink()
    point = choose_checkpoint(run, rounds=5)
    assert point.round == 2 and "LATEST is missing" in point.notes[0]


def test_no_intact_checkpoint_is_an_error_not_a_restart(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints", _ckpt(1))
    (run / "metrics.jsonl").write_text("")
    (run / "checkpoints" / "round_0001" / "global.safetensors").write_bytes(b"")
    with pytest.raises(RunDirError, match="(?s)no usable checkpoint.*round_0001: global.safetensors"):
        choose_checkpoint(run, rounds=5)


def test_pickled_checkpoint_of_an_older_version_is_never_unpickled(tmp_path):
    run = tmp_path / "run"
    old = run / "checkpoints" / "round_0001"
    old.mkdir(parents=True)
    (run / "checkpoints" / "LATEST").write_text("round_0001")
    (old / "strategy.pt").write_bytes(b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR.")  # a pickle that runs code
    with pytest.raises(RunDirError, match="pickled strategy.pt"):
        choose_checkpoint(run, rounds=5)


# --- metrics.jsonl ---------------------------------------------------------------------------------------
def test_short_metrics_log_is_detected_and_never_padded(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.log("a", x=1)
    offset = log.offset()
    log.log("b", x=2)
    assert check_metrics_log(path, offset) is None
    with open(path, "r+b") as handle:
        handle.truncate(offset - 5)
    assert "shorter than" in check_metrics_log(path, offset)
    with pytest.raises(RuntimeError, match="not padded"):
        log.truncate(offset)
    assert b"\x00" not in path.read_bytes()
    path.unlink()
    assert "missing" in check_metrics_log(path, offset)


# --- client store ----------------------------------------------------------------------------------------
def test_missing_client_store_file_is_an_error(tmp_path):
    store = ClientStore(tmp_path / "store")
    store.begin_round(1)
    store.put(3, "B", {"b": torch.ones(2)})
    index = store.snapshot()
    (tmp_path / "store" / "3" / "B.r1.safetensors").unlink()
    with pytest.raises(ClientStoreError, match="3/B.r1.safetensors"):
        ClientStore(tmp_path / "store").restore(index)
    with pytest.raises(ClientStoreError, match="missing"):
        store.get(3, "B")


def test_garbage_collection_keeps_versions_of_retained_checkpoints(tmp_path):
    store = ClientStore(tmp_path / "store")
    for r in (1, 2):
        store.begin_round(r)
        store.put(0, "B", {"b": torch.full((1,), float(r))})
    older = {"0/B": 1}
    store.collect_garbage([older])
    assert sorted(p.name for p in (tmp_path / "store" / "0").iterdir()) == ["B.r1.safetensors", "B.r2.safetensors"]
    store.collect_garbage()
    assert sorted(p.name for p in (tmp_path / "store" / "0").iterdir()) == ["B.r2.safetensors"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_names_the_path_and_the_cause():
    with pytest.raises(StorageError, match="/dev/full failed: disk full"):
        write_bytes_durable("/dev/full", b"x" * 100_000)


def test_disk_full_in_the_store_stops_the_run_instead_of_dropping_the_client(tmp_path, monkeypatch):
    from fedpeft.federation import client_store
    from fedpeft.federation.engine import run_experiment

    def full(path, data):
        raise client_store.storage_error(path, OSError(28, "No space left on device"))

    monkeypatch.setattr(client_store, "write_bytes_durable", full)
    with pytest.raises(StorageError, match="disk full"):
        run_experiment(TINY, ["federation.rounds=1", "method.name=fedsa_lora", "evaluation.before_training=false"],
                       run_dir=tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["event"] == "client_failed"]


# --- run directory ----------------------------------------------------------------------------------------
def test_second_open_of_a_run_directory_fails_naming_the_holder(tmp_path):
    cfg = load_config(TINY)
    held = RunDirectory.open(tmp_path / "run", cfg)
    assert (tmp_path / "run" / "config.yaml").read_text() == cfg.to_yaml()  # before anything slow
    with pytest.raises(RunDirError, match=f"in use by process {os.getpid()}"):
        RunDirectory.open(tmp_path / "run", cfg, resume=True)
    held.close()
    RunDirectory.open(tmp_path / "run", cfg, resume=True).close()  # released: a resume may open it


def test_lock_of_another_process_and_its_release_on_kill(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time; from fedpeft.config import load_config; from fedpeft.federation.run_dir import "
            f"RunDirectory; d = RunDirectory.open({str(run)!r}, load_config({TINY!r})); print('held', flush=True); "
            "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": "src"})
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "fedpeft", "run", "--resume", str(run)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and f"in use by process {holder.pid}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert time.monotonic() - start < 30  # fails at once, not after a model load (generous for a busy CI)
    finally:
        holder.kill()
        holder.wait()
    RunDirectory.open(run, load_config(TINY), resume=True).close()  # the kernel released the lock


def test_new_run_into_a_non_empty_directory_is_refused(tmp_path):
    cfg = load_config(TINY)
    RunDirectory.open(tmp_path / "run", cfg).close()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"event": "run_start"}\n')
    with pytest.raises(RunDirError, match="(?s)not empty.*--resume.*--overwrite"):
        RunDirectory.open(tmp_path / "run", cfg)
    RunDirectory.open(tmp_path / "run", cfg, overwrite=True).close()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "config.yaml"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "thesis.tex").write_text("x")
    with pytest.raises(RunDirError, match="not a fedpeft run directory"):
        RunDirectory.open(tmp_path / "other", cfg, overwrite=True)
    assert (tmp_path / "other" / "thesis.tex").exists()


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "runs").write_text("")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        RunDirectory.open(tmp_path / "runs" / "x", load_config(TINY))


def test_config_differences_name_the_keys():
    a, b = load_config(TINY), load_config(TINY, ["federation.rounds=9", "output.dir=elsewhere"])
    assert config_differences(a, b) == ["federation.rounds: run directory has 3, --config gives 9"]


# --- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, expected", [
    ("training.max_grad_norm=-1", "training.max_grad_norm: Input should be greater than 0"),
    ("training.max_grad_norm=0", "training.max_grad_norm: Input should be greater than 0"),
    ("training.lr=.inf", "training.lr: Input should be a finite number"),
    ("training.lr=.nan", "training.lr: Input should be a finite number"),
    ("training.lr_min=0.5", "training.lr_min=0.5 exceeds training.lr=0.01"),
    ("federation.rounds=true", "federation.rounds: expected a number, got the boolean true"),
    ("federation.rounds='3'", "federation.rounds: expected an integer, got the string '3'"),
    ("output.progress=1", "output.progress: expected true or false, got int 1"),
    ("seed=-1", "seed: Input should be greater than or equal to 0"),
    ("seed=99999999999", "seed: Input should be less than or equal to 4294967295"),
    ("peft.alpha=.inf", "peft.alpha: Input should be a finite number"),
])
def test_harmful_values_are_refused(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert expected in str(err.value)


def test_empty_and_non_utf8_config_files(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: x\nseed: 0\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin.yaml' is not UTF-8 text: line 3 holds byte 0xe9"):
        load_config(latin)


def test_infeasible_partition_fails_before_the_model_loads(tmp_path, monkeypatch):
    from fedpeft.data.partition import PartitionError
    from fedpeft.federation import engine

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine, "load_experiment_model", no_model)
    with pytest.raises(PartitionError, match="classes_per_client"):
        engine.run_experiment(TINY, ["data.partition.kind=pathological", "data.partition.classes_per_client=1",
                                     "federation.num_clients=2", "federation.clients_per_round=2"],
                              run_dir=tmp_path / "run")


def test_every_client_failing_is_a_message_and_the_checkpoint_stays(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fedpeft.cli import app
    from fedpeft.strategies.base import Strategy

    def reject(self, global_state, update):
        raise ValueError("rejected by the test")

    monkeypatch.setattr(Strategy, "check_update", reject)
    result = CliRunner().invoke(app, ["run", "--config", TINY, "--run-dir", str(tmp_path / "run"),
                                      "federation.rounds=1", "evaluation.before_training=false"])
    assert result.exit_code == 1, result.output
    assert "no client update was accepted" in result.output and "--resume" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_non_utf8_data_file_names_the_line(tmp_path):
    from fedpeft.data.sources import DataError, read_file

    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"instruction": "a", "response": "b"}\n{"instruction": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataError, match=r"data.jsonl: not UTF-8 text: line 2 holds byte 0xe9"):
        read_file(path)


def test_unknown_model_offline_fails_fast_with_the_bundled_models(monkeypatch):
    from huggingface_hub import constants

    from fedpeft.federation.preflight import model_preflight
    from fedpeft.models.registry import ModelNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set.*tiny-llama"):
        model_preflight(load_config(TINY, ["model.name=nobody/no-such-model"]))
    assert time.monotonic() - start < 10
    model_preflight(load_config(TINY))  # bundled: nothing to check


def test_robust_rule_runs_through_the_engine(tmp_path):
    from fedpeft.federation.engine import run_experiment

    summary = run_experiment(TINY, ["federation.rounds=1", "federation.robust.rule=median",
                                    "federation.robust.clip_norm=0.5", "evaluation.before_training=false"],
                             run_dir=tmp_path / "run")
    assert summary.rounds == 1 and (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
