"""Secure aggregation (Flower's SecAgg+) under the engine: the real ClientApp with its SecAgg+ mod in
process behind a fake Grid (``flower_fakes.FakeGrid``) that keeps each node's Flower context between
messages, as a SuperNode does.

Properties: the aggregate equals the in-process FedIT aggregate within the quantisation bound; no reply
carries an unmasked tensor; a client lost after masking is recovered from shares and the round equals
the in-process round without it; unsupported methods and set-ups are refused with a clear error."""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedpeft[flower]')")

from flower_fakes import FakeGrid, flower_env  # noqa: F401 (an autouse fixture)
from safetensors.torch import load_file

from fedpeft.config import load_config
from fedpeft.deploy.flower.app import run_config_values
from fedpeft.deploy.flower.local import rehearsal_node_configs
from fedpeft.deploy.flower.secagg import SECAGG_CONFIGS, check_secure_method
from fedpeft.deploy.flower.settings import DeploySettings
from fedpeft.deploy.flower.transport import FlowerTransport
from fedpeft.federation.engine import Engine, run_experiment
from fedpeft.federation.transport import InProcessTransport, Transport
from helpers import run_events

ONE_ROUND = ["federation.rounds=1", "evaluation.before_training=false", "output.report=false"]


def _secure_engine(cfg, run_dir, tmp_path, nodes, tamper=None, **settings):
    run_config = run_config_values(cfg, secagg=True, round_timeout=5.0, **settings)
    nodes = rehearsal_node_configs(nodes, cfg.federation.num_clients, tmp_path / "stores", warm_worker=False)
    grid = FakeGrid(run_config, nodes, tamper)
    engine = Engine(cfg, run_dir, transport=functools.partial(FlowerTransport, grid,
                                                              DeploySettings.from_run_config(run_config)))
    return engine, grid


def _final(run_dir):
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_secure_round_equals_fedit_within_the_quantisation_bound(tmp_path):
    cfg = load_config("configs/tiny.yaml", ONE_ROUND + ["federation.num_clients=3", "federation.clients_per_round=3"])
    engine, grid = _secure_engine(cfg, tmp_path / "secure", tmp_path, nodes=3)
    secure = engine.run()
    reference = run_experiment(cfg, run_dir=tmp_path / "ref")
    [event] = run_events(secure.run_dir, "deploy_round")
    assert event["secagg"] and event["answered"] == 3
    assert [s["stage"] for s in event["stages"]] == ["setup", "share_keys", "collect_masked_vectors", "unmask"]
    diff = _max_diff(_final(secure.run_dir), _final(reference.run_dir))
    print(f"secagg vs in-process: max diff {diff:.3g}, bound {event['error_bound']:.3g}; stages {event['stages']}")
    assert 0 < diff <= event["error_bound"], (diff, event["error_bound"])  # quantised, and within the bound
    assert event["error_bound"] < 1e-4
    # The per-client results (loss, examples) are the in-process ones; only the tensors were hidden.
    losses = lambda d: {e["client"]: e["losses"] for e in run_events(d, "client_train")}
    assert losses(secure.run_dir) == losses(reference.run_dir)
    # Nothing the server received holds an unmasked tensor: every ArrayRecord of every reply is empty.
    train_replies = [r for m, r in grid.seen if m.metadata.message_type == "train" and not r.has_error()]
    assert len(train_replies) == 4 * 3
    assert all(len(rec) == 0 for r in train_replies for rec in r.content.array_records.values())
    masked = [r.content[SECAGG_CONFIGS]["masked_params"] for r in train_replies
              if "masked_params" in r.content[SECAGG_CONFIGS]]
    assert len(masked) == 3 and all(isinstance(b, bytes) for vec in masked for b in vec)
    # The uplink metered per client is what went over the wire in the protocol's replies.
    up = sum(s["up_bytes"] for s in event["stages"])
    assert sum(e["uplink_bytes"] for e in run_events(secure.run_dir, "client_train")) == up - up % 3


def test_client_lost_after_masking_is_recovered_from_shares(tmp_path):
    """Node 101 (client 1) trains and masks but its masked vector never arrives: the others' shares
    remove its pairwise masks, and the round aggregates clients 0 and 2 exactly as in process."""
    cfg = load_config("configs/tiny.yaml", ONE_ROUND + ["federation.num_clients=3", "federation.clients_per_round=3"])

    def lose_masked_vector(msg, reply):
        stage = msg.content.config_records.get(SECAGG_CONFIGS, {}).get("stage") if msg.metadata.message_type == "train" else None
        return None if stage == "collect_masked_vectors" and msg.metadata.dst_node_id == 101 else reply

    engine, _ = _secure_engine(cfg, tmp_path / "secure", tmp_path, nodes=3, tamper=lose_masked_vector)
    secure = engine.run()
    failed = run_events(secure.run_dir, "client_failed")
    assert [(e["round"], e["client"]) for e in failed] == [(1, 1)] and "SecAgg+" in failed[0]["error"]
    [event] = run_events(secure.run_dir, "deploy_round")
    assert event["answered"] == 2

    ref_engine = Engine(cfg, tmp_path / "ref")
    setup = ref_engine._setup

    def setup_with_dropout():
        setup()
        inner = InProcessTransport(ref_engine.runner)

        class Drop(Transport):
            def jobs(self, round_idx, plans, global_state, lr, progress):
                for plan, job in inner.jobs(round_idx, plans, global_state, lr, progress):
                    yield plan, ((lambda: (_ for _ in ()).throw(RuntimeError("dropped"))) if plan.client_id == 1 else job)

        ref_engine.transport = Drop()

    ref_engine._setup = setup_with_dropout
    reference = ref_engine.run()
    assert _max_diff(_final(secure.run_dir), _final(reference.run_dir)) <= event["error_bound"]


def test_unsupported_set_ups_are_refused(tmp_path):
    with pytest.raises(ValueError, match="secagg: method 'fltac' needs each client's update.*fedit, fedprox, ffa_lora"):
        check_secure_method("fltac")
    # Two clients on one node in a round: SecAgg+ masks per node, so the round refuses.
    cfg = load_config("configs/tiny.yaml", ONE_ROUND + ["federation.num_clients=2", "federation.clients_per_round=2"])
    engine, _ = _secure_engine(cfg, tmp_path / "run", tmp_path, nodes=1)
    with pytest.raises(RuntimeError, match="one client per SuperNode"):
        engine.run()
    with pytest.raises(ValueError, match="expected true or false"):
        DeploySettings.from_run_config({**run_config_values(cfg), "secagg": "maybe"})
