"""Federated methods behind one seam (see ``base.py``), selected by name in the config."""

from __future__ import annotations

from typing import Any

from fedpeft.strategies.base import AggregateResult, ClientPlan, ClientUpdate, Strategy, TrainResult
from fedpeft.strategies.baselines import Centralized, LocalOnly, ZeroShot
from fedpeft.strategies.fedex_lora import FedExLoRA
from fedpeft.strategies.fedgpl import FedGPL
from fedpeft.strategies.fedit import FedIT
from fedpeft.strategies.fedls import FedLS
from fedpeft.strategies.fedprox import FedProx
from fedpeft.strategies.fedsa_lora import FedSALoRA
from fedpeft.strategies.ffa_lora import FFALoRA
from fedpeft.strategies.flexlora import FlexLoRA
from fedpeft.strategies.flora import FLoRA
from fedpeft.strategies.fltac import FLTAC
from fedpeft.strategies.hetlora import HetLoRA, ZeroPadding
from fedpeft.strategies.scaffold import Scaffold
from fedpeft.strategies.server_optimizers import SERVER_OPTIMIZERS, build_server_optimizer

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedIT, FedProx, Scaffold,
        FFALoRA, FLoRA, FedExLoRA, FedSALoRA, ZeroPadding, HetLoRA, FlexLoRA,
        Centralized, LocalOnly, ZeroShot,
        FLTAC, FedLS, FedGPL,
    )
}
"""Method name -> class. Every name is its own class with its own rule (no aliases, no fallback)."""


def normalize_method_name(name: str) -> str:
    """Case and '-' vs '_' do not matter: 'FFA-LoRA' selects 'ffa_lora'."""
    return name.strip().lower().replace("-", "_")


def method_catalog() -> list[dict[str, Any]]:
    """One entry per method, for ``fedpeft methods``: name, one-line summary, options, and whether a
    server optimizer composes with it (with the reason when not)."""
    from fedpeft.strategies.common import COMMON_OPTIONS

    out = []
    for name, cls in sorted(STRATEGIES.items()):
        out.append({
            "name": name,
            "summary": getattr(cls, "summary", ""),
            "options": sorted(getattr(cls, "option_names", frozenset()) - COMMON_OPTIONS),
            "server_optimizer": getattr(cls, "server_optimizer_refusal", None) or "composes",
            "personalized": bool(getattr(cls, "personalized", False)),
        })
    return out


def build_experiment_strategy(config: Any) -> Strategy:
    """The strategy of an ``ExperimentConfig``: ``method.options`` completed with what every method may
    need from the rest of the config (LoRA rank/alpha/rsLoRA, number of clients, seed). The engine and
    the Flower ClientApp both build it here, so the two sides of a deployment agree."""
    options = dict(config.method.options)
    options.setdefault("r", config.peft.r)
    options.setdefault("lora_alpha", config.peft.alpha)
    options.setdefault("rslora", config.peft.rslora)
    options.setdefault("num_clients", config.federation.num_clients)
    options.setdefault("seed", config.seed)
    options.setdefault("local_optimizer", config.training.optimizer)
    return build_strategy(config.method.model_copy(update={"options": options}))


def build_strategy(method_config: Any) -> Strategy:
    """From a ``MethodConfig``. An unknown name is an error listing the valid names (no silent fallback);
    a server optimizer a method cannot use is an error giving the reason."""
    name = normalize_method_name(method_config.name)
    if name not in STRATEGIES:
        raise ValueError(f"unknown method '{method_config.name}'; valid methods: {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name](options=method_config.options, server_optimizer=build_server_optimizer(method_config.server_optimizer))


__all__ = [
    "AggregateResult", "ClientPlan", "ClientUpdate", "SERVER_OPTIMIZERS", "STRATEGIES", "Strategy", "TrainResult",
    "build_experiment_strategy", "build_strategy", "method_catalog", "normalize_method_name",
]
