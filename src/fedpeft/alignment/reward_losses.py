"""Pairwise reward-model losses: a table of pure functions of the chosen and rejected rewards.

Each function takes ``chosen`` and ``rejected``, two float tensors of shape ``(batch,)`` (the scalar
reward of each completion of a pair), and returns the mean loss over the batch. ``d = chosen - rejected``
is the reward gap; ``σ`` is the logistic function. The variants are the ones listed in seed 003 (after
TRL's reward trainer). Where the seed's one-liner would *not* rank the chosen completion above the
rejected one with scalar rewards, the docstring says so and the function uses the preference reading of
the same loss (so every entry of the table trains a reward model; a benchmark then compares them):

- the seed's BCE, MSE and smooth-L1 lines use a target of 0 for ``d`` (BCE's 0 would prefer the
  rejected completion; MSE/smooth-L1 towards 0 would erase the preference); here BCE's target is 1 and
  MSE/smooth-L1 regress ``d`` to a margin ``m``;
- the seed's KL, cosine, triplet, focal and dice lines take softmaxes/cosines over a reward *vector*
  (``dim=1``), which is constant for one scalar per completion; here they act on the pair:
  KL against a target distribution over (chosen, rejected), cosine against the direction (1, -1),
  triplet with a fixed anchor reward, focal and dice on ``p = σ(d)``, the Bradley-Terry probability
  that the chosen completion wins.

``reward_loss(name, **params)`` picks one by name; an unknown name or parameter is an error listing the
valid ones.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def logsigmoid_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Bradley-Terry: ``mean(-log σ(d))``."""
    return -F.logsigmoid(chosen - rejected).mean()


def bce_loss(chosen: Tensor, rejected: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Binary cross-entropy with logits ``d`` and target ``t = 1 - ε``:
    ``mean(-t·log σ(d) - (1 - t)·log(1 - σ(d)))``. With ``ε = 0`` it equals ``logsigmoid``."""
    target = torch.full_like(chosen, 1.0 - label_smoothing)
    return F.binary_cross_entropy_with_logits(chosen - rejected, target)


def mse_loss(chosen: Tensor, rejected: Tensor, margin: float = 1.0) -> Tensor:
    """Regress the gap to a margin: ``mean((d - m)²)``."""
    return F.mse_loss(chosen - rejected, torch.full_like(chosen, margin))


def smooth_l1_loss(chosen: Tensor, rejected: Tensor, margin: float = 1.0, beta: float = 1.0) -> Tensor:
    """Huber on ``x = d - m``: ``mean(0.5·x²/β if |x| < β else |x| - 0.5·β)``."""
    return F.smooth_l1_loss(chosen - rejected, torch.full_like(chosen, margin), beta=beta)


def hinge_loss(chosen: Tensor, rejected: Tensor, margin: float = 1.0) -> Tensor:
    """Hinge / margin ranking: ``mean(max(0, m - d))`` (the seed's ``hinge`` is ``m = 1``, its
    ``relu(margin - d)`` line the same with a free ``m``)."""
    return torch.relu(margin - (chosen - rejected)).mean()


def kl_loss(chosen: Tensor, rejected: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """KL from a target distribution over the pair, ``T = (1 - ε, ε)``, to the model's
    ``P = softmax(chosen, rejected) = (σ(d), σ(-d))``: ``mean(Σ_j T_j·(log T_j - log P_j))`` (terms with
    ``T_j = 0`` count 0). It is zero at ``σ(d) = 1 - ε``, so with ``ε > 0`` it stops widening the gap at
    ``d = log((1 - ε)/ε)`` instead of pushing it to infinity."""
    log_p = F.log_softmax(torch.stack([chosen, rejected], dim=-1), dim=-1)
    target = torch.tensor([1.0 - label_smoothing, label_smoothing], dtype=chosen.dtype, device=chosen.device)
    target = target.expand_as(log_p)
    return F.kl_div(log_p, target, reduction="sum") / chosen.shape[0]


def cosine_loss(chosen: Tensor, rejected: Tensor, margin: float = 1.0) -> Tensor:
    """Cosine-margin on the pair vector ``u = (chosen, rejected)`` against the preferred direction
    ``e = (1, -1)``: ``c = cos(u, e) = d / (√2·‖u‖)``, ``mean(0.5·(1 - c) + 0.5·max(0, m - c))``.
    Scale-free: only the direction of the two rewards counts."""
    u = torch.stack([chosen, rejected], dim=-1)
    e = torch.tensor([1.0, -1.0], dtype=chosen.dtype, device=chosen.device).expand_as(u)
    c = F.cosine_similarity(u, e, dim=-1)
    return (0.5 * (1 - c) + 0.5 * torch.relu(margin - c)).mean()


def triplet_loss(chosen: Tensor, rejected: Tensor, margin: float = 1.0, anchor: float = 1.0) -> Tensor:
    """Triplet margin with a fixed anchor reward ``a`` (positive = chosen, negative = rejected):
    ``mean(max(0, |a - chosen| - |a - rejected| + m))``. A metric loss: it pulls the chosen reward to
    ``a`` and keeps the rejected one at least ``m`` farther away; for rewards below ``a`` it is the hinge
    on ``d`` (a rejected reward far *above* ``a`` also satisfies it)."""
    a = torch.full_like(chosen, anchor)
    return F.triplet_margin_loss(a[:, None], chosen[:, None], rejected[:, None], margin=margin, p=1).mean()


def focal_loss(chosen: Tensor, rejected: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss on ``p = σ(d)``: ``mean(-α·(1 - p)^γ·log p)``; pairs already ranked with confidence
    weigh little."""
    d = chosen - rejected
    return (-alpha * (1 - torch.sigmoid(d)) ** gamma * F.logsigmoid(d)).mean()


def dice_loss(chosen: Tensor, rejected: Tensor, smooth: float = 1.0) -> Tensor:
    """Dice on ``p = σ(d)`` with every target 1 (the chosen completion always wins):
    ``1 - (2·Σp + s) / (Σp + N + s)`` over the batch of ``N`` pairs (one value, not a mean)."""
    p = torch.sigmoid(chosen - rejected)
    return 1 - (2 * p.sum() + smooth) / (p.sum() + p.numel() + smooth)


REWARD_LOSSES: dict[str, Callable[..., Tensor]] = {
    "logsigmoid": logsigmoid_loss,
    "bce": bce_loss,
    "mse": mse_loss,
    "smooth_l1": smooth_l1_loss,
    "hinge": hinge_loss,
    "kl": kl_loss,
    "cosine": cosine_loss,
    "triplet": triplet_loss,
    "focal": focal_loss,
    "dice": dice_loss,
}


def loss_parameters(name: str) -> dict[str, float]:
    """The tunable parameters of a loss and their defaults."""
    fn = REWARD_LOSSES[name]
    return {p.name: p.default for p in list(inspect.signature(fn).parameters.values())[2:]}


def reward_loss(name: str, **params: float) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss ``name`` with ``params`` bound; errors list the valid names and parameters."""
    if name not in REWARD_LOSSES:
        raise ValueError(f"reward loss {name!r} is unknown; valid: {', '.join(REWARD_LOSSES)}")
    valid = loss_parameters(name)
    for key, value in params.items():
        if key not in valid:
            raise ValueError(f"reward loss {name!r} has no parameter {key!r}; valid: {', '.join(valid) or 'none'}")
        if not math.isfinite(float(value)):
            raise ValueError(f"reward loss {name!r} parameter {key!r} = {value!r}; expected a finite number")
    return partial(REWARD_LOSSES[name], **params)


def pairwise_accuracy(chosen: Tensor, rejected: Tensor) -> float:
    """Fraction of pairs whose chosen reward is strictly higher than the rejected one (ties count as wrong)."""
    return float((chosen > rejected).float().mean())
