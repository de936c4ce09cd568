"""FFA-LoRA (Sun et al., ICLR 2024): A stays frozen at the random initialisation shared by all clients;
only B trains and travels; B <- sum p_k B_k. Exact: s * (sum p_k B_k) A = sum p_k s B_k A.

The shared A is the initial adapter's A, which the engine draws from the run seed: every client (and a
resumed run) rebuilds it from that seed, so A is never sent. Downlink and uplink: the B tensors, and any
non-LoRA adapter key (a classification head, peft's ``modules_to_save``), which trains and is averaged
like B (the paper fine-tunes the classifier head of its GLUE models too). Server optimizers compose (they
step on B and the head).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedpeft.adapters import AdapterState
from fedpeft.strategies.base import AggregateResult, ClientPlan, ClientUpdate
from fedpeft.strategies.common import MethodStrategy, refuse_uploaded
from fedpeft.strategies.lora_math import is_a, is_b
from fedpeft.strategies.registry import register_method


@register_method
class FFALoRA(MethodStrategy):
    name = "ffa_lora"
    peft_type_refusal = "it freezes LoRA's A and trains and averages only B"
    summary = "A frozen at a shared seed, only B trained and sent (exact, half the traffic)"
    secure_mean = True

    def prepare_model(self, model: torch.nn.Module) -> None:
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)

    def init_global(self, initial: AdapterState) -> AdapterState:
        if not any(is_b(k) for k in initial):
            raise ValueError("ffa_lora needs a LoRA adapter (no lora_B tensors in the initial state)")
        return super().init_global(initial)

    def configure_client(self, round_idx: int, client_id: int, global_state: AdapterState, store) -> ClientPlan:
        keys = [k for k in global_state if not is_a(k)]  # B, and a head when the model has one
        return ClientPlan(
            client_id=client_id,
            downlink={k: global_state[k] for k in keys},
            init_state=global_state,
            trainable=keys,
            upload=keys,
        )

    def check_update(self, global_state: AdapterState, update: ClientUpdate) -> None:
        super().check_update(global_state, update)
        refuse_uploaded(update, is_a, "ffa_lora", "A is frozen")

    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        return self.average_into_global(global_state, updates)
