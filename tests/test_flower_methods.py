"""FedOT and FedKSeed under Flower: the real ClientApp handler behind a fake Grid (``flower_fakes.FakeGrid``,
no Flower processes), against the in-process engine on the same config and seed.

Two SuperNodes serve three clients (node 0: clients 0 and 2, node 1: client 1), two sampled per round,
so a client is not sampled every round and a node serves several clients. The fake Grid keeps one node
build at a time, so every message to the other node rebuilds it from scratch (like a cold ClientApp
process): what a client received earlier must come back from its own store. The ``slow`` tests run real
Flower processes (warm workers) and SmolLM2.
"""

from __future__ import annotations

import functools
import hashlib
import json

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedpeft[flower]'); deployment tests skipped")

from flower_fakes import FakeGrid, flower_env  # noqa: F401 (an autouse fixture)

from fedpeft.adapters import is_adapter_param
from fedpeft.config import load_config
from fedpeft.deploy.flower import node as flower_node
from fedpeft.deploy.flower.app import run_config_values
from fedpeft.deploy.flower.local import rehearsal_node_configs
from fedpeft.deploy.flower.settings import DeploySettings
from fedpeft.deploy.flower.transport import FlowerTransport
from fedpeft.federation.engine import Engine
from fedpeft.models.registry import tiny_llama
from fedpeft.strategies.fedkseed import HISTORY_COEF_KEY, HISTORY_INDEX_KEY, FedKSeed, tuned_tensors
from helpers import run_events

BASE = ["federation.num_clients=3", "federation.clients_per_round=2", "output.report=false",
        "evaluation.before_training=false", "evaluation.every_rounds=10"]


def _flower_engine(cfg, run_dir, tmp_path):
    run_config = run_config_values(cfg)
    nodes = rehearsal_node_configs(2, cfg.federation.num_clients, tmp_path / "stores", warm_worker=False)
    grid = FakeGrid(run_config, nodes)
    transport = functools.partial(FlowerTransport, grid, DeploySettings.from_run_config(run_config))
    return Engine(cfg, run_dir, transport=transport), grid


def _train_messages(grid):
    return [(m, r) for m, r in grid.seen if m.metadata.message_type == "train" and not r.has_error()]


def _per_job(run_dir, *fields):
    return {(e["round"], e["client"]): tuple(e[f] for f in fields) for e in run_events(run_dir, "client_train")}


def _digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _array_bytes(record):
    return sum(a.numpy().nbytes for a in record.values())


# --- FedKSeed ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", ["all", "adapter"])
def test_fedkseed_under_flower_catches_up_by_replay_and_equals_the_in_process_run(tmp_path, monkeypatch, params):
    """Each node replays its client's catch-up list (plus the rounds it kept in its store) and then holds
    the server's global model bit for bit; the uploads are the (seed index, g) pairs only; the server's
    model and every client's losses equal the in-process run's; bytes equal the in-process figures."""
    cfg = load_config("configs/tiny.yaml", BASE + ["method.name=fedkseed", "method.options.k=64",
                                                   f"method.options.params={params}", "federation.rounds=4",
                                                   "training.lr=0.001"])
    synced: dict[str, dict] = {"flower": {}, "in-process": {}}
    label = ["flower"]
    original = FedKSeed.train_zeroth_order

    def recording(self, model, params_, batches, plan, **kwargs):  # the model the client trains from
        synced[label[0]][(plan.info["round"], plan.client_id)] = _digest(tuned_tensors(model, self.opts.params))
        return original(self, model, params_, batches, plan, **kwargs)

    monkeypatch.setattr(FedKSeed, "train_zeroth_order", recording)
    engine, grid = _flower_engine(cfg, tmp_path / "flower", tmp_path)
    deployed = engine.run()
    label[0] = "in-process"
    reference_engine = Engine(cfg, tmp_path / "ref")
    reference = reference_engine.run()

    # the node's model after catch-up is the server's global model of that round, for every job
    assert len(synced["flower"]) == 8 and synced["flower"] == synced["in-process"]
    # a client sampled after a gap replayed several rounds in one catch-up (the point of the test)
    gaps = [json.loads(str(m.content["plan"]["info"]))["steps"] for m, _ in _train_messages(grid)]
    assert any(len(steps) >= 2 for steps in gaps)
    # the server's model at the end: identical tuned tensors (params=all: base weights; adapter: the adapter)
    assert _digest(tuned_tensors(engine.model, params)) == _digest(tuned_tensors(reference_engine.model, params))
    from safetensors.torch import load_file

    final, ref = (load_file(str(s.run_dir / "final" / "adapter_model.safetensors")) for s in (deployed, reference))
    assert final.keys() == ref.keys() and all(torch.equal(final[k], ref[k]) for k in final)
    # losses and bytes as in process (downlink: the history lists; uplink: steps x (1 + 4) bytes, K = 64)
    fields = ("losses", "downlink_bytes", "uplink_bytes", "uplink_bytes_raw")
    assert _per_job(deployed.run_dir, *fields) == _per_job(reference.run_dir, *fields)
    steps = cfg.federation.local_steps
    for (_, _), (_, down, _, up_raw) in _per_job(deployed.run_dir, *fields).items():
        assert up_raw == steps * (1 + 4) and down % 5 == 0
    assert sum(e["downlink_bytes"] for e in run_events(deployed.run_dir, "client_train")) > 0
    # what the messages carried: the history lists down (no global tensor: start_needed=False), the
    # packed pairs up as raw bytes
    for msg, reply in _train_messages(grid):
        content = msg.content
        assert {n for n, r in content.array_records.items() if len(r)} <= {"control"}, set(content.array_records)
        key = (int(content["plan"]["round"]), int(content["plan"]["client-id"]))
        down = _array_bytes(content["control"]) if "control" in content.array_records else 0
        assert down == _per_job(deployed.run_dir, "downlink_bytes")[key][0]
        assert len(reply.content["tensors"]["packed"].data) == steps * 5
        assert set(json.loads(str(reply.content["update"]["manifests"]))) == {"tensors"}
    uplink = {(e["round"], e["client"]): e["uplink_bytes"] for e in run_events(deployed.run_dir, "client_train")}
    assert uplink == {(e["round"], e["client"]): e["uplink_bytes"]
                      for e in run_events(reference.run_dir, "client_train")}
    assert set(uplink.values()) == {steps * 5}  # what arrived is the payload, byte for byte


def test_fedkseed_node_refuses_a_catch_up_it_cannot_complete(tmp_path):
    """A client whose store lost the earlier rounds cannot reach the global model: an error, not a stale model."""
    cfg = load_config("configs/tiny.yaml", BASE + ["method.name=fedkseed", "method.options.k=64"])
    from fedpeft.strategies import build_experiment_strategy
    from fedpeft.strategies.base import ClientPlan

    strategy = build_experiment_strategy(cfg)
    model, _ = tiny_llama()
    strategy.prepare_model(model)
    plan = ClientPlan(client_id=0, downlink={}, control={
        HISTORY_INDEX_KEY: torch.tensor([3], dtype=torch.uint8), HISTORY_COEF_KEY: torch.tensor([0.1])},
        info={"round": 3, "since": 2, "steps": [1]})
    with pytest.raises(ValueError, match="rounds 1..0 but its catch-up starts at round 2"):
        strategy.attach_client_hooks(3, plan, None)


# --- FedOT ------------------------------------------------------------------------------------------
def _scramble_base_weights(monkeypatch):
    """Every node loads garbage base weights (not the owner's): what it trains with must come from what it
    received. Returns the number of node builds."""
    load = flower_node.load_experiment_model
    builds = []

    def scrambled(cfg, data, *args, **kwargs):
        loaded, model = load(cfg, data, *args, **kwargs)
        gen = torch.Generator().manual_seed(1000 + len(builds))
        with torch.no_grad():
            for name, t in list(model.named_parameters()) + list(model.named_buffers()):
                if not is_adapter_param(name) and t.is_floating_point():
                    t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype))
        builds.append(1)
        return loaded, model

    monkeypatch.setattr(flower_node, "load_experiment_model", scrambled)
    return builds


@pytest.mark.parametrize("distill_steps", [0, 2])
def test_fedot_under_flower_trains_on_the_received_emulator_and_equals_the_in_process_run(
        tmp_path, monkeypatch, six_block_model, distill_steps):
    """The nodes' own base weights are scrambled: each node runs the emulator-model the owner sent (first
    plan of each client; kept in the client's store, reloaded by a rebuilt node), so the global adapter,
    every client's losses and the metered bytes equal the in-process run's bit for bit."""
    cfg = load_config("configs/tiny.yaml", BASE + [
        f"model.name={six_block_model}", "method.name=fedot", "method.options.a=1", "method.options.b=1",
        "method.options.drop_ratio=0.5", f"method.options.distill_steps={distill_steps}", "federation.rounds=3"])
    builds = _scramble_base_weights(monkeypatch)
    engine, grid = _flower_engine(cfg, tmp_path / "flower", tmp_path)
    deployed = engine.run()
    reference = Engine(cfg, tmp_path / "ref").run()
    assert len(builds) >= 3  # the nodes were rebuilt between messages

    from safetensors.torch import load_file

    final, ref = (load_file(str(s.run_dir / "final" / "adapter_model.safetensors")) for s in (deployed, reference))
    assert final.keys() == ref.keys() and all(torch.equal(final[k], ref[k]) for k in final)
    fields = ("losses", "downlink_bytes", "uplink_bytes", "uplink_bytes_raw")
    assert _per_job(deployed.run_dir, *fields) == _per_job(reference.run_dir, *fields)
    [agg] = run_events(deployed.run_dir, "aggregate")[-1:]
    shipped = agg["shipped_once_bytes"]
    first_seen: set[int] = set()
    for msg, _ in _train_messages(grid):
        content = msg.content
        client, rnd = int(content["plan"]["client-id"]), int(content["plan"]["round"])
        # the emulator goes with a client's first plan only; no global tensor beyond the adapter blocks'
        assert not len(content.array_records.get("start", {}))
        has_emulator = bool(len(content.array_records.get("control", {})))
        assert has_emulator == (client not in first_seen)
        first_seen.add(client)
        adapter = _array_bytes(content["downlink"])
        down = _per_job(deployed.run_dir, "downlink_bytes")[(rnd, client)][0]
        assert adapter + (_array_bytes(content["control"]) if has_emulator else 0) == down
        if has_emulator:
            assert _array_bytes(content["control"]) == shipped
    assert agg["clients_with_emulator"] == 3 and agg["emulator_blocks"] == 2 and agg["middle_blocks"] == 4
    # the last node build freed its two dropped blocks' base weights (never run by the view)
    worker = flower_node._WORKER[1]
    dropped = worker.strategy.emulator.dropped
    assert len(dropped) == 2 and worker.strategy.released_bytes == agg["owner_model_bytes"] - shipped
    assert all(p.numel() == 0 for n, p in worker.model.named_parameters()
               if worker.strategy.emulator.block_of(n) in dropped and not is_adapter_param(n))


def test_fedot_full_blocks_under_flower_equal_the_in_process_run(tmp_path, monkeypatch, six_block_model):
    """``adapter_training: full``: every base parameter of blocks 0 and 5 trains on the node and travels
    each round as ``fedot_block/*`` plan controls (the nodes' own base weights scrambled, so they train on
    what they received). The owner's final blocks, every job's losses and the metered bytes equal the
    in-process run's bit for bit, and each message carries the metered tensors."""
    from safetensors.torch import load_file

    from fedpeft.strategies.fedot import BLOCK_PREFIX

    cfg = load_config("configs/tiny.yaml", BASE + [
        f"model.name={six_block_model}", "method.name=fedot", "method.options.a=1", "method.options.b=1",
        "method.options.drop_ratio=0.5", "method.options.adapter_training=full", "federation.rounds=3"])
    builds = _scramble_base_weights(monkeypatch)
    engine, grid = _flower_engine(cfg, tmp_path / "flower", tmp_path)
    deployed = engine.run()
    reference_engine = Engine(cfg, tmp_path / "ref")
    reference = reference_engine.run()
    assert len(builds) >= 3  # the nodes were rebuilt between messages

    final, ref = (load_file(str(s.run_dir / "final" / "base_weights.safetensors")) for s in (deployed, reference))
    assert len(final) == 2 * 9 and final.keys() == ref.keys() and all(torch.equal(final[k], ref[k]) for k in final)
    # the server's model holds those blocks (and they moved from the pre-trained ones)
    server, owner = dict(engine.model.named_parameters()), dict(reference_engine.model.named_parameters())
    assert all(torch.equal(server[k].detach(), owner[k].detach()) for k in final)
    bare = dict(tiny_llama(layers=6)[0].named_parameters())
    assert any(not torch.equal(final[k], bare[k.replace("base_model.model.", "").replace(".base_layer", "")])
               for k in final)
    fields = ("losses", "downlink_bytes", "uplink_bytes", "uplink_bytes_raw")
    assert _per_job(deployed.run_dir, *fields) == _per_job(reference.run_dir, *fields)
    [agg] = run_events(deployed.run_dir, "aggregate")[-1:]
    blocks, shipped = agg["adapter_block_bytes"], agg["shipped_once_bytes"]
    first_seen: set[int] = set()
    for msg, reply in _train_messages(grid):
        content = msg.content
        client, rnd = int(content["plan"]["client-id"]), int(content["plan"]["round"])
        control = content["control"]
        sent_blocks = {k for k in control.keys() if k.startswith(BLOCK_PREFIX)}
        assert len(sent_blocks) == 2 * 9  # the blocks go down every round
        block_bytes = sum(control[k].numpy().nbytes for k in sent_blocks)
        assert block_bytes == blocks
        emulator = _array_bytes(control) - block_bytes
        assert emulator == (shipped if client not in first_seen else 0)  # the emulator once per client
        first_seen.add(client)
        assert _array_bytes(control) == _per_job(deployed.run_dir, "downlink_bytes")[(rnd, client)][0]
        # the trained blocks come back as update.tensors (packed raw bytes), nothing else
        assert set(json.loads(str(reply.content["update"]["manifests"]))) == {"tensors"}
        assert len(reply.content["tensors"]["packed"].data) == blocks
        assert blocks == _per_job(deployed.run_dir, "uplink_bytes")[(rnd, client)][0]
    # FedAvg of bytes as in test_fedot_full: blocks 0 and 5 of tiny-llama in float32
    assert blocks == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) * 4


# --- Ditto and FedPer: personal state on the nodes -------------------------------------------------------
@pytest.mark.parametrize("method, personal_name", [("ditto", "ditto_personal"), ("fedper", "fedper_personal")])
def test_personal_methods_under_flower_keep_the_in_process_personal_state_on_the_nodes(tmp_path, method,
                                                                                       personal_name):
    """Ditto (a personal job per client, proximal to the received global adapter) and FedPer (personal
    layers merged from the client's store): the global adapter, every job's losses and each client's
    personal state (in its node's store) equal the in-process run's; the personal scores come from the nodes."""
    from fedpeft.deploy.flower.store import NodeClientStore

    cfg = load_config("configs/tiny.yaml", BASE + [f"method.name={method}", "federation.rounds=2",
                                                   "evaluation.every_rounds=2"])
    engine, grid = _flower_engine(cfg, tmp_path / "flower", tmp_path)
    deployed = engine.run()
    reference_engine = Engine(cfg, tmp_path / "ref")
    reference = reference_engine.run()
    from safetensors.torch import load_file

    final, ref = (load_file(str(s.run_dir / "final" / "adapter_model.safetensors")) for s in (deployed, reference))
    assert final.keys() == ref.keys() and all(torch.equal(final[k], ref[k]) for k in final)
    jobs = lambda d: {(e["round"], e["client"], e["job"]): (e["losses"], e["downlink_bytes"], e["uplink_bytes"],
                                                            e["uplink_bytes_raw"])
                      for e in run_events(d, "client_train")}
    assert jobs(deployed.run_dir) == jobs(reference.run_dir)
    stores = [NodeClientStore(tmp_path / "stores" / f"node-{i}") for i in range(2)]
    compared = 0
    for client in range(cfg.federation.num_clients):
        expected = reference_engine.store.get(client, personal_name)
        got = [s.get(client, personal_name) for s in stores]
        got = [g for g in got if g is not None]
        if expected is None:
            assert not got
            continue
        [node_state] = got
        assert node_state.keys() == expected.keys() and all(torch.equal(node_state[k], expected[k]) for k in expected)
        compared += 1
    assert compared >= 2
    assert not list((tmp_path / "flower" / "client_store").glob(f"*/{personal_name}*"))  # nothing on the server
    [personal] = [e for e in run_events(deployed.run_dir, "eval") if e.get("split") == "personal"]
    [simulated] = [e for e in run_events(reference.run_dir, "eval") if e.get("split") == "personal"]
    assert personal["scored_on"] == "nodes" and personal["per_client"] == simulated["per_client"]


# --- what `fedpeft methods` and `fedpeft deploy` say -----------------------------------------------------
def test_methods_say_which_run_under_flower_and_deploy_refuses_the_others(tmp_path):
    from fedpeft.commands.methods import _flags
    from fedpeft.deploy.flower.app import write_app
    from fedpeft.strategies import method_catalog

    flags = {e["name"]: _flags(e) for e in method_catalog()}
    assert all("Flower: yes" in flags[m].split(", ") for m in ("fedot", "fedkseed", "ditto", "fedper", "fedit"))
    assert "Flower: no" in flags["sfl"].split(", ")
    cfg = load_config("configs/tiny.yaml", ["method.name=sfl", "method.options.cut=1-2"])
    with pytest.raises(ValueError, match="method.name=sfl cannot run under a Flower deployment: the trunk runs"):
        write_app(tmp_path / "app", cfg)
    assert not (tmp_path / "app").exists()


# --- a node that never holds the owner's weights (SmolLM2, slow) ---------------------------------------------
@pytest.mark.slow
@pytest.mark.long
def test_fedot_smollm2_node_built_from_the_architecture_alone(tmp_path):
    """SmolLM2-135M under Flower, each node started with ``model-path="random:<the owner's config.json>"``:
    the architecture and tokenizer with randomly initialised weights, never the owner's. The nodes train on
    the emulator-model they received and give the in-process run's adapter and losses bit for bit."""
    pytest.importorskip("gguf")
    from safetensors.torch import load_file

    from fedpeft.models.registry import cache_dir, load_base_model

    owner_config = cache_dir() / "models" / "smollm2-135m-instruct" / "config.json"
    if not owner_config.is_file():
        load_base_model("smollm2-135m-instruct")  # converts the bundled GGUF once
    cfg = load_config("configs/tiny.yaml", [
        "model.name=smollm2-135m-instruct", "model.threads=2", "federation.num_clients=2",
        "federation.clients_per_round=2", "federation.rounds=2", "federation.local_steps=1",
        "federation.batch_size=2", "data.train_examples_per_task=8", "evaluation.every_rounds=0",
        "evaluation.before_training=false", "output.report=false", "method.name=fedot",
        "method.options.a=2", "method.options.b=2", "method.options.drop_ratio=0.5"])
    run_config = run_config_values(cfg)
    nodes = rehearsal_node_configs(2, 2, tmp_path / "stores", warm_worker=False)
    for node in nodes:
        node["model-path"] = f"random:{owner_config}"
    grid = FakeGrid(run_config, nodes)
    transport = functools.partial(FlowerTransport, grid, DeploySettings.from_run_config(run_config))
    deployed = Engine(cfg, tmp_path / "flower", transport=transport).run()
    reference = Engine(cfg, tmp_path / "ref").run()
    final, ref = (load_file(str(s.run_dir / "final" / "adapter_model.safetensors")) for s in (deployed, reference))
    assert final.keys() == ref.keys() and all(torch.equal(final[k], ref[k]) for k in final)
    fields = ("losses", "downlink_bytes", "uplink_bytes", "uplink_bytes_raw")
    assert _per_job(deployed.run_dir, *fields) == _per_job(reference.run_dir, *fields)
    agg = run_events(deployed.run_dir, "aggregate")[0]
    assert flower_node._WORKER[1].strategy.released_bytes == agg["owner_model_bytes"] - agg["shipped_once_bytes"]
    print("released_bytes", flower_node._WORKER[1].strategy.released_bytes)
    print("owner_model_bytes", agg["owner_model_bytes"], "shipped_once_bytes", agg["shipped_once_bytes"],
          "jobs", _per_job(deployed.run_dir, "downlink_bytes", "uplink_bytes", "uplink_bytes_raw"),
          "deploy_round", [(e["message_down_bytes"], e["message_up_bytes"])
                           for e in run_events(deployed.run_dir, "deploy_round")])


# --- real Flower processes (slow): warm workers keep the received state in memory --------------------------
@pytest.mark.slow
@pytest.mark.long
def test_rehearsal_of_fedkseed_and_fedot_matches_the_in_process_runs(tmp_path, six_block_model):
    """flower-superlink + two flower-supernode processes with warm workers: FedKSeed (catch-up by replay)
    and distilled FedOT (the received emulator-model) give the in-process runs' adapters, losses and bytes."""
    from safetensors.torch import load_file

    from fedpeft.deploy.flower.app import write_app
    from fedpeft.deploy.flower.local import LocalFederation

    nodes = rehearsal_node_configs(2, 3, tmp_path / "stores")
    env = {"FEDPEFT_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    runs = {
        "kseed": ["method.name=fedkseed", "method.options.k=64", "training.lr=0.001"],
        "fedot": [f"model.name={six_block_model}", "method.name=fedot", "method.options.a=1", "method.options.b=1",
                  "method.options.drop_ratio=0.5", "method.options.distill_steps=2"],
    }
    with LocalFederation(tmp_path / "flower", nodes, env_extra=env) as federation:
        for name, overrides in runs.items():
            cfg = load_config("configs/tiny.yaml", BASE + [f"name={name}", "federation.rounds=3", *overrides])
            app = write_app(tmp_path / f"app-{name}", cfg, run_dir=str(tmp_path / name))
            run_id, status = federation.run(app, timeout=400)
            assert status == "finished:completed", (name, run_id, status)
            reference = Engine(cfg, tmp_path / f"ref-{name}").run()
            final, ref = (load_file(str(d / "final" / "adapter_model.safetensors"))
                          for d in (tmp_path / name, reference.run_dir))
            assert final.keys() == ref.keys() and all(torch.equal(final[k], ref[k]) for k in final), name
            fields = ("losses", "downlink_bytes", "uplink_bytes")
            assert _per_job(tmp_path / name, *fields) == _per_job(reference.run_dir, *fields), name
            assert not run_events(tmp_path / name, "client_failed")
