"""The Flower ClientApp: the client side of a round, the same ``ClientRunner`` as the in-process engine.

``train``: ``node.handle_train`` (decode the plan, train it with the same ``ClientRunner`` on this
node's data, check the update, commit the client's private state, encode the upload), in this process
or in the node's warm worker. ``query``: answer which client ids this node serves (from its
node config), so the server can route each client's plan to its node. ``evaluate``:
``node.handle_evaluate`` (personalised evaluation of the node's clients with their own adapters).

Everything training needs (config, data split, base model + PEFT wrap, strategy, client store) is built
once per process by ``node.py`` and kept keyed by (run, node). Flower 1.41/1.42 start a fresh
``flwr-clientapp`` process per message, so by default (node config ``warm-worker=true``) this process
stays thin (flwr only, no torch) and forwards the plan to the node's warm worker (``worker.py``), which
builds once per run and keeps the model loaded; with ``warm-worker=false`` the build is paid per message
in the ClientApp process itself. Either way the model is loaded from a local path or cache (node config
``model-path``, ``FEDPEFT_CACHE_DIR``).
"""

from __future__ import annotations

import json
import logging
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.deploy.flower import worker
from fedpeft.deploy.flower.secagg import secagg_mod
from fedpeft.deploy.flower.settings import NodeSettings

log = logging.getLogger(__name__)

app = ClientApp(mods=[secagg_mod])  # SecAgg+ for messages of that protocol only (run config ``secagg``)

KILL_ENV = "FEDPEFT_DEPLOY_KILL_AT"  # the testing aid of ``node.py`` (kept here for its users)


def _handle(kind: str, msg: Message, context: Context) -> RecordDict:
    run_config, node_config = dict(context.run_config), dict(context.node_config)
    node = NodeSettings.from_node_config(node_config)
    if node.warm_worker:
        return worker.call(kind, msg.content, run_config, node_config, msg.metadata.run_id, context.node_id,
                           idle=node.worker_idle)
    # Cold path: torch and the model stack are imported here, not at module import, so the warm path's
    # ClientApp process stays thin (flwr only); a start-up cost, not an import cycle.
    from fedpeft.deploy.flower.node import HANDLERS

    return HANDLERS[kind](msg.content, run_config, node_config, msg.metadata.run_id, context.node_id)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Personalised evaluation where the clients' private state lives: scores come back as metrics."""
    return Message(content=_handle("evaluate", msg, context), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    handler_start = time.time()
    node = NodeSettings.from_node_config(dict(context.node_config))
    content = _handle("train", msg, context)
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
    node_config = dict(context.node_config)
    node = NodeSettings.from_node_config(node_config)
    if node.warm_worker:  # a run starts with this query: let the node's worker build meanwhile
        sock = worker.ensure_started(dict(context.run_config), node_config, msg.metadata.run_id, context.node_id,
                                     node.worker_idle, wait=False)
        if sock is not None:
            sock.close()
    return Message(content=RecordDict({"node": ConfigRecord({"client-ids": json.dumps(node.client_ids)})}),
                   reply_to=msg)
