"""Ditto (Li et al., ICML 2021, Algorithm 1): a global adapter trained as FedAvg and, per client, a
personal adapter pulled towards the global one.

Each sampled client runs two local jobs in a round, both from the global state ``w^t`` it received:

- ``global``: ordinary local training of ``w`` on its data, uploaded and averaged as FedIT/FedAvg does
  (``w^{t+1} = Σ_k p_k w_k``; server optimizers compose);
- ``personal``: its own adapter ``v_k`` (kept in its client store, ``ditto_personal``; ``w^t`` on its
  first round) trained on ``F_k(v_k) + (λ/2)·‖v_k − w^t‖²``, so one SGD step is
  ``v_k ← v_k − η·(∇F_k(v_k) + λ·(v_k − w^t))``. Nothing of it is uploaded.

The personal job sends nothing down (``downlink`` is empty: the client already holds ``w^t`` from this
round's global job; its proximal anchor is that received state) and nothing up, so Ditto's bytes are
FedAvg's. ``λ = 0`` is local training started from the global model; a large ``λ`` pins ``v_k`` to ``w``.

Evaluation: the global adapter as "the global model"; each client's ``v_k`` (``personal_state``) for
the per-client mean ± std (clients never sampled have no personal adapter and are not scored).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from fedpeft.adapters import AdapterState
from fedpeft.strategies.base import AggregateResult, ClientPlan, ClientUpdate, TrainResult, example_weights
from fedpeft.strategies.common import MethodStrategy
from fedpeft.strategies.fedprox import proximal_term
from fedpeft.strategies.registry import MethodOptions, register_method

PERSONAL_NAME = "ditto_personal"
GLOBAL_JOB, PERSONAL_JOB = "global", "personal"


class DittoOptions(MethodOptions):
    lam: float = Field(0.1, ge=0, description="λ: the personal loss gains (λ/2)·||v_k - w||², the pull of each "
                       "client's personal adapter towards the global one (0: plain local fine-tuning).")


@register_method
class Ditto(MethodStrategy):
    name = "ditto"
    summary = "global adapter by FedAvg + a personal adapter per client regularised towards it (λ/2)||v - w||²"
    Options = DittoOptions
    personalized = True

    def configure_round(self, round_idx: int, clients: Sequence[int], global_state: AdapterState, store: Any) -> list[ClientPlan]:
        plans = []
        for client_id in clients:
            plans.append(ClientPlan(client_id=client_id, downlink=global_state, job=GLOBAL_JOB))
            plans.append(ClientPlan(client_id=client_id, downlink={}, job=PERSONAL_JOB, upload=[],
                                    info={"lam": self.opts.lam}))
        return plans

    def attach_client_hooks(self, round_idx: int, plan: ClientPlan, store: Any) -> None:
        if plan.job != PERSONAL_JOB:
            return
        personal = store.get(plan.client_id, PERSONAL_NAME) if store is not None else None
        if personal is not None:  # else v_k starts from the received global state (the job's start state)
            plan.init_state = dict(personal)

    def bind_received_state(self, round_idx: int, plan: ClientPlan, received: AdapterState) -> None:
        if plan.job == PERSONAL_JOB:  # the proximal anchor is w^t, the global state this client received
            plan.extra_loss = proximal_term(received, float(plan.info.get("lam", self.opts.lam)))

    def client_update(self, round_idx: int, plan: ClientPlan, trained: AdapterState, result: TrainResult, store: Any) -> ClientUpdate:
        update = super().client_update(round_idx, plan, trained, result, store)
        if plan.job == PERSONAL_JOB:
            update.tensors = {}
            update.private[PERSONAL_NAME] = {k: v.detach().float().clone() for k, v in trained.items()}
        return update

    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        shared = [u for u in updates if u.job == GLOBAL_JOB]
        if not shared:  # every global job failed: the personal ones still updated their adapters
            return AggregateResult(global_state=global_state, metrics={"global_updates": 0})
        averaged = self.average_updates(global_state, shared, example_weights(shared))
        return AggregateResult(global_state=self.apply_average(global_state, averaged),
                               metrics={"global_updates": len(shared)})

    def personal_state(self, client_id: int, global_state: AdapterState, store: Any) -> AdapterState | None:
        personal = store.get(client_id, PERSONAL_NAME) if store is not None else None
        return {**global_state, **personal} if personal is not None else None
