"""Deployment on Flower: serialisation, the FlowerTransport under the engine's round loop, and real
SuperLink + SuperNode processes on 127.0.0.1.

The fast tests run the real ClientApp handler in process behind a fake Grid (no Flower processes); the
``slow`` ones start ``flower-superlink`` and two ``flower-supernode`` processes (about 2 minutes on 2
busy cores: Flower starts a fresh ClientApp process, which imports torch, for every message).
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedpeft[flower]'); deployment tests skipped")

from flwr.app import ArrayRecord, Message, RecordDict
from safetensors.torch import load_file

from flower_fakes import FakeGrid, flower_env  # noqa: F401 (an autouse fixture)

from fedpeft.config import load_config
from fedpeft.deploy.flower.app import run_config_values, write_app
from fedpeft.deploy.flower.local import rehearsal_node_configs
from fedpeft.deploy.flower.serde import (
    PlanNotSerializable,
    decode_plan,
    decode_result,
    encode_plan,
    encode_result,
)
from fedpeft.deploy.flower.settings import DeploySettings, NodeSettings
from fedpeft.deploy.flower.transport import FlowerTransport
from fedpeft.federation.engine import Engine, run_experiment
from fedpeft.federation.transport import InProcessTransport, Transport
from fedpeft.strategies.base import ClientPlan, ClientUpdate, TrainResult
from helpers import run_events

BASE = ["federation.rounds=2", "federation.num_clients=2", "output.report=false"]


def _final(run_dir):
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def _assert_same_adapter(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _train_losses(run_dir):
    return {(e["round"], e["client"]): e["losses"] for e in run_events(run_dir, "client_train")}


# --- serialisation -------------------------------------------------------------------------------


def test_plan_round_trip_is_exact():
    downlink = {"a.lora_A": torch.randn(4, 8), "a.lora_B": torch.randn(8, 4)}
    plan = ClientPlan(client_id=3, downlink=downlink, init_state={**downlink, "b.lora_B": torch.randn(2, 2)},
                      trainable=["a.lora_B"], upload=None, job="task-1", data_key="arithmetic",
                      control={"c": torch.randn(3).to(torch.bfloat16)}, scaling=0.5, info={"rank": 2, "x": [1, 2]})
    global_state = {**downlink, "b.lora_B": torch.zeros(2, 2), "z.lora_A": torch.ones(1, 3)}
    base = {"layers.0.q_proj": torch.randn(5, 5)}
    got = decode_plan(encode_plan(7, plan, global_state, 0.01, base))
    assert (got.round_idx, got.lr) == (7, 0.01)
    p = got.plan
    assert (p.client_id, p.job, p.data_key, p.trainable, p.upload, p.scaling, p.info) == (
        3, "task-1", "arithmetic", ["a.lora_B"], None, 0.5, {"rank": 2, "x": [1, 2]})
    _assert_same_adapter(p.downlink, downlink)
    _assert_same_adapter(p.init_state, plan.init_state)
    assert p.control["c"].dtype == torch.bfloat16 and torch.equal(p.control["c"], plan.control["c"])
    _assert_same_adapter(got.start_state, {"z.lora_A": global_state["z.lora_A"]})  # keys the plan leaves unset
    _assert_same_adapter(got.base_weights, base)
    plain = decode_plan(encode_plan(1, ClientPlan(client_id=0, downlink=downlink), downlink, 1e-3)).plan
    assert plain.init_state is None and plain.trainable is None and plain.data_key is None and plain.control == {}


def test_result_round_trip_is_exact():
    update = ClientUpdate(client_id=2, tensors={"k": torch.randn(3, 4)}, num_examples=17, job="j",
                          control={"c": torch.randn(2)}, metrics={"loss": 1.5, "note": "x"})
    result = TrainResult(steps=2, examples_seen=8, num_examples=17, mean_loss=1.5, last_loss=1.25, lr=0.01,
                         seconds=0.3, tokens=99)
    got_update, got_result, losses = decode_result(encode_result(update, result, [1.75, 1.25]))
    assert got_result == result and losses == [1.75, 1.25]
    assert (got_update.client_id, got_update.num_examples, got_update.job, got_update.metrics) == (2, 17, "j", update.metrics)
    _assert_same_adapter(got_update.tensors, update.tensors)
    _assert_same_adapter(got_update.control, update.control)


def test_plan_with_a_callable_is_refused():
    plan = ClientPlan(client_id=0, downlink={}, extra_loss=lambda params: torch.zeros(()))
    with pytest.raises(PlanNotSerializable, match="attach_client_hooks"):
        encode_plan(1, plan, {}, 0.1, method="fedprox")


def test_settings_parsing():
    node = NodeSettings.from_node_config({"partition-ids": "0, 2", "num-partitions": 4, "client-store": "/x"})
    assert node.client_ids == [0, 2] and node.client_store == "/x"
    node.check(4)
    with pytest.raises(ValueError, match="num_clients=2"):
        node.check(2)
    with pytest.raises(ValueError, match="partition-id"):
        NodeSettings.from_node_config({"data-path": "/d.jsonl"})
    assert rehearsal_node_configs(2, 5)[1]["partition-ids"] == "1,3"
    with pytest.raises(ValueError, match="at least one client"):
        rehearsal_node_configs(3, 2)
    cfg = load_config("configs/tiny.yaml")
    settings = DeploySettings.from_run_config(run_config_values(cfg, min_clients=2, straggler_timeout=5))
    assert settings.config() == cfg and settings.min_clients == 2 and settings.straggler_timeout == 5.0
    with pytest.raises(ValueError, match="experiment"):
        DeploySettings.from_run_config({})


def test_app_folder_is_a_valid_flower_app(tmp_path):
    import tomli
    from flwr.common.config import validate_config

    folder = write_app(tmp_path / "app", load_config("configs/tiny.yaml"), run_dir="/srv/run")
    doc = tomli.loads((folder / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(doc, check_module=True, project_dir=folder)
    assert ok, errors
    assert doc["tool"]["flwr"]["app"]["config"]["run-dir"] == "/srv/run"


# --- the transport under the engine, with the real ClientApp in process --------------------------


def _fake_engine_and_grid(cfg, run_dir, tmp_path, tamper=None, **settings):
    run_config = run_config_values(cfg, **settings)
    nodes = rehearsal_node_configs(2, cfg.federation.num_clients, tmp_path / "stores", warm_worker=False)
    grid = FakeGrid(run_config, nodes, tamper)
    transport = functools.partial(FlowerTransport, grid, DeploySettings.from_run_config(run_config))
    return Engine(cfg, run_dir, transport=transport), grid


def _fake_engine(cfg, run_dir, tmp_path, tamper=None, **settings):
    return _fake_engine_and_grid(cfg, run_dir, tmp_path, tamper, **settings)[0]


def test_flower_transport_matches_in_process_engine(tmp_path):
    cfg = load_config("configs/tiny.yaml", BASE)
    deployed = _fake_engine(cfg, tmp_path / "deployed", tmp_path).run()
    reference = run_experiment(cfg, run_dir=tmp_path / "ref")
    _assert_same_adapter(_final(deployed.run_dir), _final(reference.run_dir))
    assert _train_losses(deployed.run_dir) == _train_losses(reference.run_dir)
    rounds = run_events(deployed.run_dir, "deploy_round")
    assert [e["round"] for e in rounds] == [1, 2] and all(e["answered"] == 2 for e in rounds)
    # same event kinds as a simulated run, plus deploy_round
    kinds = {e["event"] for e in run_events(deployed.run_dir)}
    assert kinds - {e["event"] for e in run_events(reference.run_dir)} == {"deploy_round"}


def test_a_classifier_deploys_like_it_simulates(tmp_path):
    """model.head=classification on the nodes: same seeded head, same classes, same result."""
    cfg = load_config("configs/tiny.yaml", BASE + [
        "model.name=tiny-bert", "model.head=classification", "peft.target_modules=[query,value]",
        "data.tasks=[sentiment,topic]", "data.train_examples_per_task=20", "data.eval_examples_per_task=4"])
    deployed = _fake_engine(cfg, tmp_path / "deployed", tmp_path).run()
    reference = run_experiment(cfg, run_dir=tmp_path / "ref")
    final = _final(deployed.run_dir)
    assert any("classifier" in k for k in final)
    _assert_same_adapter(final, _final(reference.run_dir))
    assert _train_losses(deployed.run_dir) == _train_losses(reference.run_dir)

def _tamper_updates(msg, reply):
    """Client 0: wrongly shaped tensor; client 1: NaN; client 2: an unreadable reply; client 3 honest."""
    if reply.has_error() or msg.metadata.message_type != "train":
        return reply
    cid = int(msg.content["plan"]["client-id"])
    content = reply.content
    if cid in (0, 1):
        update, result, losses = decode_result(content)
        key = next(iter(update.tensors))
        update.tensors[key] = torch.zeros(3, 3) if cid == 0 else torch.full_like(update.tensors[key], math.nan)
        content = encode_result(update, result, losses)
    elif cid == 2:
        content = RecordDict({"tensors": ArrayRecord({"x": torch.zeros(1)})})
    else:
        return reply
    return Message(content, reply_to=msg)


def test_corrupted_updates_are_rejected_and_logged(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["federation.rounds=1", "federation.num_clients=4",
                                            "federation.clients_per_round=4", "evaluation.before_training=false",
                                            "output.report=false"])
    summary = _fake_engine(cfg, tmp_path / "run", tmp_path, tamper=_tamper_updates).run()
    failed = {e["client"]: e["error"] for e in run_events(summary.run_dir, "client_failed")}
    assert set(failed) == {0, 1, 2}
    assert "shape" in failed[0] and "NaN" in failed[1] and "undecodable" in failed[2]
    assert run_events(summary.run_dir, "aggregate")[0]["clients"] == [3]
    assert all(torch.isfinite(v).all() for v in _final(summary.run_dir).values())


def test_fewer_replies_than_min_clients_stops_the_run(tmp_path):
    cfg = load_config("configs/tiny.yaml", BASE + ["evaluation.before_training=false"])

    def drop_client_1(msg, reply):
        is_train = msg.metadata.message_type == "train"
        return None if is_train and int(msg.content["plan"]["client-id"]) == 1 else reply

    engine = _fake_engine(cfg, tmp_path / "run", tmp_path, tamper=drop_client_1, min_clients=2, round_timeout=1.0)
    with pytest.raises(RuntimeError, match="min-clients=2"):
        engine.run()
    failed = run_events(tmp_path / "run", "client_failed")
    assert [(e["round"], e["client"]) for e in failed] == [(1, 1)] and "no reply" in failed[0]["error"]
    assert not run_events(tmp_path / "run", "round_end")  # the round did not complete


# --- bytes on the wire, private state and personal evaluation on the nodes ------------------------------


def _train_replies(grid):
    """(round, client) -> the train reply content the server received."""
    return {(int(m.content["plan"]["round"]), int(m.content["plan"]["client-id"])): r.content
            for m, r in grid.seen if m.metadata.message_type == "train" and not r.has_error()}


def test_uplink_bytes_under_flower_are_the_encoded_bytes_received(tmp_path):
    """The update is encoded on the node: the reply carries the int8 payload, client_train.uplink_bytes is
    the size of the arrays that arrived, int8 is about a quarter of fp32, and the run equals the
    in-process int8 run bit for bit (both encode on the client against the same reference)."""
    cfg = load_config("configs/tiny.yaml", BASE + ["federation.rounds=1", "evaluation.before_training=false"])
    numel, ntensors = None, None
    sent = {}
    for scheme in ("none", "int8"):
        run_cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"uplink_compression": scheme})})
        engine, grid = _fake_engine_and_grid(run_cfg, tmp_path / scheme, tmp_path / f"g-{scheme}")
        summary = engine.run()
        replies = _train_replies(grid)
        train = run_events(summary.run_dir, "client_train")
        assert len(train) == len(replies) == 2
        for e in train:
            content = replies[(e["round"], e["client"])]
            arrays = [a for record in content.array_records.values() for a in record.values()]
            assert e["uplink_bytes"] == sum(len(a.data) for a in arrays)  # every array byte that arrived
            manifest = json.loads(str(content["update"]["manifests"]))["tensors"]
            payload = sum(len(a.data) for a in arrays)  # raw bytes: no .npy header (serde.RAW)
            if scheme == "none":
                numel = sum(math.prod(shape) for _, _, shape in manifest)
                ntensors = len(manifest)
                assert payload == 4 * numel and {dtype for _, dtype, _ in manifest} == {"float32"}
            else:  # one int8 per entry + one float32 scale per tensor (metering/compression.py's table)
                assert payload == numel + 4 * ntensors
                assert {dtype for _, dtype, _ in manifest} == {"int8", "float32"}
            sent[(scheme, e["client"])] = e["uplink_bytes"]
        if scheme == "int8":
            reference = run_experiment(run_cfg, run_dir=tmp_path / "in-process-int8")
            _assert_same_adapter(_final(summary.run_dir), _final(reference.run_dir))
            uplinks = [e["uplink_bytes"] for e in run_events(reference.run_dir, "client_train")]
            assert uplinks == [numel + 4 * ntensors] * 2
    for client in (0, 1):
        assert 0.2 < sent[("int8", client)] / sent[("none", client)] < 0.3


def test_personalised_method_on_flower_keeps_b_on_the_nodes_and_evaluates_there(tmp_path, monkeypatch):
    """FedSA-LoRA under Flower: each client's B is committed to its node's store (client 0's NaN B is
    refused there and never kept); personalised evaluation runs on the nodes ("evaluate" messages) and
    gives exactly the in-process run's per-client scores."""
    from fedpeft.strategies import STRATEGIES
    from fedpeft.strategies.fedsa_lora import PERSONAL_NAME, FedSALoRA

    class NaNB(FedSALoRA):
        name = "nan_b_fedsa"

        def client_update(self, round_idx, plan, trained, result, store):
            if plan.client_id == 0:
                trained = {k: torch.full_like(v, math.nan) if "lora_B" in k else v for k, v in trained.items()}
            return super().client_update(round_idx, plan, trained, result, store)

    monkeypatch.setitem(STRATEGIES, "nan_b_fedsa", NaNB)
    cfg = load_config("configs/tiny.yaml", ["federation.rounds=1", "federation.num_clients=4",
                                            "federation.clients_per_round=4", "evaluation.before_training=false",
                                            "method.name=nan_b_fedsa", "output.report=false"])
    engine, grid = _fake_engine_and_grid(cfg, tmp_path / "run", tmp_path)
    summary = engine.run()
    failed = {e["client"]: e["error"] for e in run_events(summary.run_dir, "client_failed")}
    assert set(failed) == {0} and PERSONAL_NAME in failed[0] and "NaN" in failed[0]
    stored = {p.parent.name for p in (tmp_path / "stores").glob(f"node-*/*/{PERSONAL_NAME}.r*.safetensors")}
    assert stored == {"1", "2", "3"}
    assert not any(k.startswith("0/") for k in
                   json.loads((tmp_path / "stores" / "node-0" / "index.json").read_text()))
    # personal evaluation ran on the two nodes, not on the server (whose client store is empty)
    assert sorted(m.metadata.dst_node_id for m, _ in grid.seen if m.metadata.message_type == "evaluate") == [100, 101]
    assert not list((tmp_path / "run" / "client_store").glob("*/*.safetensors"))
    [deployed] = [e for e in run_events(summary.run_dir, "eval") if e.get("split") == "personal"]
    reference = run_experiment(cfg, run_dir=tmp_path / "ref")
    [simulated] = [e for e in run_events(reference.run_dir, "eval") if e.get("split") == "personal"]
    assert deployed["scored_on"] == "nodes" and simulated["scored_on"] == "server"
    assert deployed["per_client"] == simulated["per_client"] and len(deployed["per_client"]) == 4
    assert deployed["metrics"] == simulated["metrics"]
    assert {k for k in summary.final_metrics if k.startswith("personal/")} == {
        "personal/mean", "personal/std", "personal/min", "personal/max"}


class StateElsewhere(InProcessTransport):
    """A transport whose clients keep their private state away from the server and that cannot
    evaluate there (the base Transport's ``evaluate_personal``)."""

    personal_state_on_server = False


def test_a_transport_that_cannot_evaluate_personal_state_logs_why_and_the_report_says_it(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["federation.rounds=1", "federation.num_clients=2",
                                            "evaluation.before_training=false", "method.name=fedsa_lora",
                                            "output.report=false"])
    engine = Engine(cfg, tmp_path / "run")
    setup = engine._setup

    def setup_elsewhere():
        setup()
        engine.transport = StateElsewhere(engine.runner)
        engine.evaluator.personal_on_server = False
        engine.evaluator.remote_personal = engine.transport.evaluate_personal

    engine._setup = setup_elsewhere
    summary = engine.run()
    assert not any(k.startswith("personal/") for k in summary.final_metrics)
    [personal] = [e for e in run_events(summary.run_dir, "eval") if e.get("split") == "personal"]
    assert personal["metrics"] == {} and "cannot evaluate there" in personal["skipped"]
    from fedpeft.report import write_report

    assert "not evaluated: personal" in write_report(summary.run_dir).read_text()


# --- real Flower processes -----------------------------------------------------------------------


class DropClient(Transport):
    """In-process reference for a dropout: client ``client`` fails in round ``round``."""

    def __init__(self, inner, round_idx, client_id):
        self.inner, self.round_idx, self.client_id = inner, round_idx, client_id

    def jobs(self, round_idx, plans, global_state, lr, progress):
        for plan, job in self.inner.jobs(round_idx, plans, global_state, lr, progress):
            if (round_idx, plan.client_id) == (self.round_idx, self.client_id):
                def job():
                    raise RuntimeError("dropped")
            yield plan, job


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    from fedpeft.deploy.flower.client_app import KILL_ENV
    from fedpeft.deploy.flower.local import LocalFederation

    work = tmp_path_factory.mktemp("flower")
    nodes = rehearsal_node_configs(2, 2, work / "stores")
    # A PATH without the virtual environment: Flower's executables are found beside the interpreter.
    env = {"FEDPEFT_CACHE_DIR": str(work / "cache"), "PATH": "/usr/bin:/bin"}
    fed = LocalFederation(work, nodes, env_extra=env, node_env={1: {KILL_ENV: "killed:1:1"}})
    with fed:
        yield fed


@pytest.mark.slow
def test_rehearsal_matches_in_process_engine(federation, tmp_path):
    cfg = load_config("configs/tiny.yaml", BASE)
    app = write_app(tmp_path / "app", cfg, run_dir=str(tmp_path / "deployed"))
    run_id, status = federation.run(app, timeout=400)
    assert status == "finished:completed", (run_id, status)
    deployed = tmp_path / "deployed"
    for name in ("config.yaml", "metrics.jsonl", "final/adapter_model.safetensors", "final/adapter_config.json",
                 "checkpoints/LATEST", "deploy.json"):
        assert (deployed / name).exists(), name
    reference = run_experiment(cfg, run_dir=tmp_path / "ref")
    assert (deployed / "config.yaml").read_text() == (reference.run_dir / "config.yaml").read_text()
    _assert_same_adapter(_final(deployed), _final(reference.run_dir))  # bit-identical, not just close
    assert _train_losses(deployed) == _train_losses(reference.run_dir)
    assert [e["round"] for e in run_events(deployed, "round_end")] == [1, 2]
    assert not run_events(deployed, "client_failed")


@pytest.mark.slow
def test_rehearsal_with_secure_aggregation(federation, tmp_path):
    """(Before the kill test below: it needs both SuperNodes.) Real SuperLink + SuperNodes with SecAgg+ (Flower's protocol, node contexts kept by the SuperNodes,
    the warm worker in between): the round's aggregate is the in-process one within the quantisation bound."""
    cfg = load_config("configs/tiny.yaml", BASE + ["name=secure", "federation.rounds=1",
                                                   "evaluation.before_training=false"])
    app = write_app(tmp_path / "app", cfg, run_dir=str(tmp_path / "deployed"), secagg=True)
    run_id, status = federation.run(app, timeout=400)
    assert status == "finished:completed", (run_id, status)
    deployed = tmp_path / "deployed"
    [event] = run_events(deployed, "deploy_round")
    assert event["secagg"] and event["answered"] == 2 and len(event["stages"]) == 4
    reference = run_experiment(cfg, run_dir=tmp_path / "ref")
    final, ref = _final(deployed), _final(reference.run_dir)
    assert final.keys() == ref.keys()
    assert max(float((final[k] - ref[k]).abs().max()) for k in final) <= event["error_bound"]
    assert _train_losses(deployed) == _train_losses(reference.run_dir)

@pytest.mark.slow
def test_supernode_killed_mid_round_is_a_logged_dropout(federation, tmp_path):
    # SuperNode 1 SIGKILLs its own process group when asked to train client 1 in round 1 of the run
    # named "killed" (FEDPEFT_DEPLOY_KILL_AT in its environment, see the fixture).
    cfg = load_config("configs/tiny.yaml", BASE + ["name=killed", "federation.rounds=1",
                                                   "evaluation.before_training=false"])
    app = write_app(tmp_path / "app", cfg, run_dir=str(tmp_path / "deployed"), min_clients=1, straggler_timeout=2)
    run_id, status = federation.run(app, timeout=300)
    assert status == "finished:completed", (run_id, status)
    assert federation.supernodes[1].poll() is not None  # the node is really gone
    deployed = tmp_path / "deployed"
    failed = run_events(deployed, "client_failed")
    assert [(e["round"], e["client"]) for e in failed] == [(1, 1)]
    assert "no reply" in failed[0]["error"] or "Flower error" in failed[0]["error"]
    assert run_events(deployed, "aggregate")[0]["clients"] == [0]
    assert run_events(deployed, "deploy_round")[0]["answered"] == 1
    # the round aggregated exactly what the engine aggregates when client 1 drops out in process
    ref = _run_with_dropout(Engine(cfg, tmp_path / "ref"), 1, 1)
    _assert_same_adapter(_final(deployed), _final(ref))


def _run_with_dropout(engine, round_idx, client_id):
    original_setup = engine._setup

    def setup():
        original_setup()
        engine.transport = DropClient(InProcessTransport(engine.runner), round_idx, client_id)

    engine._setup = setup
    return engine.run().run_dir


def test_deploy_app_command_writes_the_resolved_config(tmp_path):
    import tomli
    from typer.testing import CliRunner

    from fedpeft.cli import app

    result = CliRunner().invoke(app, ["deploy", "app", "--config", "configs/tiny.yaml", "--out", str(tmp_path / "a"),
                                      "--min-clients", "2", "--run-dir", "/srv/r", "--resume", "federation.rounds=7"])
    assert result.exit_code == 0, result.output
    values = tomli.loads((tmp_path / "a" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    settings = DeploySettings.from_run_config(values)
    assert settings.config().federation.rounds == 7 and settings.min_clients == 2
    assert settings.resume and settings.run_dir == "/srv/r"
    bad = CliRunner().invoke(app, ["deploy", "app", "--config", "configs/tiny.yaml", "--out", str(tmp_path / "b"),
                                   "--resume"])
    assert bad.exit_code != 0 and "--run-dir" in bad.output

