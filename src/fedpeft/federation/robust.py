"""Robust aggregation rules for adversarial settings: pure functions over client tensors, and the one
hook (``apply_robust_rule``) the engine calls between collecting a round's updates and the method's
``aggregate``.

Rules (``federation.robust``), each a standard one:
- ``clip_norm``: each update's change from the global state, u_k - g, is scaled to L2 norm at most C over
  all its tensors (norm clipping; combines with any rule below, and is applied first).
- ``median``: coordinate-wise median over the n clients (mean of the two middle values when n is even).
- ``trimmed_mean``: per coordinate, drop the floor(beta n) smallest and largest values, average the rest.
- ``krum`` / ``multi_krum`` (Blanchard et al., 2017): score_i = sum of squared L2 distances from update i
  to its n - f - 2 nearest other updates; Krum keeps the update with the lowest score, multi-Krum the m
  lowest (default m = n - f), which the method then aggregates as usual.

How they compose with a method: median and trimmed mean replace every update's tensors by the robust
value, keeping ids, example counts and controls, so a method whose aggregate is a weighted mean of the
uploaded tensors (FedIT, FedProx, FFA-LoRA, FedSA-LoRA's A, SCAFFOLD's tensors, FedEx-LoRA's mean)
computes the robust value itself (up to float rounding of weights that sum to 1). Krum selects updates,
which any method can aggregate. Controls (SCAFFOLD) are not robustified. The rules need the round's
updates to be of one adapter with equal keys and shapes; methods that upload rank slices (HetLoRA) or
several adapters per client (FL-TAC) are refused with a message.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch

from fedpeft.adapters import AdapterState
from fedpeft.strategies.base import ClientUpdate


class RobustAggregationError(ValueError):
    """The round's updates do not fit the configured rule (the message says why)."""


# --- pure rules on tensors --------------------------------------------------------------------------
def coordinate_median(values: torch.Tensor) -> torch.Tensor:
    """Median over dim 0 of ``values`` [n, ...]; for even n the mean of the two middle values."""
    n = values.shape[0]
    ordered = values.sort(dim=0).values
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(values: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """Mean over dim 0 after dropping the floor(trim_fraction * n) smallest and largest per coordinate."""
    n = values.shape[0]
    cut = math.floor(trim_fraction * n)
    if n - 2 * cut < 1:
        raise RobustAggregationError(f"trimmed_mean: trimming {cut} of {n} updates at each end leaves none")
    return values.sort(dim=0).values[cut:n - cut].mean(dim=0)


def krum_scores(vectors: torch.Tensor, byzantine: int) -> torch.Tensor:
    """score_i = sum of squared distances from row i to its n - f - 2 nearest other rows."""
    n = vectors.shape[0]
    neighbours = n - byzantine - 2
    if neighbours < 1:
        raise RobustAggregationError(f"krum with byzantine={byzantine} needs more than {byzantine + 2} updates, got {n}")
    diff = vectors[:, None, :] - vectors[None, :, :]
    dist = (diff * diff).sum(dim=-1)
    dist.fill_diagonal_(float("inf"))  # a vector is not its own neighbour
    return dist.sort(dim=1).values[:, :neighbours].sum(dim=1)


def krum_select(vectors: torch.Tensor, byzantine: int, keep: int = 1) -> list[int]:
    """Indices of the ``keep`` rows with the lowest Krum scores (ties: the lower index), in index order."""
    scores = krum_scores(vectors, byzantine)
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return sorted(order[:keep])


def clip_to_norm(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                 max_norm: float) -> tuple[AdapterState, float]:
    """reference + (state - reference) * min(1, max_norm / ||state - reference||); and that norm."""
    deltas = {k: state[k].double() - reference[k].double() for k in state}
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas.values()))
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    clipped = {k: (reference[k].double() + deltas[k] * scale).to(state[k].dtype) for k in state}
    return clipped, norm


# --- the hook ---------------------------------------------------------------------------------------------
def _check_uniform(updates: Sequence[ClientUpdate], global_state: AdapterState, rule: str) -> list[str]:
    keys = sorted(updates[0].tensors)
    jobs = {u.job for u in updates}
    if len(jobs) > 1:
        raise RobustAggregationError(f"federation.robust.rule={rule}: the round holds updates of several adapters "
                                     f"({', '.join(sorted(jobs))}); robust rules need one adapter per client")
    for u in updates:
        if sorted(u.tensors) != keys:
            raise RobustAggregationError(f"federation.robust.rule={rule}: client {u.client_id} sent other tensors "
                                         "than the first client; robust rules need equal keys")
        for k in keys:
            if k not in global_state or u.tensors[k].shape != global_state[k].shape:
                raise RobustAggregationError(
                    f"federation.robust.rule={rule}: client {u.client_id}'s '{k}' does not have the global shape "
                    "(rank slices or new tensors); this method cannot use robust rules")
    return keys


def apply_robust_rule(robust, global_state: AdapterState, updates: list[ClientUpdate]) -> list[ClientUpdate]:
    """The updates the method aggregates under ``robust`` (a config.RobustConfig); unchanged for
    ``rule: none`` without ``clip_norm``."""
    if not updates or (robust.rule == "none" and robust.clip_norm is None):
        return updates
    keys = _check_uniform(updates, global_state, robust.rule if robust.rule != "none" else "none+clip_norm")
    if robust.clip_norm is not None:
        updates = [dataclasses.replace(u, tensors=clip_to_norm(u.tensors, global_state, robust.clip_norm)[0])
                   for u in updates]
    if robust.rule in ("median", "trimmed_mean"):
        combined = {}
        for k in keys:
            stacked = torch.stack([u.tensors[k].double() for u in updates])
            value = coordinate_median(stacked) if robust.rule == "median" else trimmed_mean(stacked, robust.trim_fraction)
            combined[k] = value.to(updates[0].tensors[k].dtype)
        return [dataclasses.replace(u, tensors={k: v.clone() for k, v in combined.items()}) for u in updates]
    if robust.rule in ("krum", "multi_krum"):
        vectors = torch.stack([torch.cat([u.tensors[k].double().flatten() for k in keys]) for u in updates])
        keep = 1 if robust.rule == "krum" else (robust.krum_select or len(updates) - robust.byzantine)
        return [updates[i] for i in krum_select(vectors, robust.byzantine, min(keep, len(updates)))]
    return updates
