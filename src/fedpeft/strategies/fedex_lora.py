"""FedEx-LoRA (Singhal et al., 2024): FedIT's averages plus the residual merged into the base weights.

A <- sum p_k A_k, B <- sum p_k B_k (as FedIT), and R = sum_k p_k B_k A_k - B_avg A_avg is added to the
frozen base weights: W0 <- W0 + s R (``AggregateResult.base_delta``). Then W0 + s B_avg A_avg equals
W0 + sum_k p_k s B_k A_k: exact. Every registered client must apply R to stay in sync: the ``broadcast``
carries it as factors (rank <= (|S| + 1) r: [B_1..B_K, B_avg] and [p_1 A_1; ..; p_K A_K; -A_avg], scaled
by s) or as the dense matrix when that is smaller. Option ``residual_rank`` sends a truncated SVD of
s R of that rank instead (cheaper, no longer exact; the truncation error is reported).

A server optimizer is refused: whatever it did to A and B, the residual is defined to restore the exact
average, so it could change the factorisation but never the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedpeft.adapters import AdapterState, lora_pairs, state_bytes
from fedpeft.strategies.base import AggregateResult, ClientUpdate, example_weights
from fedpeft.strategies.common import MethodStrategy
from fedpeft.strategies.lora_math import delta_message, factored_svd, lora_scaling, model_rank, require_option, stack_factors


class FedExLoRA(MethodStrategy):
    name = "fedex_lora"
    summary = "FedIT + the averaging residual merged into the base weights (exact)"
    option_names = frozenset({"residual_rank"})
    server_optimizer_refusal = (
        "FedEx-LoRA adds the residual that makes the model equal the exact average of the client products, so "
        "a server optimizer's step on A and B would be cancelled by that residual"
    )

    def __init__(self, options=None, server_optimizer=None) -> None:
        super().__init__(options, server_optimizer)
        self.residual_rank = self.options.get("residual_rank")
        if self.residual_rank is not None and int(self.residual_rank) < 1:
            raise ValueError(f"method.options.residual_rank must be >= 1, got {self.residual_rank}")

    def scaling(self, global_state: AdapterState) -> float:
        alpha = require_option(self.options, "lora_alpha", self.name)
        return lora_scaling(alpha, model_rank(global_state), bool(self.options.get("rslora", False)))

    def init_global(self, initial: AdapterState) -> AdapterState:
        self.scaling(initial)  # fail before round 1 if lora_alpha is missing
        return super().init_global(initial)

    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        s = self.scaling(global_state)
        weights = example_weights(updates)
        averaged = self.average_updates(global_state, updates, weights)
        base_delta: dict[str, torch.Tensor] = {}
        broadcast: AdapterState = {}
        residual_sq = exact_sq = truncation_sq = 0.0
        for module, (a_key, b_key) in lora_pairs(global_state).items():
            if a_key not in averaged or b_key not in averaged:
                raise ValueError(f"fedex_lora: clients must upload both factors of module '{module}'")
            b_exact, a_exact = stack_factors([u.tensors[b_key] for u in updates], [u.tensors[a_key] for u in updates], weights)
            b_res = s * torch.cat([b_exact, averaged[b_key]], dim=1)
            a_res = torch.cat([a_exact, -averaged[a_key]], dim=0)
            if self.residual_rank is not None:
                u, sv, vh = factored_svd(b_res, a_res)
                q = min(int(self.residual_rank), sv.numel())
                truncation_sq += float(sv[q:].double().pow(2).sum())
                b_res, a_res = u[:, :q] * sv[:q], vh[:q]
            message, dense = delta_message(module, b_res, a_res)
            broadcast.update(message)
            base_delta[module] = dense
            residual_sq += float(dense.double().pow(2).sum())
            exact_sq += float((s * b_exact.double() @ a_exact.double()).pow(2).sum())
        metrics = {
            "residual_rel": (residual_sq / exact_sq) ** 0.5 if exact_sq > 0 else 0.0,
            "broadcast_bytes_per_client": state_bytes(broadcast),
        }
        if self.residual_rank is not None:
            metrics["residual_truncation_rel"] = (truncation_sq / exact_sq) ** 0.5 if exact_sq > 0 else 0.0
        new_global = {k: v.clone() for k, v in global_state.items()}
        new_global.update(averaged)
        return AggregateResult(global_state=new_global, base_delta=base_delta, broadcast=broadcast, metrics=metrics)
