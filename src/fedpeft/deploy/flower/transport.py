"""``FlowerTransport``: the engine's round loop over a Flower Grid.

Per round: every plan becomes one "train" Message to the SuperNode that serves its client (learned by a
"query" message: each node answers with the client ids of its node config), all are pushed at once,
replies are pulled until all are in, or ``round-timeout`` passes, or (once ``min-clients`` replies are
in) ``straggler-timeout`` passes. The engine then sees each plan's outcome exactly as in process: a
reply becomes the LocalResult, a Flower error reply (the ClientApp raised, the node went offline), a
missing reply or an undecodable one raises, and the engine logs ``client_failed``; updates that arrive
still go through ``strategy.check_update``. Fewer than ``min-clients`` replies stop the run after the
failures are logged (the last checkpoint stays the resume point).

Each round also logs a ``deploy_round`` event (message bytes, push / wait seconds, per-client reply
latency and the client's own training time) to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fedpeft.adapters import AdapterState
from fedpeft.deploy.flower.serde import decode_result, encode_plan, record_bytes
from fedpeft.deploy.flower.settings import DeploySettings
from fedpeft.federation.client import LocalResult
from fedpeft.strategies.base import ClientPlan

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25


class ClientDropped(RuntimeError):
    """A client that did not answer in time, or whose node reported an error."""


def _raise(exc: BaseException):
    raise exc


def _latency_split(node: Any, pushed_at: float, pulled_at: float) -> dict[str, float]:
    """Where a reply's wait went, from the ClientApp's wall-clock stamps (one clock in a rehearsal; across
    machines the split is off by their clock skew): ``queue`` push -> ClientApp process start (SuperNode
    and SuperExec polling, process spawn), ``startup`` process start -> handler (interpreter, flwr import,
    FAB install, pulling the message), ``handler`` (training, plus the build when cold or first), ``return``
    handler end -> reply pulled by the server (SuperNode push, polling)."""
    out = {"build_seconds": float(node.get("build-seconds", 0.0))}
    start, begin, end = (float(node.get(k, 0.0)) for k in ("process-start", "handler-start", "handler-end"))
    if start and begin and end:
        out.update(queue_seconds=start - pushed_at, startup_seconds=begin - start, handler_seconds=end - begin,
                   return_seconds=pulled_at - end)
    return out


class FlowerTransport:
    def __init__(self, grid: Any, settings: DeploySettings, engine: Any = None) -> None:
        self.grid = grid
        self.settings = settings
        self.engine = engine
        """The Engine this transport serves (set after construction): its model holds the base weights a
        method changed, its metrics log takes the ``deploy_round`` events."""
        self.routes: dict[int, int] = {}  # client id -> node id
        self.queried: set[int] = set()
        self.first_round = True

    # --- routing ----------------------------------------------------------------------------------
    def _exchange(self, messages: list[Message], timeout: float, enough=None):
        """Push ``messages``; pull replies until all arrived, ``timeout`` passed or ``enough(replies)``.
        Returns the message ids (None where the push was refused), the replies by message id and the
        seconds after the push at which each reply was pulled."""
        start = time.monotonic()
        self.pushed_at = time.time()
        ids = list(self.grid.push_messages(messages)) if messages else []
        pending = {mid for mid in ids if mid}
        replies: dict[str, Message] = {}
        arrived: dict[str, float] = {}
        deadline = start + timeout
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid in pending:
                    pending.discard(mid)
                    replies[mid] = reply
                    arrived[mid] = time.monotonic() - start
            if enough is not None and enough(replies):
                break
            if pending:
                time.sleep(POLL_SECONDS)
        return ids, replies, arrived

    def discover(self, needed: set[int], wait: float) -> None:
        """Ask nodes not asked yet which clients they serve, until ``needed`` is covered or ``wait`` passes."""
        deadline = time.monotonic() + wait
        while True:
            fresh = [n for n in self.grid.get_node_ids() if n not in self.queried]
            if fresh:
                msgs = [Message(RecordDict({"ask": ConfigRecord({"what": "client-ids"})}), dst_node_id=n,
                                message_type="query", ttl=max(wait, 30.0)) for n in fresh]
                ids, replies, _ = self._exchange(msgs, max(5.0, deadline - time.monotonic()))
                for msg, mid in zip(msgs, ids):
                    reply = replies.get(mid)
                    if reply is None or reply.has_error():
                        continue  # asked again only if it shows up as a new node
                    node = msg.metadata.dst_node_id
                    self.queried.add(node)
                    for cid in json.loads(str(reply.content["node"]["client-ids"])):
                        if cid in self.routes and self.routes[cid] != node:
                            log.warning("client %d is served by nodes %d and %d; using %d", cid, self.routes[cid],
                                        node, node)
                        self.routes[cid] = node
            if needed <= set(self.routes) or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        missing = sorted(needed - set(self.routes))
        if missing:
            log.warning("no SuperNode serves client(s) %s (nodes: %s)", missing, self.routes)

    # --- a round ----------------------------------------------------------------------------------
    def jobs(self, round_idx: int, plans: Sequence[ClientPlan], global_state: AdapterState, lr: float,
             progress: Any) -> Iterator[tuple[ClientPlan, Any]]:
        settings, engine = self.settings, self.engine
        needed = {p.client_id for p in plans}
        if not needed <= set(self.routes):
            self.discover(needed, settings.node_wait if self.first_round else min(settings.node_wait, 15.0))
        self.first_round = False
        base = {}
        if engine is not None and getattr(engine, "base_touched", None):
            from fedpeft.models.peft_wrap import base_weights

            base = base_weights(engine.model, sorted(engine.base_touched))
        method = engine.config.method.name if engine is not None else ""
        outcomes: list[Any] = [None] * len(plans)
        sent: list[tuple[int, Message]] = []
        down_bytes = 0
        t_push = time.perf_counter()
        for i, plan in enumerate(plans):
            node = self.routes.get(plan.client_id)
            if node is None:
                outcomes[i] = ClientDropped(f"no SuperNode serves client {plan.client_id}")
                continue
            content = encode_plan(round_idx, plan, global_state, lr, base, method=method)  # a callable: run fails
            down_bytes += record_bytes(content)
            sent.append((i, Message(content, dst_node_id=node, message_type="train", group_id=str(round_idx),
                                    ttl=settings.round_timeout)))
        min_clients = settings.min_clients
        straggler = settings.straggler_timeout
        first_enough: list[float] = []

        def enough(replies: dict[str, Message]) -> bool:
            ok = sum(1 for r in replies.values() if not r.has_error())
            if straggler > 0 and ok >= min_clients:
                if not first_enough:
                    first_enough.append(time.monotonic())
                return time.monotonic() - first_enough[0] >= straggler
            return False

        t_wait = time.perf_counter()
        ids, replies, arrived = self._exchange([m for _, m in sent], settings.round_timeout, enough)
        t_done = time.perf_counter()
        up_bytes, per_client, answered = 0, {}, 0
        for (i, msg), mid in zip(sent, ids):
            plan = plans[i]
            reply = replies.get(mid) if mid else None
            entry = {"node": msg.metadata.dst_node_id}
            if not mid:
                outcomes[i] = ClientDropped(f"the SuperLink refused the message for client {plan.client_id}")
            elif reply is None:
                outcomes[i] = ClientDropped(f"no reply from node {msg.metadata.dst_node_id} within "
                                            f"{t_done - t_wait:.1f} s (node killed, offline or too slow)")
            elif reply.has_error():
                outcomes[i] = ClientDropped(f"node {msg.metadata.dst_node_id} replied with Flower error "
                                            f"{reply.error.code}: {reply.error.reason}")
            else:
                answered += 1
                up_bytes += record_bytes(reply.content)
                try:
                    update, result, losses = decode_result(reply.content)
                    if update.client_id != plan.client_id or update.job != plan.job:
                        raise ValueError(f"reply is for client {update.client_id} job {update.job}, "
                                         f"expected client {plan.client_id} job {plan.job}")
                    outcomes[i] = LocalResult(update, result, losses)
                    entry["client_seconds"] = result.seconds
                    if "node" in reply.content:
                        entry.update(_latency_split(reply.content["node"], self.pushed_at, self.pushed_at + arrived[mid]))
                except Exception as exc:  # a malformed reply is that client's failure, never the round's
                    outcomes[i] = ValueError(f"undecodable reply: {type(exc).__name__}: {exc}")
                entry["reply_seconds"] = arrived[mid]
            entry["ok"] = isinstance(outcomes[i], LocalResult)
            per_client[f"{plan.client_id}/{plan.job}"] = entry
        if engine is not None and getattr(engine, "metrics", None) is not None:
            engine.metrics.log("deploy_round", round=round_idx, messages=len(sent), answered=answered,
                               message_down_bytes=down_bytes, message_up_bytes=up_bytes,
                               push_seconds=t_wait - t_push, wait_seconds=t_done - t_wait, clients=per_client)
        for plan, outcome in zip(plans, outcomes):
            progress.start_client(plan.client_id, 0)
            if isinstance(outcome, LocalResult):
                yield plan, (lambda o=outcome: o)
            else:
                yield plan, (lambda e=outcome: _raise(e))
        if answered < min_clients:
            raise RuntimeError(f"round {round_idx}: {answered} of {len(plans)} clients answered, fewer than "
                               f"min-clients={min_clients}; stopping (resume from the last checkpoint)")
