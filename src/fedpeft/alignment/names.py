"""The names a config may give for a training objective and a reward loss, with each loss's parameters
and defaults: torch-free, so ``config.py`` validates them before anything heavy is imported.
``reward_losses.REWARD_LOSSES`` is the table of the functions themselves; a test checks the two agree."""

from __future__ import annotations

OBJECTIVES = ("sft", "reward", "dpo", "ipo")
"""sft: the model's own LM loss (default); reward: a scalar-head reward model on pairs; dpo/ipo: the
policy against the frozen base (adapters off) as reference."""

PREFERENCE_OBJECTIVES = OBJECTIVES[1:]

REWARD_LOSS_PARAMS: dict[str, dict[str, float]] = {
    "logsigmoid": {},
    "bce": {"label_smoothing": 0.0},
    "mse": {"margin": 1.0},
    "smooth_l1": {"margin": 1.0, "beta": 1.0},
    "hinge": {"margin": 1.0},
    "kl": {"label_smoothing": 0.1},
    "cosine": {"margin": 1.0},
    "triplet": {"margin": 1.0, "anchor": 1.0},
    "focal": {"alpha": 0.25, "gamma": 2.0},
    "dice": {"smooth": 1.0},
}
"""Reward loss name -> its tunable parameters and their defaults (``training.loss_params``)."""

DEFAULT_REWARD_LOSS = "logsigmoid"
DEFAULT_BETA = 0.1
