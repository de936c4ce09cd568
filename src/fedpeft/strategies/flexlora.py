"""FlexLoRA (Bai et al., NeurIPS 2024): heterogeneous ranks, SVD redistribution. Not exact beyond r_max.

The server forms Delta W = sum_k p_k s_k B_k A_k (through the stacked factors, never a dense sum of
per-client products), takes its SVD U S V^T (one per module per round, via QR of the stacked factors),
and keeps the rank-r_max truncation as the global adapter: B = U[:, :r_max] S[:r_max] / s, A = V^T[:r_max].
Client k then receives B_k = U[:, :r_k] S[:r_k] / s_k and A_k = V^T[:r_k], i.e. the global truncated to
its rank (``HeterogeneousRankStrategy``), and uploads its r_k slice. When sum of sampled ranks <= r_max the
global equals Delta W exactly; otherwise it is the best rank-r_max approximation (Eckart-Young), and
the relative truncation error is reported as ``truncation_rel``.

A non-LoRA adapter key (a classification head) is averaged with the weights p_k, as FedIT does.

A server optimizer is refused: the factors are re-derived by an SVD every round, so their coordinates
do not name the same directions from one round to the next and per-coordinate moments are meaningless.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedpeft.adapters import AdapterState, lora_pairs
from fedpeft.strategies.base import AggregateResult, ClientUpdate, example_weights
from fedpeft.strategies.common import average_non_lora
from fedpeft.strategies.hetlora import HeterogeneousRankStrategy
from fedpeft.strategies.registry import register_method
from fedpeft.strategies.lora_math import factored_svd, sliced_rank, stack_factors


@register_method
class FlexLoRA(HeterogeneousRankStrategy):
    name = "flexlora"
    peft_type_refusal = "it rebuilds LoRA factors of each client's rank from an SVD of the averaged product B·A"
    summary = "heterogeneous ranks; sum of client products redistributed by SVD"
    server_optimizer_refusal = (
        "FlexLoRA re-derives the factors by SVD every round, so a server optimizer's per-coordinate moments "
        "would not track the same directions across rounds"
    )

    def init_global(self, initial: AdapterState) -> AdapterState:
        state = super().init_global(initial)
        _ = self.ranks.model_scaling  # needs lora_alpha: fail before round 1
        return state

    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        self._bound(global_state)
        if not updates:
            raise ValueError("flexlora: aggregate needs at least one client update")
        weights = example_weights(updates)
        ranks = [sliced_rank(global_state, u.tensors, u.client_id) for u in updates]
        coefficients = [p * self.ranks.scaling(r) for p, r in zip(weights, ranks)]
        s = self.ranks.model_scaling
        r_max = self.ranks.r_max
        new_global = {k: v.clone() for k, v in global_state.items()}
        kept_sq = total_sq = 0.0
        for module, (a_key, b_key) in lora_pairs(global_state).items():
            b_stack, a_stack = stack_factors([u.tensors[b_key] for u in updates], [u.tensors[a_key] for u in updates], coefficients)
            u, sv, vh = factored_svd(b_stack, a_stack)
            q = min(r_max, sv.numel())
            b_new = torch.zeros_like(global_state[b_key], dtype=torch.float32)
            a_new = torch.zeros_like(global_state[a_key], dtype=torch.float32)
            b_new[:, :q] = u[:, :q] * sv[:q] / s
            a_new[:q] = vh[:q]
            new_global[b_key], new_global[a_key] = b_new, a_new
            total_sq += float(sv.double().pow(2).sum())
            kept_sq += float(sv[:q].double().pow(2).sum())
        new_global.update(average_non_lora(updates, weights))
        truncation = (max(total_sq - kept_sq, 0.0) / total_sq) ** 0.5 if total_sq > 0 else 0.0
        metrics = {"truncation_rel": truncation, "stacked_rank": sum(ranks)}
        return AggregateResult(global_state=new_global, metrics=metrics)
