"""The Flower ClientApp: the client side of a round, the same ``ClientRunner`` as the in-process engine.

``train``: decode the plan (``serde``), train it with ``ClientRunner.run`` on this node's data, reply
with the ClientUpdate and TrainResult. ``query``: answer which client ids this node serves (from its
node config), so the server can route each client's plan to its node.

Everything training needs (config, data split, base model + PEFT wrap, strategy, client store) is built
once per process and kept in a module global keyed by (run, node). Flower 1.41/1.42 start a fresh
``flwr-clientapp`` process per message, so by default (node config ``warm-worker=true``) this process
stays thin (flwr only, no torch) and forwards the plan to the node's warm worker (``worker.py``), which
builds once per run and keeps the model loaded; with ``warm-worker=false`` the build is paid per message
in the ClientApp process itself. Either way the model is loaded from a local path or cache (node config
``model-path``, ``FEDPEFT_CACHE_DIR``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

log = logging.getLogger(__name__)

def _secagg_mod(msg, ctxt, call_next):
    from fedpeft.deploy.flower.secagg import secagg_mod

    return secagg_mod(msg, ctxt, call_next)


app = ClientApp(mods=[_secagg_mod])  # SecAgg+ for messages of that protocol only (run config ``secagg``)

KILL_ENV = "FEDPEFT_DEPLOY_KILL_AT"
"""Testing aid: ``<round>:<client>`` or ``<experiment name>:<round>:<client>`` in a SuperNode's environment
makes its ClientApp SIGKILL the node's process group (the SuperNode, its SuperExec and this ClientApp)
when asked to train that client in that round: a machine dying mid-round, at a deterministic moment."""


def _maybe_kill(name: str, round_idx: int, client_id: int) -> None:
    target = os.environ.get(KILL_ENV)
    if target and target in (f"{round_idx}:{client_id}", f"{name}:{round_idx}:{client_id}"):
        import signal

        os.killpg(os.getpgid(0), signal.SIGKILL)


@dataclass
class ClientWorker:
    config: Any
    node: Any
    model: Any
    strategy: Any
    runner: Any
    store: Any
    build_seconds: float


_WORKER: tuple[str, ClientWorker] | None = None


def _key(run_config: dict, node_config: dict, run_id: int) -> str:
    blob = json.dumps([sorted(map(str, run_config.items())), sorted(map(str, node_config.items())), run_id])
    return hashlib.sha256(blob.encode()).hexdigest()


def build_worker(run_config: dict, node_config: dict, run_id: int = 0, node_id: int = 0) -> ClientWorker:
    """Config + data + model + strategy + ClientRunner for this node (what ``Engine._setup`` builds on
    the server, minus evaluation, logging and checkpoints)."""
    import time

    import torch

    from fedpeft.data.dataset import load_experiment_data
    from fedpeft.deploy.flower.settings import DeploySettings, NodeSettings
    from fedpeft.deploy.flower.store import NodeClientStore
    from fedpeft.federation.client import ClientRunner, prepare_client_data
    from fedpeft.metering.allocator import tune_malloc
    from fedpeft.models.peft_wrap import load_experiment_model
    from fedpeft.strategies import build_experiment_strategy

    start = time.perf_counter()
    settings = DeploySettings.from_run_config(run_config)
    node = NodeSettings.from_node_config(node_config)
    experiment = json.loads(json.dumps(settings.experiment))
    if node.model_path:
        experiment.setdefault("model", {})["name"] = node.model_path
    if node.data_path:
        experiment.setdefault("data", {})["source"] = node.data_path
    from fedpeft.config import build_config

    cfg = build_config(experiment)
    node.check(cfg.federation.num_clients)
    tune_malloc()
    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    data = load_experiment_data(cfg)
    loaded, model = load_experiment_model(cfg, data)
    strategy = build_experiment_strategy(cfg)
    strategy.prepare_model(model)
    client_data = prepare_client_data(cfg, data, loaded.tokenizer)
    if node.data_path:  # the whole local file belongs to this node's one client
        own = [i for i, e in enumerate(client_data.encoded) if e is not None]
        client_data.indices = [own if c == node.client_ids[0] else [] for c in range(cfg.federation.num_clients)]
    store_dir = Path(node.client_store) if node.client_store else (
        Path(tempfile.gettempdir()) / "fedpeft-client-store" / f"node-{node_id}" / f"run-{run_id}")
    store = NodeClientStore(store_dir)
    runner = ClientRunner(model, strategy, cfg, client_data, store)
    return ClientWorker(cfg, node, model, strategy, runner, store, time.perf_counter() - start)


def get_worker(run_config: dict, node_config: dict, run_id: int, node_id: int) -> ClientWorker:
    global _WORKER
    key = _key(run_config, node_config, run_id)
    if _WORKER is None or _WORKER[0] != key:
        _WORKER = None  # free the previous run's model first
        _WORKER = (key, build_worker(run_config, node_config, run_id, node_id))
    return _WORKER[1]


def handle_train(content: RecordDict, run_config: dict, node_config: dict, run_id: int, node_id: int) -> RecordDict:
    """Train the plan in ``content``; returns the reply content. Runs in the ClientApp process (cold) or
    in the node's warm worker (``worker.py``)."""
    from fedpeft.deploy.flower.serde import decode_plan, encode_result
    from fedpeft.models.peft_wrap import set_base_weights

    worker = get_worker(run_config, node_config, run_id, node_id)
    received = decode_plan(content)
    plan = received.plan
    if plan.client_id not in worker.node.client_ids:
        raise ValueError(f"this node serves clients {worker.node.client_ids}, not client {plan.client_id}")
    if received.base_weights:
        set_base_weights(worker.model, received.base_weights)
    _maybe_kill(worker.config.name, received.round_idx, plan.client_id)
    worker.store.begin_round(received.round_idx)
    local = worker.runner.run(received.round_idx, plan, received.start_state, received.lr)
    # The node keeps its private state now (the server's acceptance is not known here); it never leaves the node.
    worker.strategy.commit_private(local.update, worker.store)
    from fedpeft.deploy.flower.secagg import is_secagg_message, secagg_reply

    if is_secagg_message(content):  # only the masked vector leaves the node (flwr's secaggplus_mod masks it)
        reference = {**received.start_state, **(plan.init_state if plan.init_state is not None else plan.downlink)}
        reply = secagg_reply(local.update, local.result, local.losses, reference)
    else:
        reply = encode_result(local.update, local.result, local.losses)
    reply["node"] = ConfigRecord({"pid": os.getpid(), "build-seconds": float(worker.build_seconds)})
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    from fedpeft.deploy.flower.settings import NodeSettings

    handler_start = time.time()
    run_config, node_config = dict(context.run_config), dict(context.node_config)
    node = NodeSettings.from_node_config(node_config)
    if node.warm_worker:
        from fedpeft.deploy.flower import worker

        content = worker.call("train", msg.content, run_config, node_config, msg.metadata.run_id, context.node_id,
                              idle=node.worker_idle)
    else:
        content = handle_train(msg.content, run_config, node_config, msg.metadata.run_id, context.node_id)
    # Wall-clock stamps for the server's latency split (deploy_round events; same clock in a rehearsal).
    timing = dict(content["node"]) if "node" in content else {}
    timing.update({"process-start": _process_start(), "handler-start": handler_start, "handler-end": time.time(),
                   "warm": node.warm_worker})
    content["node"] = ConfigRecord(timing)
    return Message(content=content, reply_to=msg)


def _process_start() -> float:
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # diagnostics only
        return 0.0


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which client ids this node serves (cheap: reads the node config; starts the warm worker, which
    builds in the background)."""
    from fedpeft.deploy.flower.settings import NodeSettings

    node_config = dict(context.node_config)
    node = NodeSettings.from_node_config(node_config)
    if node.warm_worker:  # a run starts with this query: let the node's worker build meanwhile
        from fedpeft.deploy.flower import worker

        sock = worker.ensure_started(dict(context.run_config), node_config, msg.metadata.run_id, context.node_id,
                                     node.worker_idle, wait=False)
        if sock is not None:
            sock.close()
    return Message(content=RecordDict({"node": ConfigRecord({"client-ids": json.dumps(node.client_ids)})}),
                   reply_to=msg)
