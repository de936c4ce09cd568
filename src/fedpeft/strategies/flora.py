"""FLoRA (Wang et al., NeurIPS 2024): stacking aggregation of fresh, heterogeneous-rank LoRAs. Exact.

Every round each sampled client starts a fresh LoRA of its rank r_k on the current base weights: A is
drawn from a seed derived from (run seed, round, client) with PEFT's default init (uniform in
+-1/sqrt(d_in)), B = 0. Nothing adapter-shaped is sent down (the client derives A from the seed). The
server stacks A = [p_1 s_1 A_1; ...; p_K s_K A_K] and B = [B_1, ..., B_K], so B A = sum_k p_k s_k B_k A_k,
and merges that product into the frozen base weights (``AggregateResult.base_delta``); the global adapter
is then reset (B = 0). Every registered client, sampled or not, must receive the merge to stay in sync:
it is the ``broadcast`` (per module the stacked factors, sum_k r_k (d_in + d_out) numbers, or the dense
d_out x d_in delta when that is smaller), metered once per registered client.

A non-LoRA adapter key (a classification head, peft's ``modules_to_save``) is not part of the stacked
update: it is a plain parameter of the global state, sent down with the plan, trained, uploaded and
averaged with the weights p_k (as FedIT does), so a classifier's head learns.

Options: ``client_ranks``, ``rank_scaling`` (see ``lora_math``; the default "constant" keeps s = alpha/r
equal for all clients as the reference code does with alpha = 2 r_k), ``seed`` (filled by the engine).
A server optimizer is refused: the adapter is fresh every round and the update is merged into the base
weights, so there is no persistent adapter for it to step on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedpeft.adapters import AdapterState, lora_pairs
from fedpeft.strategies.base import AggregateResult, ClientPlan, ClientUpdate, TrainResult, example_weights
from fedpeft.strategies.common import MethodStrategy, average_non_lora
from fedpeft.strategies.lora_math import (
    RankOptions,
    RankPlan,
    delta_message,
    is_a,
    is_b,
    is_lora,
    model_rank,
    rank_mask,
    slice_to_rank,
    sliced_rank,
    stack_factors,
)
from fedpeft.adapters import state_bytes
from fedpeft.strategies.registry import register_method


def fresh_seed(seed: int, round_idx: int, client_id: int) -> int:
    return ((int(seed) * 1_000_003 + int(round_idx)) * 1_000_003 + int(client_id)) % (2**63 - 1)


def fresh_lora(template: AdapterState, rank: int, seed: int) -> AdapterState:
    """A fresh rank-``rank`` LoRA in the shape of ``template``: A ~ U(+-1/sqrt(d_in)) in its first ``rank``
    rows (zero beyond), B = 0. Keys are visited in sorted order, so the draw depends on the seed only."""
    generator = torch.Generator().manual_seed(seed)
    out: AdapterState = {}
    for key in sorted(template):
        shape = template[key].shape
        value = torch.zeros(shape, dtype=torch.float32)
        if is_a(key):
            bound = 1.0 / float(shape[1]) ** 0.5
            value[:rank] = (torch.rand((rank, shape[1]), generator=generator) * 2 - 1) * bound
        elif not is_b(key):
            value = template[key].clone()
        out[key] = value
    return out


@register_method
class FLoRA(MethodStrategy):
    name = "flora"
    peft_type_refusal = "it stacks the clients' LoRA factors A and B and merges their product into the base weights"
    summary = "stacked fresh LoRAs of any rank merged into the base weights (exact)"
    Options = RankOptions
    edits_base_weights = True
    server_optimizer_refusal = (
        "FLoRA trains a fresh adapter every round and merges the stacked update into the base weights; there is "
        "no persistent adapter for a server optimizer to step on (use fedit, ffa_lora or zero_padding with it)"
    )

    def __init__(self, options=None, server_optimizer=None) -> None:
        super().__init__(options, server_optimizer)
        self.ranks = RankPlan(self.options, self.name)
        self.seed = self.opts.seed or 0

    def init_global(self, initial: AdapterState) -> AdapterState:
        self.ranks.bind(model_rank(initial))
        _ = self.ranks.model_scaling  # needs lora_alpha: fail before round 1, not after it
        return {k: (torch.zeros_like(v) if is_b(k) else v.clone()) for k, v in initial.items()}

    def _bound(self, global_state: AdapterState) -> None:
        if self.ranks.r_max is None:
            self.ranks.bind(model_rank(global_state))

    def configure_client(self, round_idx: int, client_id: int, global_state: AdapterState, store: Any) -> ClientPlan:
        self._bound(global_state)
        rank = self.ranks.rank(client_id)
        return ClientPlan(
            client_id=client_id,
            downlink={k: global_state[k] for k in global_state if not is_lora(k)},  # the head, if any
            init_state=fresh_lora(global_state, rank, fresh_seed(self.seed, round_idx, client_id)),
            scaling=self.ranks.plan_scaling(rank),
            info={"rank": rank, "r_max": self.ranks.r_max},
        )

    def attach_client_hooks(self, round_idx: int, plan: ClientPlan, store: Any) -> None:
        # A rank-r_k client trains only the first r_k rows of A / columns of B of the shared r_max LoRA.
        rank, r_max = int(plan.info["rank"]), int(plan.info["r_max"])
        plan.grad_transform = rank_mask(rank) if rank < r_max else None

    def client_update(self, round_idx: int, plan: ClientPlan, trained: AdapterState, result: TrainResult, store: Any) -> ClientUpdate:
        keys = plan.upload if plan.upload is not None else (plan.trainable if plan.trainable is not None else list(trained))
        return ClientUpdate(
            client_id=plan.client_id,
            tensors=slice_to_rank({k: trained[k] for k in keys}, plan.info["rank"]),
            num_examples=result.num_examples,
            job=plan.job,
            metrics={"loss": result.mean_loss, "rank": float(plan.info["rank"])},
        )

    def check_update(self, global_state: AdapterState, update: ClientUpdate) -> None:
        sliced_rank(global_state, update.tensors, update.client_id)

    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        self._bound(global_state)
        if not updates:
            raise ValueError("flora: aggregate needs at least one client update")
        weights = example_weights(updates)
        ranks = [sliced_rank(global_state, u.tensors, u.client_id) for u in updates]
        coefficients = [p * self.ranks.scaling(r) for p, r in zip(weights, ranks)]
        pairs = lora_pairs(global_state)
        base_delta: dict[str, torch.Tensor] = {}
        broadcast: AdapterState = {}
        for module, (a_key, b_key) in pairs.items():
            missing = [u.client_id for u in updates if a_key not in u.tensors or b_key not in u.tensors]
            if missing:
                raise ValueError(f"flora: client {missing[0]} did not upload both factors of module '{module}'")
            b_stack, a_stack = stack_factors([u.tensors[b_key] for u in updates], [u.tensors[a_key] for u in updates], coefficients)
            message, dense = delta_message(module, b_stack, a_stack)
            broadcast.update(message)
            base_delta[module] = dense
        new_global = {k: (torch.zeros_like(v) if is_b(k) else v.clone()) for k, v in global_state.items()}
        new_global.update(average_non_lora(updates, weights))
        metrics = {"stacked_rank": sum(ranks), "broadcast_bytes_per_client": state_bytes(broadcast)}
        return AggregateResult(global_state=new_global, base_delta=base_delta, broadcast=broadcast, metrics=metrics)
