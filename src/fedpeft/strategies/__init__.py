"""Federated methods behind one seam (see ``base.py``), selected by name in the config."""

from __future__ import annotations

from typing import Any

from fedpeft.strategies.base import AggregateResult, ClientPlan, ClientUpdate, Strategy, TrainResult
from fedpeft.strategies.fedit import FedIT
from fedpeft.strategies.server_optimizers import build_server_optimizer

STRATEGIES: dict[str, type[Strategy]] = {"fedit": FedIT}


def build_strategy(method_config: Any) -> Strategy:
    """From a ``MethodConfig``. An unknown name is an error listing the valid names (no silent fallback)."""
    name = method_config.name.lower()
    if name not in STRATEGIES:
        raise ValueError(f"unknown method '{method_config.name}'; valid methods: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name](options=method_config.options, server_optimizer=build_server_optimizer(method_config.server_optimizer))


__all__ = ["AggregateResult", "ClientPlan", "ClientUpdate", "STRATEGIES", "Strategy", "TrainResult", "build_strategy"]
