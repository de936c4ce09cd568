"""Baselines every comparison needs (ALGORITHMS.md section 5).

- ``centralized``: one client holding all the data (set federation.num_clients=1, clients_per_round=1;
  any other client count is refused). Aggregation with a single update is that update.
- ``local_only``: every client trains its own adapter on its own data and never shares it. The adapter
  persists in the client store (``local_adapter``); nothing goes up or down. Evaluation is per client
  (``personal_state``); report the mean and spread over clients. The "global" adapter stays the initial
  one (the base model).
- ``zero_shot``: no training at all; the global adapter stays the initial one (B = 0: the base model).
  ``configure_round`` returns no plans.

Server optimizers are refused for all three: there is no federated aggregate to step on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedpeft.adapters import AdapterState
from fedpeft.strategies.base import ALL_PEFT_TYPES, AggregateResult, ClientPlan, ClientUpdate, TrainResult
from fedpeft.strategies.common import MethodStrategy, global_with_stored, refuse_uploaded
from fedpeft.strategies.registry import register_method

NO_AGGREGATE = "a baseline without federated aggregation has nothing for a server optimizer to step on"
NO_CLIENT_DP = ("a baseline without federated aggregation releases no aggregate of clients' updates "
                "(record-level DP, privacy.dp_sgd, still applies)")
LOCAL_NAME = "local_adapter"


@register_method
class Centralized(MethodStrategy):
    name = "centralized"
    peft_types = ALL_PEFT_TYPES
    summary = "baseline: one client holding all the data"
    server_optimizer_refusal = NO_AGGREGATE
    dp_refusal = NO_CLIENT_DP

    def __init__(self, options=None, server_optimizer=None) -> None:
        super().__init__(options, server_optimizer)
        num_clients = self.options.get("num_clients")
        if num_clients is not None and int(num_clients) != 1:
            raise ValueError(
                f"method 'centralized' trains one client holding all the data: set federation.num_clients=1 and "
                f"federation.clients_per_round=1 (got num_clients={num_clients})"
            )

    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        if len(updates) != 1:
            raise ValueError(f"centralized expects exactly one client update per round, got {len(updates)}")
        averaged = self.average_updates(global_state, updates, [1.0])
        return AggregateResult(global_state=self.apply_average(global_state, averaged))


@register_method
class LocalOnly(MethodStrategy):
    name = "local_only"
    peft_types = ALL_PEFT_TYPES
    summary = "baseline: each client trains alone, nothing shared (evaluate per client)"
    personalized = True
    server_optimizer_refusal = NO_AGGREGATE
    dp_refusal = NO_CLIENT_DP

    def _local(self, client_id: int, global_state: AdapterState, store: Any) -> AdapterState:
        return global_with_stored(global_state, store, client_id, LOCAL_NAME)

    def configure_client(self, round_idx: int, client_id: int, global_state: AdapterState, store: Any) -> ClientPlan:
        return ClientPlan(client_id=client_id, downlink={}, upload=[])

    def attach_client_hooks(self, round_idx: int, plan: ClientPlan, store: Any) -> None:
        stored = store.get(plan.client_id, LOCAL_NAME) if store is not None else None
        if stored is not None:  # the client's own adapter, from its own store
            plan.init_state = dict(stored)

    def client_update(self, round_idx: int, plan: ClientPlan, trained: AdapterState, result: TrainResult, store: Any) -> ClientUpdate:
        keys = plan.trainable if plan.trainable is not None else list(trained)
        store.put(plan.client_id, LOCAL_NAME, {k: trained[k].detach().float().clone() for k in keys})
        return ClientUpdate(client_id=plan.client_id, tensors={}, num_examples=result.num_examples, job=plan.job,
                            metrics={"loss": result.mean_loss})

    def check_update(self, global_state: AdapterState, update: ClientUpdate) -> None:
        refuse_uploaded(update, lambda key: True, "local_only", "local-only shares nothing")

    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        return AggregateResult(global_state={k: v.clone() for k, v in global_state.items()},
                               metrics={"clients_trained": len(updates)})

    def personal_state(self, client_id: int, global_state: AdapterState, store: Any) -> AdapterState | None:
        return self._local(client_id, global_state, store)


@register_method
class ZeroShot(MethodStrategy):
    name = "zero_shot"
    peft_types = ALL_PEFT_TYPES
    summary = "baseline: the base model, no training"
    server_optimizer_refusal = NO_AGGREGATE
    dp_refusal = NO_CLIENT_DP

    def configure_round(self, round_idx: int, clients: Sequence[int], global_state: AdapterState, store: Any) -> list[ClientPlan]:
        return []

    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        if updates:
            raise ValueError("zero_shot trains nothing, yet received client updates")
        return AggregateResult(global_state={k: v.clone() for k, v in global_state.items()})
