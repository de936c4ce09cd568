"""Per-client checks on an update, run before anything of that client is kept.

The round loop calls :func:`check_client_update` on every reply; a client that fails any check is
logged as ``client_failed``, is left out of the aggregation, and leaves no private state behind:
``Strategy.commit_private`` writes ``ClientUpdate.private`` (FedSA-LoRA's personal B, SCAFFOLD's c_k,
...) to the client store only after the checks pass. A Flower node runs the same checks on its own side
before it commits to its own store (``deploy/flower/node.py``); the server checks again.

The checks, in order (each failure is a ``ValueError`` that names the client, the field and the value):

1. ``num_examples`` is an integer, > 0, and at most ``max_examples`` (the examples the client holds in
   the server's partition, or ``federation.max_client_examples``): the aggregation weight p_k cannot be
   negative, zero or made to dominate.
2. the uploaded keys are exactly the ones the plan asked for (``plan.upload``, else ``plan.trainable``,
   else every key of the global state): a missing key would otherwise fail later inside ``aggregate``
   and end the round.
3. the strategy's own ``check_update`` (unknown keys, shapes or rank slices, finite values, keys a
   method never lets a client send).
4. control tensors (SCAFFOLD's c_k+ - c_k): keys the server sent a control for, same shapes, finite.
5. the client's private state (kept, never uploaded) holds finite values only.
6. the squared L2 norm of (update - global), summed in float32, is finite (values like 1e30 are
   finite but their squares overflow, and the weighted mean and Adam-style server moments then turn
   the next global state into NaN), and with ``federation.max_update_norm`` the norm is at most that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedpeft.adapters import AdapterState
from fedpeft.strategies.base import ClientPlan, ClientUpdate, Strategy


def expected_upload(plan: ClientPlan, global_state: Mapping[str, torch.Tensor]) -> set[str]:
    """The keys a client must send back for ``plan`` (the base Strategy's ``client_update`` rule)."""
    if plan.upload is not None:
        return set(plan.upload)
    if plan.trainable is not None:
        return set(plan.trainable)
    return set(global_state)


def _reference_slice(reference: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``reference`` a (possibly rank-sliced) uploaded tensor corresponds to."""
    if reference.shape == tensor.shape:
        return reference
    return reference[tuple(slice(0, n) for n in tensor.shape)]


def update_norm(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """||update - reference||_2 over the uploaded keys, squares summed in float32 (inf on overflow)."""
    total = torch.zeros((), dtype=torch.float32)
    for key, tensor in update.items():
        base = _reference_slice(reference[key], tensor) if key in reference else torch.zeros_like(tensor)
        total = total + (tensor.float() - base.float()).pow(2).sum()
    return math.sqrt(float(total)) if torch.isfinite(total) else math.inf


def check_client_update(strategy: Strategy, plan: ClientPlan, global_state: AdapterState, update: ClientUpdate,
                        max_examples: int | None = None, max_update_norm: float | None = None,
                        tensors_arrived: bool = True) -> None:
    """Raise ValueError when ``update`` (the reply to ``plan``) must not be aggregated or kept.
    ``tensors_arrived=False`` (SecAgg+: only a masked vector arrives) checks ``num_examples`` only;
    the node checked its tensors before masking and the strategy checks the unmasked mean."""
    who = f"client {plan.client_id} ({plan.job})"
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"{who}: num_examples={n!r} is not an integer")
    if n <= 0:
        raise ValueError(f"{who}: num_examples={n}; expected > 0 (it is the client's aggregation weight)")
    if max_examples is not None and n > max_examples:
        raise ValueError(f"{who}: num_examples={n} exceeds the {max_examples} training examples it holds "
                         "(federation.max_client_examples raises the bound for nodes with their own data)")
    if not tensors_arrived:
        return
    expected, sent = expected_upload(plan, global_state), set(update.tensors)
    if sent != expected:
        missing, extra = sorted(expected - sent), sorted(sent - expected)
        raise ValueError(f"{who}: uploaded keys differ from the plan's: "
                         + (f"missing {missing[:2]} ({len(missing)} in all)" if missing else "")
                         + ("; " if missing and extra else "")
                         + (f"unexpected {extra[:2]} ({len(extra)} in all)" if extra else ""))
    strategy.check_update(global_state, update)
    for key, tensor in update.control.items():
        if key not in plan.control:
            raise ValueError(f"{who}: control tensor '{key}' has no server control")
        if tuple(tensor.shape) != tuple(plan.control[key].shape):
            raise ValueError(f"{who}: control tensor '{key}' has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(plan.control[key].shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{who}: control tensor '{key}' holds NaN or inf")
    for name, state in update.private.items():
        for key, tensor in state.items():
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{who}: private state '{name}' tensor '{key}' holds NaN or inf; not kept")
    if update.tensors:
        norm = update_norm(update.tensors, global_state)
        if not math.isfinite(norm):
            raise ValueError(f"{who}: the update's squared norm overflows float32 (values too large to aggregate)")
        if max_update_norm is not None and norm > max_update_norm:
            raise ValueError(f"{who}: update norm {norm:.4g} exceeds federation.max_update_norm={max_update_norm:g}")


class StagedStore:
    """The client store as ``Strategy.client_update`` sees it: ``put`` is held back (staged) until the
    update passes the checks; ``get`` sees staged values first, so a method reading back what it just
    wrote behaves as before."""

    def __init__(self, store, client_id: int) -> None:
        self.store = store
        self.client_id = client_id
        self.staged: dict[str, AdapterState] = {}

    def get(self, client_id: int, name: str) -> AdapterState | None:
        if client_id == self.client_id and name in self.staged:
            return self.staged[name]
        return self.store.get(client_id, name) if self.store is not None else None

    def put(self, client_id: int, name: str, state: AdapterState) -> None:
        if client_id != self.client_id:
            raise ValueError(f"client {self.client_id}'s update tried to write client {client_id}'s state ({name!r})")
        self.staged[name] = {k: v.detach().clone() for k, v in state.items()}
