"""FedSA-LoRA (Guo et al., ICLR 2025): clients train A and B, upload only A; A <- sum p_k A_k; each
client keeps its own B in the client store (personalised).

A non-LoRA adapter key (a classification head, peft's ``modules_to_save``) is shared like A: uploaded,
averaged, and part of the global state, so the global and the personal evaluations use the learned head
(the paper's personal part is B only).

Downlink: the A tensors. A client's B starts as the initial (zero) B and then persists across rounds in
the store (``fedsa_lora_B``). Evaluation is per client (``personal_state``: global A + its own B); the
"global model" (``evaluation_state``) is the global A with the example-weighted mean of the personal
Bs, reported separately. Server optimizers compose (they step on A).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedpeft.adapters import AdapterState
from fedpeft.strategies.base import AggregateResult, ClientPlan, ClientUpdate, TrainResult
from fedpeft.strategies.common import MethodStrategy, mean_of_personal_parts, refuse_uploaded
from fedpeft.strategies.lora_math import is_b
from fedpeft.strategies.registry import register_method

PERSONAL_NAME = "fedsa_lora_B"
NUM_EXAMPLES_KEY = "__num_examples__"


@register_method
class FedSALoRA(MethodStrategy):
    name = "fedsa_lora"
    peft_type_refusal = "it shares LoRA's A and keeps each client's B"
    summary = "only A shared and averaged; each client keeps its own B (personalised)"
    personalized = True
    dp_mean = True  # the shared part (A, a head) is averaged: client-level DP noises that mean; B never leaves

    def _personal_b(self, client_id: int, store: Any) -> tuple[AdapterState | None, int]:
        stored = store.get(client_id, PERSONAL_NAME) if store is not None else None
        if stored is None:
            return None, 0
        stored = dict(stored)
        n = int(stored.pop(NUM_EXAMPLES_KEY, torch.zeros(())).item())
        return stored, n

    def _with_personal_b(self, client_id: int, global_state: AdapterState, store: Any) -> AdapterState:
        state = {k: v for k, v in global_state.items()}
        personal, _ = self._personal_b(client_id, store)
        if personal is not None:
            state.update(personal)
        return state

    def configure_client(self, round_idx: int, client_id: int, global_state: AdapterState, store: Any) -> ClientPlan:
        shared = [k for k in global_state if not is_b(k)]  # A, and a head when the model has one
        return ClientPlan(
            client_id=client_id,
            downlink={k: global_state[k] for k in shared},
            trainable=None,
            upload=shared,
        )

    def attach_client_hooks(self, round_idx: int, plan: ClientPlan, store: Any) -> None:
        # The personal B never leaves the client: merged here, on the client, from its own store.
        personal, _ = self._personal_b(plan.client_id, store)
        if personal is not None:
            plan.init_state = {**plan.downlink, **personal}

    def client_update(self, round_idx: int, plan: ClientPlan, trained: AdapterState, result: TrainResult, store: Any) -> ClientUpdate:
        personal = {k: v.detach().float().clone() for k, v in trained.items() if is_b(k)}
        personal[NUM_EXAMPLES_KEY] = torch.tensor(float(result.num_examples))
        update = super().client_update(round_idx, plan, trained, result, store)
        update.private[PERSONAL_NAME] = personal  # kept in the client's store once the update is accepted
        return update

    def check_update(self, global_state: AdapterState, update: ClientUpdate) -> None:
        super().check_update(global_state, update)
        refuse_uploaded(update, is_b, "fedsa_lora", "B is personal")

    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        return self.average_into_global(global_state, updates)

    # --- evaluation -----------------------------------------------------------------------------
    def personal_state(self, client_id: int, global_state: AdapterState, store: Any) -> AdapterState | None:
        return self._with_personal_b(client_id, global_state, store)

    def evaluation_state(self, global_state: AdapterState, store: Any) -> AdapterState:
        """Global A with the mean of the personal Bs (weighted by examples) over the clients that have one."""
        return mean_of_personal_parts(global_state, store, self.options.get("num_clients"), self._personal_b)
