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
from fedpeft.deploy.flower.secagg import check_secure_method, mean_state, quantization_bound, run_secure_round
from fedpeft.deploy.flower.serde import decode_reply, decode_scores, encode_evaluate, encode_plan, record_bytes
from fedpeft.deploy.flower.settings import DeploySettings
from fedpeft.federation.transport import RunStopped, ServerLink, Transport
from fedpeft.federation.wire import LocalResult
from fedpeft.strategies.base import ClientPlan, ClientUpdate, TrainResult

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25


class ClientDropped(RuntimeError):
    """A client that did not answer in time, or whose node reported an error."""


def _raise(exc: BaseException):
    raise exc


def _hand_over(round_idx: int, plans: Sequence[ClientPlan], outcomes: Sequence[Any], answered: int,
               min_clients: int, progress: Any, what: str) -> Iterator[tuple[ClientPlan, Any]]:
    """Give the engine each plan's outcome as a job (a LocalResult, or the exception that stands for
    the client's failure); then stop the run if fewer than ``min_clients`` clients ``what``."""
    for plan, outcome in zip(plans, outcomes):
        progress.start_client(plan.client_id, 0)
        yield plan, ((lambda o=outcome: o) if isinstance(outcome, LocalResult) else (lambda e=outcome: _raise(e)))
    if answered < min_clients:
        raise RunStopped(f"round {round_idx}: {answered} of {len(plans)} clients {what}, fewer than "
                           f"min-clients={min_clients}; stopping (resume from the last checkpoint)")


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


class FlowerTransport(Transport):
    """Build it through the engine: ``Engine(cfg, run_dir, transport=functools.partial(FlowerTransport,
    grid, settings))`` gives it the server's ``ServerLink`` (base weights a method changed, the event
    log for ``deploy_round``, the clients' partition sizes)."""

    personal_state_on_server = False  # each client's private state stays in its node's store

    def __init__(self, grid: Any, settings: DeploySettings, server: ServerLink | None = None) -> None:
        self.grid = grid
        self.settings = settings
        self.server = server
        self.routes: dict[int, int] = {}  # client id -> node id
        self.secure_mean: tuple[AdapterState, float] | None = None  # SecAgg+: this round's (mean, weight)
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
        settings, server = self.settings, self.server
        needed = {p.client_id for p in plans}
        if not needed <= set(self.routes):
            self.discover(needed, settings.node_wait if self.first_round else min(settings.node_wait, 15.0))
        self.first_round = False
        base = server.base_weights() if server is not None else {}
        method = server.method if server is not None else ""
        if settings.secagg:
            yield from self._secure_jobs(round_idx, plans, global_state, lr, progress, base, method)
            return
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
                    local = decode_reply(reply.content)
                    update = local.update
                    if update.client_id != plan.client_id or update.job != plan.job:
                        raise ValueError(f"reply is for client {update.client_id} job {update.job}, "
                                         f"expected client {plan.client_id} job {plan.job}")
                    outcomes[i] = local
                    entry["client_seconds"] = local.result.seconds
                    if "node" in reply.content:
                        entry.update(_latency_split(reply.content["node"], self.pushed_at, self.pushed_at + arrived[mid]))
                except Exception as exc:  # a malformed reply is that client's failure, never the round's
                    outcomes[i] = ValueError(f"undecodable reply: {type(exc).__name__}: {exc}")
                entry["reply_seconds"] = arrived[mid]
            entry["ok"] = isinstance(outcomes[i], LocalResult)
            per_client[f"{plan.client_id}/{plan.job}"] = entry
        if server is not None:
            server.log_event("deploy_round", round=round_idx, messages=len(sent), answered=answered,
                               message_down_bytes=down_bytes, message_up_bytes=up_bytes,
                               push_seconds=t_wait - t_push, wait_seconds=t_done - t_wait, clients=per_client)
        yield from _hand_over(round_idx, plans, outcomes, answered, min_clients, progress, "answered")

    # --- secure aggregation (SecAgg+) ---------------------------------------------------------------
    def _secure_jobs(self, round_idx: int, plans: Sequence[ClientPlan], global_state: AdapterState, lr: float,
                     progress: Any, base: dict, method: str) -> Iterator[tuple[ClientPlan, Any]]:
        """One SecAgg+ round (``secagg.py``): every client's plan goes out with the protocol's masking
        stage; the replies carry each client's training result and a masked vector; the server unmasks
        only the sum. Clients that miss a stage are dropouts (their masks are recovered from shares)."""
        settings, server = self.settings, self.server
        check_secure_method(method)
        self.secure_mean = None
        outcomes: dict[int, Any] = {}
        contents: dict[int, RecordDict] = {}
        node_plan: dict[int, int] = {}
        for i, plan in enumerate(plans):
            node = self.routes.get(plan.client_id)
            if node is None:
                outcomes[i] = ClientDropped(f"no SuperNode serves client {plan.client_id}")
            elif node in contents:
                raise RuntimeError(f"round {round_idx}: secagg needs one client per SuperNode in a round; node {node} "
                                   f"serves clients {plans[node_plan[node]].client_id} and {plan.client_id} (give each "
                                   "client its own SuperNode: as many nodes as federation.num_clients)")
            else:
                contents[node] = encode_plan(round_idx, plan, global_state, lr, base, method=method)
                node_plan[node] = i
        max_weight = settings.secagg_max_weight or float(max(
            [server.client_examples(plans[i].client_id) for i in node_plan.values()] if server else [1000]))
        t0 = time.perf_counter()
        result = run_secure_round(self.grid, self._exchange, contents, round_idx, shares=settings.secagg_shares,
                                  threshold=settings.secagg_threshold, clip=settings.secagg_clip,
                                  max_weight=max_weight, timeout=settings.round_timeout)
        seconds = time.perf_counter() - t0
        for node, i in node_plan.items():
            plan, meta = plans[i], result.meta.get(node)
            if meta is None:
                outcomes[i] = ClientDropped(f"node {node} did not complete the SecAgg+ protocol "
                                            f"({'; '.join(result.failures) or 'no reply in a stage'})")
                continue
            if meta["client-id"] != plan.client_id or meta["job"] != plan.job:
                outcomes[i] = ValueError(f"reply is for client {meta['client-id']} job {meta['job']}")
                continue
            if meta["max-abs"] > settings.secagg_clip:
                log.warning("round %d client %d: update entries up to %.3g were clipped to secagg-clip=%g",
                            round_idx, plan.client_id, meta["max-abs"], settings.secagg_clip)
            update = ClientUpdate(plan.client_id, {}, int(meta["num-examples"]), job=plan.job,
                                  metrics=dict(meta["metrics"]))
            outcomes[i] = LocalResult(update, TrainResult(**meta["train"]), list(meta["losses"]), tensors_arrived=False)
        answered = len(result.meta)
        if result.mean_delta is not None and answered:
            self.secure_mean = (mean_state(result, global_state), result.weight)
            # Uplink actually sent: every stage's reply bytes, shared out per client (the masked vector
            # is the same size for all; key material differs by a few bytes).
            per_client = sum(s["up_bytes"] for s in result.stages) // answered
            for outcome in outcomes.values():
                if isinstance(outcome, LocalResult):
                    outcome.update.wire_bytes = per_client
        if server is not None:
            weights = [m["num-examples"] for m in result.meta.values()]
            server.log_event("deploy_round", round=round_idx, secagg=True, messages=len(contents),
                               answered=answered, stages=result.stages, seconds=seconds, max_weight=max_weight,
                               clip=settings.secagg_clip,
                               max_abs_update=max((m["max-abs"] for m in result.meta.values()), default=0.0),
                               error_bound=quantization_bound(settings.secagg_clip, weights, max_weight) if weights else None,
                               message_down_bytes=sum(s["down_bytes"] for s in result.stages),
                               message_up_bytes=sum(s["up_bytes"] for s in result.stages))
        yield from _hand_over(round_idx, plans, [outcomes[i] for i in range(len(plans))], answered,
                              settings.min_clients, progress, "completed secure aggregation")

    # --- personalised evaluation on the nodes ----------------------------------------------------------
    def evaluate_personal(self, round_idx: int, global_state: AdapterState, clients: list[int]
                          ) -> dict[int, float] | None:
        """Configure-evaluate / aggregate-evaluate: one "evaluate" message per node serving some of
        ``clients`` (the global adapter and the client ids), each node scores its clients with their own
        adapters, the scores come back as metrics. Clients whose node fails or does not answer in
        ``round-timeout`` are missing from the result (logged)."""
        self.discover(set(clients), min(self.settings.node_wait, 15.0))
        by_node: dict[int, list[int]] = {}
        for client in clients:
            if client in self.routes:
                by_node.setdefault(self.routes[client], []).append(client)
        base = self.server.base_weights() if self.server is not None else {}
        messages = [Message(encode_evaluate(round_idx, ids, global_state, base), dst_node_id=node,
                            message_type="evaluate", group_id=f"evaluate-{round_idx}", ttl=self.settings.round_timeout)
                    for node, ids in sorted(by_node.items())]
        ids, replies, _ = self._exchange(messages, self.settings.round_timeout)
        scores: dict[int, float] = {}
        for msg, mid in zip(messages, ids):
            node = msg.metadata.dst_node_id
            reply = replies.get(mid) if mid else None
            if reply is None or reply.has_error():
                why = "no reply" if reply is None else f"{reply.error.code}: {reply.error.reason}"
                log.warning("personal evaluation of clients %s on node %d failed (%s)", by_node[node], node, why)
                continue
            scores.update(decode_scores(reply.content))
        unserved = sorted(set(clients) - set(self.routes))
        if unserved:
            log.warning("personal evaluation: no SuperNode serves client(s) %s", unserved)
        return scores

    def combine(self, round_idx: int, global_state: AdapterState, updates: list) -> list:
        """The updates the strategy aggregates. Plain rounds: each client's. SecAgg+ rounds: one update,
        the unmasked weighted mean with the summed weight (only clients that passed ``check_update``,
        i.e. all that completed the protocol: the sum cannot be split after the fact)."""
        if not self.settings.secagg:
            return updates
        if self.secure_mean is None:
            return []
        mean, weight = self.secure_mean
        ids = sorted(u.client_id for u in updates)
        return [ClientUpdate(client_id=ids[0] if ids else -1, tensors=mean, num_examples=int(weight), job="secagg",
                             metrics={"secagg_clients": float(len(ids))})]
