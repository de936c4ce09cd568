"""The training side of a SuperNode: config, data, model, strategy, ClientRunner and Evaluator built
once per (run, node), and the handlers of its "train" and "evaluate" messages.

Runs in the ClientApp process (cold path, ``warm-worker=false``) or in the node's warm worker
(``worker.py``). A reply is checked on the node with the engine's own checks
(``federation/update_checks.py``) before the client's private state (FedSA-LoRA's B, SCAFFOLD's c_k)
is committed to the node's store: a client whose update is rejected leaves nothing behind, and the
server, which checks again, logs it as ``client_failed``. Then the upload is encoded with the wire
codec (``federation.uplink_compression``) and ``serde`` carries the encoded payload. An "evaluate"
message scores the node's clients with their own adapters (personalised evaluation where the private
state lives) and returns the scores.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict

from fedpeft.config import build_config
from fedpeft.data.dataset import load_experiment_data
from fedpeft.deploy.flower.secagg import is_secagg_message, secagg_reply
from fedpeft.deploy.flower.serde import decode_evaluate, decode_plan, encode_result, encode_scores
from fedpeft.deploy.flower.settings import DeploySettings, NodeSettings
from fedpeft.deploy.flower.store import NodeClientStore
from fedpeft.federation.client import ClientRunner, prepare_client_data
from fedpeft.federation.evaluator import Evaluator
from fedpeft.federation.update_checks import check_client_update
from fedpeft.federation.wire import encode_upload
from fedpeft.metering.allocator import tune_malloc
from fedpeft.models.peft_wrap import load_experiment_model, set_base_weights
from fedpeft.strategies import build_experiment_strategy

KILL_ENV = "FEDPEFT_DEPLOY_KILL_AT"
"""Testing aid: ``<round>:<client>`` or ``<experiment name>:<round>:<client>`` in a SuperNode's environment
makes its ClientApp SIGKILL the node's process group (the SuperNode, its SuperExec and this ClientApp)
when asked to train that client in that round: a machine dying mid-round, at a deterministic moment."""


def _maybe_kill(name: str, round_idx: int, client_id: int) -> None:
    target = os.environ.get(KILL_ENV)
    if target and target in (f"{round_idx}:{client_id}", f"{name}:{round_idx}:{client_id}"):
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
    evaluator: Evaluator
    """Scores this node's clients with their own adapters (personalised evaluation on the node)."""


_WORKER: tuple[str, ClientWorker] | None = None


def _key(run_config: dict, node_config: dict, run_id: int) -> str:
    blob = json.dumps([sorted(map(str, run_config.items())), sorted(map(str, node_config.items())), run_id])
    return hashlib.sha256(blob.encode()).hexdigest()


def build_worker(run_config: dict, node_config: dict, run_id: int = 0, node_id: int = 0) -> ClientWorker:
    """Config + data + model + strategy + ClientRunner for this node (what ``Engine._setup`` builds on
    the server, minus evaluation, logging and checkpoints)."""
    start = time.perf_counter()
    settings = DeploySettings.from_run_config(run_config)
    node = NodeSettings.from_node_config(node_config)
    experiment = json.loads(json.dumps(settings.experiment))
    if node.model_path:
        experiment.setdefault("model", {})["name"] = node.model_path
    if node.data_path:
        experiment.setdefault("data", {})["source"] = node.data_path
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
    evaluator = Evaluator(model, loaded.tokenizer, cfg, data, strategy, store, metrics=None,
                          client_indices=client_data.indices, labels=client_data.labels)
    return ClientWorker(cfg, node, model, strategy, runner, store, time.perf_counter() - start, evaluator)


def get_worker(run_config: dict, node_config: dict, run_id: int, node_id: int) -> ClientWorker:
    global _WORKER
    key = _key(run_config, node_config, run_id)
    if _WORKER is None or _WORKER[0] != key:
        _WORKER = None  # free the previous run's model first
        _WORKER = (key, build_worker(run_config, node_config, run_id, node_id))
    return _WORKER[1]


def handle_train(content: RecordDict, run_config: dict, node_config: dict, run_id: int, node_id: int) -> RecordDict:
    """Train the plan in ``content``; returns the reply content. A rejected update raises (Flower's
    error reply; the server logs ``client_failed``) before any private state is committed."""
    worker = get_worker(run_config, node_config, run_id, node_id)
    received = decode_plan(content)
    plan = received.plan
    if plan.client_id not in worker.node.client_ids:
        raise ValueError(f"this node serves clients {worker.node.client_ids}, not client {plan.client_id}")
    if received.base_weights:
        set_base_weights(worker.model, received.base_weights)
    _maybe_kill(worker.config.name, received.round_idx, plan.client_id)
    # The global state as the server holds it (keys the plan leaves unset + the plan's own), taken
    # before the client merges its private tensors into the plan.
    downlink = plan.downlink
    reference = {**received.start_state, **(plan.init_state if plan.init_state is not None else plan.downlink)}
    worker.store.begin_round(received.round_idx)
    local = worker.runner.train(received.round_idx, plan, received.start_state, received.lr)
    check_client_update(worker.strategy, plan, reference, local.update,
                        max_update_norm=worker.config.federation.max_update_norm)
    worker.strategy.commit_private(local.update, worker.store)  # only now: the update passed the checks
    if is_secagg_message(content):  # only the masked vector leaves the node (flwr's secaggplus_mod masks it)
        reply = secagg_reply(local.update, local.result, local.losses, reference)
    else:
        encode_upload(local, downlink, worker.config.federation.uplink_compression)
        reply = encode_result(local.update, local.result, local.losses, encoding=local.encoding)
    reply["node"] = ConfigRecord({"pid": os.getpid(), "build-seconds": float(worker.build_seconds)})
    return reply


def handle_evaluate(content: RecordDict, run_config: dict, node_config: dict, run_id: int, node_id: int
                    ) -> RecordDict:
    """Score the requested clients this node serves, each with its own adapter (its private state is
    here, in the node's store); returns client -> headline score. The server aggregates them."""
    worker = get_worker(run_config, node_config, run_id, node_id)
    request = decode_evaluate(content)
    if request.base_weights:
        set_base_weights(worker.model, request.base_weights)
    mine = [c for c in request.client_ids if c in worker.node.client_ids]
    return encode_scores(worker.evaluator.personal_scores(request.global_state, mine))


HANDLERS = {"train": handle_train, "evaluate": handle_evaluate}
"""Message type -> handler (the ClientApp's cold path and the warm worker dispatch through it)."""
