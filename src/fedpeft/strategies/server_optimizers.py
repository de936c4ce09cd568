"""Server optimizers: transforms of the aggregated pseudo-gradient, composable with any averaging rule.

The server forms Delta = avg - theta (per key, over the keys a round averaged), runs it through the
rule's transform chain (``transforms.py``) and adds the result: theta <- theta + chain(Delta). Each rule
is a short composition (Reddi et al. 2021, "Adaptive federated optimization", Algorithm 2; Hsu et al.
2019 for FedAvgM), per coordinate:

- ``none`` (FedAvg):  theta <- avg (the average itself, bit for bit)
- ``fedavgm``:     m <- beta1 m + Delta (heavy ball, no 1 - beta1);  theta <- theta + lr m
                   = chain(trace(beta1), scale(lr))
- ``fedadagrad``:  m <- beta1 m + (1 - beta1) Delta;  v <- v + Delta^2
                   = chain(scale_by_adagrad(beta1, tau), scale(lr))
- ``fedadam``:     m as above;  v <- beta2 v + (1 - beta2) Delta^2
                   = chain(scale_by_adam(beta1, beta2, tau), scale(lr))
- ``fedyogi``:     m as above;  v <- v - (1 - beta2) Delta^2 sign(v - Delta^2)
                   = chain(scale_by_yogi(beta1, beta2, tau), scale(lr))
- adaptive rules:  theta <- theta + lr m / (sqrt(v) + tau); v is driven by Delta^2, never m^2; m starts at
                   0 and v at tau^2; no bias correction (the paper has none).

Defaults per rule (the keyword defaults of the functions below, shown by ``fedpeft methods``): the
server learning rates sit in the ranges where Reddi et al.'s tuned best values fall for each rule
(their grid: lr in 10^-3..10^1, tau in 10^-5..10^-1, beta1 = 0.9, beta2 = 0.99): lr 1 for FedAvgM,
10^-1 for FedAdagrad, 10^-2 for FedAdam and FedYogi, tau 10^-3. One lr of 1 for every rule made FedAdam
step about 1 per coordinate whatever the update's size: a 1e-3 update became a 0.05 step in round 1.

Only the keys present in ``averaged`` are stepped; the others keep their state (FFA-LoRA steps B only,
FedSA-LoRA A only). ``state_dict`` is ``{"name", "steps", "hyper", "m", "v"}`` (the format of earlier
checkpoints), and loading a checkpoint of another rule is refused by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedpeft.adapters import AdapterState
from fedpeft.strategies.transforms import (
    Transform,
    apply_updates,
    chain,
    load_state_fields,
    scale,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_yogi,
    state_fields,
    trace,
)


# --- the rules: name -> a transform built from its hyperparameters (their defaults are the rule's) ----
def fedavg() -> Transform:
    """FedAvg: theta <- avg (the average itself, bit for bit)."""
    return chain()


def fedavgm(lr: float = 1.0, beta1: float = 0.9) -> Transform:
    """m <- beta1 m + Delta; theta <- theta + lr m (lr = 1, beta1 = 0 is FedAvg)."""
    return chain(trace(beta1), scale(lr))


def fedadagrad(lr: float = 1e-1, beta1: float = 0.9, tau: float = 1e-3) -> Transform:
    """m <- beta1 m + (1 - beta1) Delta; v <- v + Delta^2; theta <- theta + lr m / (sqrt(v) + tau)."""
    return chain(scale_by_adagrad(beta1, tau), scale(lr))


def fedadam(lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> Transform:
    """m <- beta1 m + (1 - beta1) Delta; v <- beta2 v + (1 - beta2) Delta^2; theta <- theta + lr m / (sqrt(v) + tau)."""
    return chain(scale_by_adam(beta1, beta2, tau), scale(lr))


def fedyogi(lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> Transform:
    """m as FedAdam; v <- v - (1 - beta2) Delta^2 sign(v - Delta^2); theta <- theta + lr m / (sqrt(v) + tau)."""
    return chain(scale_by_yogi(beta1, beta2, tau), scale(lr))


SERVER_OPTIMIZERS: dict[str, Callable[..., Transform]] = {
    "none": fedavg,
    "fedavgm": fedavgm,
    "fedadagrad": fedadagrad,
    "fedadam": fedadam,
    "fedyogi": fedyogi,
}
"""method.server_optimizer.name -> the rule (the one list of names; config.py validates against it)."""


def rule_defaults(name: str) -> dict[str, float]:
    """The hyperparameters of rule ``name`` and their defaults."""
    rule = _rule(name)
    return {p.name: p.default for p in inspect.signature(rule).parameters.values()}


def _rule(name: str) -> Callable[..., Transform]:
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer '{name}'; valid: {', '.join(sorted(SERVER_OPTIMIZERS))}")
    return SERVER_OPTIMIZERS[name]


# --- the server's stateful wrapper --------------------------------------------------------------------
class ServerOptimizer:
    """A rule's transform with its state, stepping the global adapter: ``step(theta, avg)``."""

    def __init__(self, name: str, hyper: Mapping[str, float], transform: Transform) -> None:
        self.name, self.hyper, self.transform = name, dict(hyper), transform
        self.state = transform.init({})
        self.steps = 0

    def __getattr__(self, item: str) -> Any:  # opt.lr, opt.beta1, ... read the hyperparameters
        hyper = self.__dict__.get("hyper", {})
        if item in hyper:
            return hyper[item]
        raise AttributeError(item)

    @property
    def m(self) -> dict[str, torch.Tensor]:
        return state_fields(self.state).get("m", {})

    @property
    def v(self) -> dict[str, torch.Tensor]:
        return state_fields(self.state).get("v", {})

    def step(self, global_state: Mapping[str, torch.Tensor], averaged: Mapping[str, torch.Tensor]) -> AdapterState:
        """New values for the keys of ``averaged`` (keys absent from it are left to the caller)."""
        missing = [k for k in averaged if k not in global_state]
        if missing:
            raise KeyError(f"server optimizer {self.name}: averaged tensor '{missing[0]}' is not in the global state")
        if self.name == "none":
            return {k: v.clone() for k, v in averaged.items()}
        theta = {k: global_state[k].float() for k in averaged}
        delta = {k: averaged[k].float() - theta[k] for k in averaged}
        try:
            updates, self.state = self.transform.update(delta, self.state, theta)
        except ValueError as exc:
            raise ValueError(f"server optimizer {self.name}: {exc}") from exc
        self.steps += 1
        return apply_updates(theta, updates)

    def state_dict(self) -> dict[str, Any]:
        if self.name == "none":
            return {}
        return {"name": self.name, "steps": self.steps, "hyper": dict(self.hyper),
                **{k: _copy(v) for k, v in state_fields(self.state).items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if state.get("name") != self.name:
            raise ValueError(
                f"checkpoint holds server optimizer '{state.get('name')}' state, the config asks for '{self.name}'"
            )
        self.steps = int(state.get("steps", 0))
        self.state = load_state_fields(self.transform.init({}), state)


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: t.clone() for k, t in value.items()}
    return value


def make_server_optimizer(name: str, **hyper: float) -> ServerOptimizer:
    """Rule ``name`` with ``hyper`` over its defaults; a hyperparameter the rule lacks is an error."""
    defaults = rule_defaults(name)
    unknown = sorted(set(hyper) - set(defaults))
    if unknown:
        have = ", ".join(defaults) or "none"
        raise ValueError(f"server optimizer {name} has no {unknown[0]} (its hyperparameters: {have})")
    values = {**defaults, **{k: float(v) for k, v in hyper.items()}}
    if values.get("lr", 1.0) <= 0:
        raise ValueError(f"server optimizer {name}: lr must be > 0, got {values['lr']}")
    try:
        transform = SERVER_OPTIMIZERS[name](**values)
    except ValueError as exc:
        raise ValueError(f"server optimizer {name}: {exc}") from exc
    return ServerOptimizer(name, values, transform)


def build_server_optimizer(config: Any) -> ServerOptimizer:
    """From a ``ServerOptimizerConfig``: the hyperparameters it sets (not None) over the rule's defaults;
    ones the rule does not have are ignored (the config check warns about them)."""
    have = rule_defaults(config.name)
    hyper = {k: getattr(config, k) for k in have if getattr(config, k, None) is not None}
    return make_server_optimizer(config.name, **hyper)


def is_identity(optimizer: ServerOptimizer | None) -> bool:
    return optimizer is None or optimizer.name == "none"
