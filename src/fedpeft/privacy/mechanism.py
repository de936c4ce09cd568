"""The Gaussian mechanism of DP-FedAvg as pure functions over adapter dicts.

A client's contribution is the change of its uploaded tensors during the round, ``delta = trained -
start``, clipped to L2 norm C over all its tensors together (``transforms.clip_by_global_norm``). Noise
(``transforms.add_gaussian_noise``, seeded) is N(0, (z C)^2) per coordinate on the *sum* of the clipped
deltas: added by the server to the sum (central), or by each of the m sampled clients as N(0, (z C)^2 / m)
so that the sum of their noises has the same law (distributed: the server, with SecAgg+, never sees an
un-noised sum), or by each client as N(0, (z C)^2) on its own delta (local).

Adaptive clipping (Andrew et al. 2021, "Differentially private learning with adaptive clipping"):
each client also reports b_k = 1[||delta_k|| <= C]; the server forms the noisy fraction
b = (sum_k b_k + N(0, sigma_b^2)) / m and sets C <- C exp(-eta_C (b - gamma)), gamma the target quantile.
To keep the overall noise multiplier z, the updates get z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)
(their Theorem 1), which needs sigma_b > z / 2.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from fedpeft.strategies.transforms import add_gaussian_noise, clip_by_global_norm

Tensors = dict[str, torch.Tensor]

MODES = ("none", "central", "distributed", "local")


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over every tensor together (float64 accumulation)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def update_delta(trained: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], keys: Iterable[str]) -> Tensors:
    """trained[k] - start[k] (float32) for ``keys``."""
    return {k: trained[k].float() - start[k].float() for k in keys}


def clip_delta(delta: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[Tensors, float]:
    """(delta scaled to L2 norm <= clip_norm, the norm before clipping)."""
    clip = clip_by_global_norm(clip_norm)
    clipped, _ = clip.update(delta, clip.init(delta))
    return clipped, global_norm(delta)


def gaussian_noise(like: Mapping[str, torch.Tensor], std: float, seed: int) -> Tensors:
    """N(0, std^2) per coordinate in the shapes of ``like``, from ``seed`` (per key, stable across processes)."""
    noise = add_gaussian_noise(std, seed)
    zeros = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in like.items()}
    out, _ = noise.update(zeros, noise.init(zeros))
    return out


def client_noise_std(mode: str, noise_multiplier: float, clip_norm: float, clients_per_round: int) -> float:
    """Noise std each client adds to its own clipped delta: z C (local), z C / sqrt(m) (distributed), 0 (central)."""
    if mode == "local":
        return noise_multiplier * clip_norm
    if mode == "distributed":
        return noise_multiplier * clip_norm / math.sqrt(clients_per_round)
    return 0.0


def server_noise_std(mode: str, noise_multiplier: float, clip_norm: float) -> float:
    """Noise std the server adds to the sum of the clipped deltas: z C (central), else 0."""
    return noise_multiplier * clip_norm if mode == "central" else 0.0


def distributed_effective_multiplier(noise_multiplier: float, planned: int, arrived: int) -> float:
    """The noise multiplier of a distributed-DP sum when ``arrived`` of the ``planned`` clients' noise
    shares made it in: each share has variance (z C)^2 / planned, so the sum has z sqrt(arrived / planned)."""
    return noise_multiplier * math.sqrt(arrived / planned)


def adaptive_update_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2): the update noise that, with the clipped-count noise
    sigma_b, keeps the round's overall noise multiplier at z (Andrew et al. 2021, Theorem 1)."""
    if count_noise_std <= noise_multiplier / 2:
        raise ValueError(f"privacy.adaptive_clipping.count_noise_std={count_noise_std} must exceed "
                         f"noise_multiplier / 2 = {noise_multiplier / 2} (else the update noise would be infinite)")
    return (noise_multiplier ** -2 - (2 * count_noise_std) ** -2) ** -0.5


def next_clip_norm(clip_norm: float, unclipped_fraction: float, target_quantile: float, lr: float) -> float:
    """Geometric update C <- C exp(-eta (b - gamma)), b the (noisy) fraction of updates that were not clipped."""
    return clip_norm * math.exp(-lr * (unclipped_fraction - target_quantile))
