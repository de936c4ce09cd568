"""What the methods share: server-optimizer composition, weighted averaging into the
global state, and the FedIT exactness gap."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedpeft.adapters import AdapterState, lora_pairs, validate_update
from fedpeft.strategies.base import AggregateResult, ClientUpdate, Strategy, example_weights, weighted_average
from fedpeft.strategies.lora_math import frobenius_of_product, is_lora, stack_factors
from fedpeft.strategies.server_optimizers import is_identity


class MethodStrategy(Strategy):
    """A Strategy whose server optimizer is checked when built: ``server_optimizer_refusal`` (a reason)
    makes every server optimizer but ``none`` an error. Its options were validated by ``Options``."""

    def __init__(self, options: Mapping[str, Any] | None = None, server_optimizer: Any | None = None) -> None:
        super().__init__(options, server_optimizer)
        if self.server_optimizer_refusal and not is_identity(server_optimizer):
            raise ValueError(
                f"method '{self.name}' cannot be combined with server optimizer '{server_optimizer.name}': "
                f"{self.server_optimizer_refusal}"
            )

    def option(self, key: str, default: Any) -> Any:
        value = self.options.get(key)
        return default if value is None else value

    # --- averaging ---------------------------------------------------------------------------------
    def average_updates(self, global_state: AdapterState, updates: Sequence[ClientUpdate], weights=None) -> AdapterState:
        """Validated sum_k p_k theta_k over the uploaded keys (all updates must upload the same keys)."""
        if not updates:
            raise ValueError(f"method '{self.name}': aggregate needs at least one client update")
        keys = set(updates[0].tensors)
        for update in updates:
            if set(update.tensors) != keys:
                raise ValueError(
                    f"method '{self.name}': client {update.client_id} uploaded keys that differ from client "
                    f"{updates[0].client_id}'s (e.g. {sorted(set(update.tensors) ^ keys)[:2]})"
                )
            try:
                validate_update(global_state, update.tensors)
            except ValueError as exc:
                raise ValueError(f"update of client {update.client_id}: {exc}") from exc
        weights = example_weights(updates) if weights is None else weights
        return weighted_average([u.tensors for u in updates], weights)

    def apply_average(self, global_state: AdapterState, averaged: AdapterState) -> AdapterState:
        """New global: the server optimizer's step on the averaged keys (plain average without one)."""
        new_values = self.server_optimizer.step(global_state, averaged) if self.server_optimizer else averaged
        new_global = {k: v.clone() for k, v in global_state.items()}
        new_global.update(new_values)
        return new_global

    def average_into_global(self, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        """FedAvg of whatever the method uploads (FFA-LoRA's B, FedSA-LoRA's A, FedPer's shared part):
        the example-weighted mean, through the server optimizer, laid over the global state."""
        averaged = self.average_updates(global_state, updates, example_weights(updates))
        return AggregateResult(global_state=self.apply_average(global_state, averaged))


def global_with_stored(global_state: AdapterState, store: Any, client_id: int, name: str) -> AdapterState:
    """The global state with client ``client_id``'s stored tensors ``name`` laid over it (its local or personal
    part); the global state alone when the client has none yet."""
    stored = store.get(client_id, name) if store is not None else None
    return {**global_state, **(stored or {})}


def mean_of_personal_parts(global_state: AdapterState, store: Any, num_clients: int | None,
                           read: Callable[[int, Any], tuple[AdapterState | None, int]]) -> AdapterState:
    """The global state with the example-weighted mean of every client's personal part laid over it.

    ``read(client_id, store)`` returns (that client's personal tensors or None, its example count); clients
    without a personal part are skipped, and a count below 1 weighs 1. Without a store, a client count or any
    personal part, the global state is returned as it is.
    """
    if store is None or num_clients is None:
        return global_state
    total, mean = 0.0, {}
    for client_id in range(int(num_clients)):
        personal, n = read(client_id, store)
        if personal is None:
            continue
        weight = float(max(n, 1))
        total += weight
        for key, value in personal.items():
            mean[key] = mean.get(key, torch.zeros_like(value, dtype=torch.float32)) + weight * value.float()
    if total == 0:
        return global_state
    return {**global_state, **{k: v / total for k, v in mean.items()}}


def average_non_lora(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> AdapterState:
    """sum_k w_k theta_k over the uploaded keys that are not LoRA factors (a classification head):
    methods that rebuild the LoRA part of the global state from its factors (FLoRA, FlexLoRA, the
    heterogeneous-rank rules) average these plainly, so the head learns like under FedIT."""
    keys = [k for k in updates[0].tensors if not is_lora(k)] if updates else []
    if not keys:
        return {}
    for update in updates:
        missing = [k for k in keys if k not in update.tensors]
        if missing:
            raise ValueError(f"client {update.client_id} did not upload '{missing[0]}' (client {updates[0].client_id} did)")
    return weighted_average([{k: u.tensors[k] for k in keys} for u in updates], weights)


def refuse_uploaded(update: ClientUpdate, forbidden, method: str, reason: str) -> None:
    """Reject (ValueError) an update carrying a tensor the method never lets a client send, e.g. FFA-LoRA's
    frozen A. Called from ``check_update`` so the engine drops that one client instead of the round."""
    sent = [k for k in update.tensors if forbidden(k)]
    if sent:
        raise ValueError(f"{method}: client {update.client_id} uploaded {sent[0]}; {reason}")


def aggregation_gap(updates: Sequence[ClientUpdate], weights: Sequence[float], averaged: AdapterState) -> dict[str, float]:
    """How far factor averaging is from the exact average of products, over modules whose A and B were
    uploaded: ||sum_k p_k B_k A_k - B_avg A_avg||_F / ||sum_k p_k B_k A_k||_F (scale-free, so no s)."""
    pairs = lora_pairs(updates[0].tensors) if updates else {}
    # AdaLoRA's update is B·diag(E)·A, not B·A: the gap of its factors alone would mean nothing.
    pairs = {m: ab for m, ab in pairs.items() if not any(k.startswith(m + ".lora_E.") for k in updates[0].tensors)}
    gap_sq = exact_sq = 0.0
    for a_key, b_key in pairs.values():
        bs = [u.tensors[b_key] for u in updates]
        as_ = [u.tensors[a_key] for u in updates]
        b_exact, a_exact = stack_factors(bs, as_, weights)
        exact_sq += frobenius_of_product(b_exact, a_exact) ** 2
        b_diff = torch.cat([b_exact, averaged[b_key].float()], dim=1)
        a_diff = torch.cat([a_exact, -averaged[a_key].float()], dim=0)
        gap_sq += frobenius_of_product(b_diff, a_diff) ** 2
    if not pairs:
        return {}
    return {"aggregation_gap_rel": (gap_sq**0.5) / exact_sq**0.5 if exact_sq > 0 else 0.0}
