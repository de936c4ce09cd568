"""The defences at the cut, as pure functions of tensors and a seeded generator.

- Gaussian noise on the activations sent up at cut 1: h + sigma * N(0, I).
- d_chi-privacy on the input embeddings (Feyisetan et al., WSDM 2020): each token vector x becomes
  x + r * u, with u uniform on the unit sphere of R^d and r ~ Gamma(d, 1/epsilon), the density
  proportional to exp(-epsilon * ||z||) in R^d (a multivariate Laplace). The noisy vector is used
  as it is (no projection back to the nearest token).
- NoPeek (Vepakomma et al. 2020): the distance correlation between the inputs and the cut activations
  over the batch, added to the client's loss with weight alpha.
"""

from __future__ import annotations

import torch


def gaussian_noise(h: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """h + sigma * N(0, I), drawn from ``generator`` (on h's device) in float32, cast to h's dtype."""
    noise = torch.randn(h.shape, generator=generator, device=h.device, dtype=torch.float32)
    return h + (sigma * noise).to(h.dtype)


def dchi_noise(shape: torch.Size, epsilon: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Noise for d_chi-privacy, one vector per row of the last dimension d: direction uniform on the
    sphere (a normalised standard normal), magnitude Gamma(d, 1/epsilon). For an integer d the Gamma is
    exactly the sum of d Exp(1) draws (-log U), which a seeded ``generator`` can produce."""
    d = shape[-1]
    direction = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    uniform = torch.rand((*shape[:-1], d), generator=generator, device=device, dtype=torch.float32)
    magnitude = -torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)).sum(dim=-1, keepdim=True) / epsilon
    return direction * magnitude


def dchi_privatise(x: torch.Tensor, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    return x + dchi_noise(x.shape, epsilon, generator, x.device).to(x.dtype)


def _centred_distances(x: torch.Tensor) -> torch.Tensor:
    """Double-centred Euclidean distance matrix of the rows of x (n, features)."""
    diff = x.unsqueeze(0) - x.unsqueeze(1)
    dist = torch.sqrt((diff * diff).sum(-1) + 1e-12)  # smooth at 0 so the gradient exists on the diagonal
    return dist - dist.mean(0, keepdim=True) - dist.mean(1, keepdim=True) + dist.mean()


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation dCor(X, Z) in [0, 1] (Szekely et al. 2007, the V-statistic), rows are
    samples: each of x and z is flattened to (n, -1). Differentiable; 0 for fewer than 2 samples."""
    n = x.shape[0]
    if n < 2:
        return z.sum() * 0.0
    dtype = torch.promote_types(torch.promote_types(x.dtype, z.dtype), torch.float32)  # at least float32
    a = _centred_distances(x.reshape(n, -1).to(dtype))
    b = _centred_distances(z.reshape(n, -1).to(dtype))
    dcov_xz = (a * b).mean()
    dvar = (a * a).mean() * (b * b).mean()
    return torch.sqrt(dcov_xz.clamp_min(0.0) / torch.sqrt(dvar).clamp_min(1e-24) + 1e-12)
