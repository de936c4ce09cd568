"""Server optimizers: transforms of the aggregated delta, composable with any averaging rule.

Each takes the current global state theta and the averaged client state, forms the pseudo-gradient
Delta = avg - theta, and returns the new global state. ``IdentityServerOptimizer`` returns ``avg``
unchanged (plain FedAvg). State (momentum, second moments) is kept per tensor key and saved for resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedpeft.adapters import AdapterState


class ServerOptimizer:
    name = "none"

    def step(self, global_state: Mapping[str, torch.Tensor], averaged: Mapping[str, torch.Tensor]) -> AdapterState:
        """New values for the keys of ``averaged`` (keys absent from it are left to the caller)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class IdentityServerOptimizer(ServerOptimizer):
    name = "none"

    def step(self, global_state, averaged):
        return {k: v.clone() for k, v in averaged.items()}


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {"none": IdentityServerOptimizer}


def build_server_optimizer(config: Any) -> ServerOptimizer:
    """From a ``ServerOptimizerConfig``; unknown names list the valid ones."""
    name = config.name
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer '{name}'; valid: {', '.join(sorted(SERVER_OPTIMIZERS))}")
    cls = SERVER_OPTIMIZERS[name]
    if cls is IdentityServerOptimizer:
        return cls()
    return cls(lr=config.lr, beta1=config.beta1, beta2=config.beta2, tau=config.tau)
