"""FedEx-LoRA (Singhal et al., 2024): FedIT's averages plus the residual merged into the base weights.

A <- sum p_k A_k, B <- sum p_k B_k (as FedIT), and R = sum_k p_k B_k A_k - B_avg A_avg is added to the
frozen base weights: W0 <- W0 + s R (``AggregateResult.base_delta``). Then W0 + s B_avg A_avg equals
W0 + sum_k p_k s B_k A_k: exact. Every registered client must apply R to stay in sync: the ``broadcast``
carries s R as the centred factors it actually has. Since sum_k p_k = 1,
R = sum_k p_k (B_k - B_avg)(A_k - A_avg), and since sum_k p_k (A_k - A_avg) = 0 the last client's term
folds into the others: R = sum_{k<K} p_k (B_k - B_K)(A_k - A_avg), factors of rank (K - 1) r, i.e.
[s (B_1 - B_K), ..., s (B_{K-1} - B_K)] and [p_1 (A_1 - A_avg); ...; p_{K-1} (A_{K-1} - A_avg)], or the
dense d_out x d_in matrix when that is smaller; per module min((K - 1) r (d_out + d_in), d_out d_in)
numbers (nothing with one client: R = 0). ``broadcast_bytes_per_client`` counts what is sent. Option
``residual_rank`` sends a truncated SVD of s R of that rank instead (cheaper, no longer exact; the
truncation error is reported).

A server optimizer is refused: whatever it did to A and B, the residual is defined to restore the exact
average, so it could change the factorisation but never the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from fedpeft.adapters import AdapterState, lora_pairs, state_bytes
from fedpeft.strategies.base import AggregateResult, ClientUpdate, example_weights
from fedpeft.strategies.common import MethodStrategy
from fedpeft.strategies.lora_math import delta_message, factored_svd, lora_scaling, model_rank, require_option, stack_factors
from fedpeft.strategies.registry import MethodOptions, register_method


class FedExLoRAOptions(MethodOptions):
    residual_rank: int | None = Field(
        None, ge=1, description="Send a truncated SVD of the residual of this rank (cheaper, not exact); null: the exact residual.")


@register_method
class FedExLoRA(MethodStrategy):
    name = "fedex_lora"
    peft_type_refusal = "it merges the residual of the averaged LoRA product B·A into the base weights"
    summary = "FedIT + the averaging residual merged into the base weights (exact)"
    Options = FedExLoRAOptions
    edits_base_weights = True
    server_optimizer_refusal = (
        "FedEx-LoRA adds the residual that makes the model equal the exact average of the client products, so "
        "a server optimizer's step on A and B would be cancelled by that residual"
    )

    def __init__(self, options=None, server_optimizer=None) -> None:
        super().__init__(options, server_optimizer)
        self.residual_rank = self.opts.residual_rank

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
            exact_sq += float((s * b_exact.double() @ a_exact.double()).pow(2).sum())
            if len(updates) < 2:  # one client: the average is its product, R = 0, nothing to send
                continue
            b_last = updates[-1].tensors[b_key].float()
            a_avg = averaged[a_key].float()
            b_res, a_res = stack_factors([s * (u.tensors[b_key].float() - b_last) for u in updates[:-1]],
                                         [u.tensors[a_key].float() - a_avg for u in updates[:-1]], weights[:-1])
            if self.residual_rank is not None:
                u, sv, vh = factored_svd(b_res, a_res)
                q = min(int(self.residual_rank), sv.numel())
                truncation_sq += float(sv[q:].double().pow(2).sum())
                b_res, a_res = u[:, :q] * sv[:q], vh[:q]
            message, dense = delta_message(module, b_res, a_res)
            broadcast.update(message)
            base_delta[module] = dense
            residual_sq += float(dense.double().pow(2).sum())
        metrics = {
            "residual_rel": (residual_sq / exact_sq) ** 0.5 if exact_sq > 0 else 0.0,
            "broadcast_bytes_per_client": state_bytes(broadcast),
        }
        if self.residual_rank is not None:
            metrics["residual_truncation_rel"] = (truncation_sq / exact_sq) ** 0.5 if exact_sq > 0 else 0.0
        new_global = {k: v.clone() for k, v in global_state.items()}
        new_global.update(averaged)
        return AggregateResult(global_state=new_global, base_delta=base_delta, broadcast=broadcast, metrics=metrics)
