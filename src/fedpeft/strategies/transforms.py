"""Update transforms in optax's shape: pure ``(init, update)`` pairs over adapter dicts, and ``chain``.

A transform turns an update (a ``dict[str, Tensor]``: a pseudo-gradient on the server, a client's
update before it is sent) into another, carrying its own state::

    state = t.init(params)
    updates, state = t.update(updates, state, params)
    params = apply_updates(params, updates)            # params + updates, key by key

``update`` never mutates its inputs: it returns new dicts (so a caller can keep the old state for a
retry or a checkpoint). Per-key state (moments) is created lazily for the keys an update carries and
left untouched for the others, so a partial update (FFA-LoRA's B only, FedLS's sampled modules) steps
only what it holds. State is made of dicts of tensors and plain numbers: ``torch.save``-able, and
``state_fields`` / ``load_state_fields`` flatten it to named fields for a checkpoint.

Server side, ``server_optimizers.py`` composes FedAvgM, FedAdagrad, FedAdam and FedYogi from
``trace``, ``scale_by_adagrad`` / ``scale_by_adam`` / ``scale_by_yogi`` and ``scale``. Update side,
``clip_by_global_norm``, ``add_gaussian_noise`` and ``compress`` compose the same way, e.g. the
Gaussian mechanism of DP-FedAvg on one client's update: ``chain(clip_by_global_norm(C),
add_gaussian_noise(z * C, seed))``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from fedpeft.seeding import derive_seed
from fedpeft.metering.compression import SCHEMES, encode, decode

Updates = dict[str, torch.Tensor]
State = Any


class Transform(NamedTuple):
    """optax's ``GradientTransformation``: ``init(params) -> state`` and
    ``update(updates, state, params=None) -> (updates, state)``."""

    init: Callable[[Mapping[str, torch.Tensor]], State]
    update: Callable[[Mapping[str, torch.Tensor], State, Mapping[str, torch.Tensor] | None], tuple[Updates, State]]


def apply_updates(params: Mapping[str, torch.Tensor], updates: Mapping[str, torch.Tensor]) -> Updates:
    """``params[k] + updates[k]`` (float32) for the keys of ``updates``; other keys are not returned."""
    out = {}
    for key, u in updates.items():
        if key not in params:
            raise KeyError(f"update for '{key}', which is not a parameter")
        out[key] = params[key].float() + u
    return out


def chain(*transforms: Transform) -> Transform:
    """Apply ``transforms`` in order; the state is the tuple of their states."""

    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None):
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    return Transform(init, update)


# --- stateless ----------------------------------------------------------------------------------------
def identity() -> Transform:
    return Transform(lambda params: {}, lambda updates, state, params=None: (dict(updates), state))


def scale(step_size: float) -> Transform:
    """u <- step_size * u."""
    step_size = float(step_size)

    def update(updates, state, params=None):
        return {k: u * step_size for k, u in updates.items()}, state

    return Transform(lambda params: {}, update)


def clip_by_global_norm(max_norm: float) -> Transform:
    """u <- u * min(1, max_norm / ||u||), ||u|| the L2 norm over every tensor of the update together
    (DP-FedAvg clips a client's whole update, not tensor by tensor)."""
    if max_norm <= 0:
        raise ValueError(f"clip_by_global_norm: max_norm must be > 0, got {max_norm}")
    max_norm = float(max_norm)

    def update(updates, state, params=None):
        sq = sum(float(u.double().pow(2).sum()) for u in updates.values())
        norm = sq**0.5
        factor = 1.0 if norm <= max_norm else max_norm / norm
        return {k: u * factor for k, u in updates.items()}, state

    return Transform(lambda params: {}, update)


def compress(scheme: str) -> Transform:
    """u <- decode(encode(u, scheme)): what the receiver of a ``metering.compression`` payload sees.
    The state keeps the payload size of the last call (``bytes``), the bytes that crossed."""
    if scheme not in SCHEMES:
        raise ValueError(f"compress: unknown scheme '{scheme}'; expected one of {', '.join(SCHEMES)}")

    def update(updates, state, params=None):
        payload, nbytes = encode(updates, scheme)
        return {k: v.float() for k, v in decode(payload, scheme).items()}, {"bytes": nbytes}

    return Transform(lambda params: {"bytes": 0}, update)


# --- stateful -----------------------------------------------------------------------------------------
def add_gaussian_noise(std: float, seed: int) -> Transform:
    """u <- u + N(0, std^2) per coordinate. The noise of key k at the t-th call (t counts from 0, kept in
    the state as ``noise_count``) is drawn from ``torch.Generator`` seeded with
    ``derive_seed(seed, "gaussian_noise", t, k)``: reproducible across processes and after a resume,
    different for every key and call. Pass a seed derived for the caller (e.g. from run seed, round and
    client) so two clients never share noise."""
    if std < 0:
        raise ValueError(f"add_gaussian_noise: std must be >= 0, got {std}")
    std, seed = float(std), int(seed)

    def update(updates, state, params=None):
        count = int(state["noise_count"])
        out = {}
        for key, u in updates.items():
            gen = torch.Generator().manual_seed(derive_seed(seed, "gaussian_noise", count, key) % (2**63))
            noise = torch.randn(u.shape, generator=gen, dtype=torch.float32)
            out[key] = u.float() + std * noise.to(u.device)
        return out, {"noise_count": count + 1}

    return Transform(lambda params: {"noise_count": 0}, update)


def _per_key(state: Mapping[str, torch.Tensor], key: str, like: torch.Tensor, fill: float) -> torch.Tensor:
    """The stored tensor of ``key`` (shape-checked against ``like``), or a fresh one filled with ``fill``."""
    value = state.get(key)
    if value is None:
        return torch.full_like(like, fill)
    if value.shape != like.shape:
        raise ValueError(f"tensor '{key}' changed shape {tuple(value.shape)} -> {tuple(like.shape)}")
    return value


def trace(decay: float) -> Transform:
    """Heavy-ball momentum (FedAvgM's form, no 1 - decay): m <- decay * m + u; u <- m. m starts at 0."""
    _check_beta("trace", "decay", decay)

    def update(updates, state, params=None):
        m = dict(state["m"])
        for key, u in updates.items():
            m[key] = decay * _per_key(state["m"], key, u, 0.0) + u
        return {k: m[k] for k in updates}, {"m": m}

    return Transform(lambda params: {"m": {}}, update)


def _scale_by_moments(beta1: float, tau: float, second: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Transform:
    """m <- beta1 m + (1 - beta1) u; v <- second(v, u^2); u <- m / (sqrt(v) + tau). m starts at 0 and v at
    tau^2 (Reddi et al.'s v_{-1} >= tau^2); no bias correction (the paper has none). v is driven by u^2,
    never m^2."""
    _check_beta("adaptive", "beta1", beta1)
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")

    def update(updates, state, params=None):
        m, v, out = dict(state["m"]), dict(state["v"]), {}
        for key, u in updates.items():
            m[key] = beta1 * _per_key(state["m"], key, u, 0.0) + (1.0 - beta1) * u
            v[key] = second(_per_key(state["v"], key, u, tau * tau), u * u)
            out[key] = m[key] / (v[key].sqrt() + tau)
        return out, {"m": m, "v": v}

    return Transform(lambda params: {"m": {}, "v": {}}, update)


def scale_by_adagrad(beta1: float, tau: float) -> Transform:
    """v <- v + u^2 (with the first moment and output of :func:`_scale_by_moments`)."""
    return _scale_by_moments(beta1, tau, lambda v, u2: v + u2)


def scale_by_adam(beta1: float, beta2: float, tau: float) -> Transform:
    """v <- beta2 v + (1 - beta2) u^2."""
    _check_beta("adam", "beta2", beta2)
    return _scale_by_moments(beta1, tau, lambda v, u2: beta2 * v + (1.0 - beta2) * u2)


def scale_by_yogi(beta1: float, beta2: float, tau: float) -> Transform:
    """v <- v - (1 - beta2) u^2 sign(v - u^2)."""
    _check_beta("yogi", "beta2", beta2)
    return _scale_by_moments(beta1, tau, lambda v, u2: v - (1.0 - beta2) * u2 * torch.sign(v - u2))


def _check_beta(rule: str, name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{rule}: {name} must be in [0, 1), got {value}")


# --- state as named fields (checkpoints) --------------------------------------------------------------
def state_fields(state: State) -> dict[str, Any]:
    """A chain's state as one flat dict of named fields ({"m": ..., "v": ...}); two transforms of one
    chain must not use the same field name."""
    if isinstance(state, tuple):
        out: dict[str, Any] = {}
        for part in state:
            for name, value in state_fields(part).items():
                if name in out:
                    raise ValueError(f"two transforms of one chain keep a state field named '{name}'")
                out[name] = value
        return out
    return dict(state)


def load_state_fields(template: State, fields: Mapping[str, Any]) -> State:
    """The state shaped like ``template`` (a fresh ``init``) with the values of ``fields`` (from
    :func:`state_fields`); fields the template lacks are ignored, missing ones keep their fresh value.
    Tensors come back as float32 copies."""
    if isinstance(template, tuple):
        return tuple(load_state_fields(part, fields) for part in template)
    out = {}
    for name, fresh in template.items():
        value = fields.get(name, fresh)
        if isinstance(value, Mapping):
            value = {k: torch.as_tensor(t).float().clone() for k, t in value.items()}
        out[name] = value
    return out
