"""Minimal defences, pure functions, to check that each attack drops when its defence is on.

The split training owns the real defences at the cut (noise, d_χ-privacy, NoPeek) and their utility
cost; these stand-ins only perturb an observed tensor the way those defences do before it crosses.
"""

from __future__ import annotations

import torch


def gaussian_noise(tensor: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """``tensor`` + N(0, σ²) noise, seeded (activation noise at a cut; on a gradient, the noise of a
    Gaussian-mechanism upload). σ = 0 returns the tensor unchanged."""
    if sigma < 0:
        raise ValueError(f"sigma: {sigma} is negative; expected σ ≥ 0")
    if sigma == 0:
        return tensor
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * sigma
    return tensor + noise.to(tensor.device, tensor.dtype)


def noisy_gradients(gradients: dict[str, torch.Tensor], sigma: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Gaussian noise on every tensor of an uploaded gradient (one seed per tensor, in key order)."""
    return {name: gaussian_noise(g, sigma, seed + i) for i, (name, g) in enumerate(sorted(gradients.items()))}
