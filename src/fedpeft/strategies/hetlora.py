"""Heterogeneous client ranks by zero-padding, and HetLoRA (Cho et al. 2024). Neither is exact.

One shared PEFT model of rank r_max; a client of rank r_k <= r_max receives the global truncated to its
rank (A[:r_k], B[:, :r_k]: only that slice is sent), trains inside the first r_k rows/columns (the rest is
zero, and its gradients are zeroed), and uploads its r_k slice. The server zero-pads every upload to
r_max and averages:

- ``zero_padding``: weights p_k = n_k / sum n_j (the FLoRA paper's heterogeneous baseline);
- ``hetlora``: the paper's sparsity-weighted aggregation, one weight per client proportional to the
  Frobenius norm of its whole update, ||Delta W_k||_F = sqrt(sum_modules ||s_k B_k A_k||_F^2) (the paper
  writes one LoRA pair, p_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F; over several modules the update is the
  block-diagonal matrix of all of them, so its norm is the root of the summed squares, not a sum of
  per-module norms), and optional rank self-pruning: the client adds
  lambda * sum_modules ||B[:, t:r] A[t:r]||_F (t = floor(gamma * r)) to its loss; if training shrank that
  tail norm below its value at the start, the client drops the tail and keeps rank t from then on
  (persisted in the client store as ``hetlora_rank``, once the update is accepted).

A non-LoRA adapter key (a classification head, peft's ``modules_to_save``) has no rank: it is sent whole
and averaged with the example weights p_k under both rules (HetLoRA's norm weights are defined on the
LoRA product only).

Options: ``client_ranks`` (list per client, or shorter list repeated over client ids; default: every
client at r_max), ``rank_scaling`` (constant | alpha, see ``lora_math``); hetlora adds ``prune``
(default false), ``prune_gamma`` (0.9), ``prune_lambda`` (1e-3), ``min_rank`` (1). Server optimizers
compose with the padded average.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import Field

from fedpeft.adapters import AdapterState, lora_pairs
from fedpeft.strategies.base import AggregateResult, ClientPlan, ClientUpdate, TrainResult, example_weights, weighted_average
from fedpeft.strategies.common import MethodStrategy, average_non_lora
from fedpeft.strategies.lora_math import (
    RankOptions,
    RankPlan,
    frobenius_of_product,
    is_lora,
    model_rank,
    pad_to_rank,
    rank_mask,
    scale_b,
    slice_to_rank,
    sliced_rank,
    zero_beyond_rank,
)
from fedpeft.strategies.registry import register_method

RANK_NAME = "hetlora_rank"


class HetLoRAOptions(RankOptions):
    prune: bool = Field(False, description="Rank self-pruning (HetLoRA's gamma/lambda rule).")
    prune_gamma: float = Field(0.9, gt=0, lt=1, description="Pruning decay gamma.")
    prune_lambda: float = Field(1e-3, ge=0, description="Pruning regulariser lambda.")
    min_rank: int = Field(1, ge=1, description="A client's rank never shrinks below this.")


class HeterogeneousRankStrategy(MethodStrategy):
    """Rank-r_k clients inside one rank-r_max model: truncated downlink, sliced uplink, padded upload."""

    Options = RankOptions
    peft_type_refusal = "client ranks are slices of LoRA's A rows and B columns"

    def __init__(self, options=None, server_optimizer=None) -> None:
        super().__init__(options, server_optimizer)
        self.ranks = RankPlan(self.options, self.name)

    def init_global(self, initial: AdapterState) -> AdapterState:
        self.ranks.bind(model_rank(initial))
        return super().init_global(initial)

    def _bound(self, global_state: AdapterState) -> None:
        if self.ranks.r_max is None:
            self.ranks.bind(model_rank(global_state))

    def client_rank(self, client_id: int, store: Any) -> int:
        return self.ranks.rank(client_id)

    def client_start(self, global_state: AdapterState, rank: int) -> AdapterState:
        """The global expressed for a rank-``rank`` client (its B under its own scaling)."""
        return scale_b(global_state, 1.0 / self.ranks.factor(rank))

    def configure_client(self, round_idx: int, client_id: int, global_state: AdapterState, store: Any) -> ClientPlan:
        self._bound(global_state)
        rank = self.client_rank(client_id, store)
        start = self.client_start(global_state, rank)
        return ClientPlan(
            client_id=client_id,
            downlink=slice_to_rank(start, rank) if rank < self.ranks.r_max else start,
            init_state=zero_beyond_rank(start, rank),
            scaling=self.ranks.plan_scaling(rank),
            info={"rank": rank, "r_max": self.ranks.r_max},
        )

    def attach_client_hooks(self, round_idx: int, plan: ClientPlan, store: Any) -> None:
        # A rank-r_k client trains only the first r_k rows of A / columns of B of the shared r_max LoRA.
        rank, r_max = int(plan.info["rank"]), int(plan.info["r_max"])
        plan.grad_transform = rank_mask(rank) if rank < r_max else None

    def upload_rank(self, plan: ClientPlan, trained: AdapterState, store: Any) -> int:
        return plan.info["rank"]

    def client_update(self, round_idx: int, plan: ClientPlan, trained: AdapterState, result: TrainResult, store: Any) -> ClientUpdate:
        rank = self.upload_rank(plan, trained, store)
        keys = plan.upload if plan.upload is not None else (plan.trainable if plan.trainable is not None else list(trained))
        return ClientUpdate(
            client_id=plan.client_id,
            tensors=slice_to_rank({k: trained[k] for k in keys}, rank),
            num_examples=result.num_examples,
            job=plan.job,
            metrics={"loss": result.mean_loss, "rank": float(rank)},
        )

    def check_update(self, global_state: AdapterState, update: ClientUpdate) -> None:
        sliced_rank(global_state, update.tensors, update.client_id)

    def padded_updates(self, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> tuple[list[AdapterState], list[int]]:
        """Each upload checked, expressed under the model's scaling, and zero-padded to r_max."""
        padded, ranks = [], []
        for update in updates:
            rank = sliced_rank(global_state, update.tensors, update.client_id)
            ranks.append(rank)
            padded.append(pad_to_rank(scale_b(update.tensors, self.ranks.factor(rank)), global_state))
        return padded, ranks

    def client_weights(self, updates: Sequence[ClientUpdate], padded: Sequence[AdapterState]) -> list[float]:
        return example_weights(updates)

    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        self._bound(global_state)
        if not updates:
            raise ValueError(f"method '{self.name}': aggregate needs at least one client update")
        padded, ranks = self.padded_updates(global_state, updates)
        keys = set(padded[0])
        if any(set(p) != keys for p in padded):
            raise ValueError(f"method '{self.name}': clients uploaded different tensor keys")
        weights = self.client_weights(updates, padded)
        averaged = weighted_average([{k: v for k, v in p.items() if is_lora(k)} for p in padded], weights)
        averaged.update(average_non_lora(updates, example_weights(updates)))
        metrics = {"mean_client_rank": sum(ranks) / len(ranks), "weights": [round(w, 6) for w in weights]}
        return AggregateResult(global_state=self.apply_average(global_state, averaged), metrics=metrics)


@register_method
class ZeroPadding(HeterogeneousRankStrategy):
    name = "zero_padding"
    summary = "heterogeneous ranks zero-padded to r_max and averaged by examples (not exact)"


def _tail_norm(state: Mapping[str, torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """sum over modules of ||B[:, start:stop] A[start:stop]||_F, differentiable (Gram form, t x t)."""
    total = None
    for a_key, b_key in lora_pairs(state).values():
        a = state[a_key][start:stop]
        b = state[b_key][:, start:stop]
        sq = ((b.T @ b) * (a @ a.T)).sum()
        term = torch.sqrt(sq.clamp_min(0) + 1e-12)
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


@register_method
class HetLoRA(HeterogeneousRankStrategy):
    name = "hetlora"
    summary = "zero-padding weighted by update norm, optional rank self-pruning (not exact)"
    Options = HetLoRAOptions

    def __init__(self, options=None, server_optimizer=None) -> None:
        super().__init__(options, server_optimizer)
        self.prune = self.opts.prune
        self.gamma = self.opts.prune_gamma
        self.lam = self.opts.prune_lambda
        self.min_rank = self.opts.min_rank

    def client_rank(self, client_id: int, store: Any) -> int:
        base = self.ranks.rank(client_id)
        stored = store.get(client_id, RANK_NAME) if (self.prune and store is not None) else None
        return min(base, int(stored["rank"].item())) if stored is not None else base

    def tail_start(self, rank: int) -> int | None:
        """First pruned index for a rank-``rank`` client, or None when it cannot shrink further."""
        if not self.prune or rank <= self.min_rank:
            return None
        return max(self.min_rank, min(rank - 1, math.floor(self.gamma * rank)))

    def attach_client_hooks(self, round_idx: int, plan: ClientPlan, store: Any) -> None:
        super().attach_client_hooks(round_idx, plan, store)
        start = self.tail_start(plan.info["rank"])
        if start is not None and self.lam > 0:
            rank, lam = plan.info["rank"], self.lam

            def extra_loss(params: Mapping[str, torch.nn.Parameter]) -> torch.Tensor:
                return lam * _tail_norm(params, start, rank)

            plan.extra_loss = extra_loss

    def upload_rank(self, plan: ClientPlan, trained: AdapterState, store: Any) -> int:
        rank = plan.info["rank"]
        start = self.tail_start(rank)
        if start is None:
            return rank
        with torch.no_grad():
            before = float(_tail_norm(plan.init_state, start, rank))
            after = float(_tail_norm(trained, start, rank))
        return start if after < before else rank

    def client_update(self, round_idx: int, plan: ClientPlan, trained: AdapterState, result: TrainResult, store: Any) -> ClientUpdate:
        update = super().client_update(round_idx, plan, trained, result, store)
        if self.tail_start(plan.info["rank"]) is not None:  # the (possibly pruned) rank, kept once accepted
            update.private[RANK_NAME] = {"rank": torch.tensor(int(update.metrics["rank"]))}
        return update

    def client_weights(self, updates: Sequence[ClientUpdate], padded: Sequence[AdapterState]) -> list[float]:
        """w_k proportional to ||Delta W_k||_F = sqrt(sum_modules ||B_k A_k||_F^2) (padded under the model's s)."""
        norms = []
        for state in padded:
            sq = 0.0
            for a_key, b_key in lora_pairs(state).values():
                sq += frobenius_of_product(state[b_key], state[a_key]) ** 2
            norms.append(sq**0.5)
        total = sum(norms)
        if total <= 0:
            return example_weights(updates)  # every client update is zero: norm weights are undefined
        return [n / total for n in norms]
