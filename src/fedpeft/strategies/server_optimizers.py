"""Server optimizers: transforms of the aggregated delta, composable with any averaging rule.

Each takes the current global state theta and the averaged client state, forms the pseudo-gradient
Delta = avg - theta, and returns the new global state. ``IdentityServerOptimizer`` returns ``avg``
unchanged (plain FedAvg). State (momentum, second moments) is kept per tensor key and saved for resume.

The rules (Reddi et al. 2021, "Adaptive federated optimization", Algorithm 2; Hsu et al. 2019 for
FedAvgM), with Delta = avg - theta, per coordinate:

- FedAvgM:    m <- beta1 * m + Delta (the heavy-ball form, no (1 - beta1));  theta <- theta + lr * m
- FedAdagrad: m <- beta1 * m + (1 - beta1) * Delta;  v <- v + Delta^2
- FedAdam:    m <- beta1 * m + (1 - beta1) * Delta;  v <- beta2 * v + (1 - beta2) * Delta^2
- FedYogi:    m <- beta1 * m + (1 - beta1) * Delta;  v <- v - (1 - beta2) * Delta^2 * sign(v - Delta^2)
- adaptive:   theta <- theta + lr * m / (sqrt(v) + tau)

v is driven by Delta^2, never m^2. m starts at 0 and v at tau^2 (the paper's v_{-1} >= tau^2); there is
no bias correction (the paper has none). Only the keys present in ``averaged`` are stepped; the others
keep their state untouched (e.g. FFA-LoRA steps B only, FedSA-LoRA A only).
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
    """Plain FedAvg: the new global is the average."""

    name = "none"

    def step(self, global_state, averaged):
        return {k: v.clone() for k, v in averaged.items()}


class _MomentServerOptimizer(ServerOptimizer):
    """Common state handling: per-key first moment m (and second moment v for adaptive rules)."""

    uses_v = False

    def __init__(self, lr: float = 1.0, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        if lr <= 0:
            raise ValueError(f"server optimizer {self.name}: lr must be > 0, got {lr}")
        if not 0 <= beta1 < 1 or not 0 <= beta2 < 1:
            raise ValueError(f"server optimizer {self.name}: beta1, beta2 must be in [0, 1), got {beta1}, {beta2}")
        if tau <= 0:
            raise ValueError(f"server optimizer {self.name}: tau must be > 0, got {tau}")
        self.lr, self.beta1, self.beta2, self.tau = float(lr), float(beta1), float(beta2), float(tau)
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.steps = 0

    def _update(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        """Return the step to add to theta for this key (and update the moments)."""
        raise NotImplementedError

    def step(self, global_state, averaged):
        out: AdapterState = {}
        for key, avg in averaged.items():
            if key not in global_state:
                raise KeyError(f"server optimizer {self.name}: averaged tensor '{key}' is not in the global state")
            theta = global_state[key].float()
            delta = avg.float() - theta
            if key in self.m and self.m[key].shape != delta.shape:
                raise ValueError(
                    f"server optimizer {self.name}: tensor '{key}' changed shape "
                    f"{tuple(self.m[key].shape)} -> {tuple(delta.shape)}"
                )
            out[key] = theta + self._update(key, delta)
        self.steps += 1
        return out

    def _moment1(self, key: str, delta: torch.Tensor, dampen: bool) -> torch.Tensor:
        m = self.m.get(key)
        if m is None:
            m = torch.zeros_like(delta)
        m = self.beta1 * m + ((1.0 - self.beta1) * delta if dampen else delta)
        self.m[key] = m
        return m

    def _v0(self, delta: torch.Tensor) -> torch.Tensor:
        return torch.full_like(delta, self.tau**2)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "name": self.name,
            "steps": self.steps,
            "hyper": {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau},
            "m": {k: v.clone() for k, v in self.m.items()},
        }
        if self.uses_v:
            state["v"] = {k: v.clone() for k, v in self.v.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if state.get("name") != self.name:
            raise ValueError(
                f"checkpoint holds server optimizer '{state.get('name')}' state, the config asks for '{self.name}'"
            )
        self.steps = int(state.get("steps", 0))
        self.m = {k: torch.as_tensor(v).float().clone() for k, v in state.get("m", {}).items()}
        self.v = {k: torch.as_tensor(v).float().clone() for k, v in state.get("v", {}).items()}


class FedAvgM(_MomentServerOptimizer):
    """m <- beta1 m + Delta; theta <- theta + lr m (Hsu et al. 2019; lr=1, beta1=0 is FedAvg)."""

    name = "fedavgm"

    def _update(self, key, delta):
        return self.lr * self._moment1(key, delta, dampen=False)


class _AdaptiveServerOptimizer(_MomentServerOptimizer):
    uses_v = True

    def _second(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _update(self, key, delta):
        m = self._moment1(key, delta, dampen=True)
        v = self.v.get(key)
        if v is None:
            v = self._v0(delta)
        v = self._second(v, delta * delta)
        self.v[key] = v
        return self.lr * m / (v.sqrt() + self.tau)


class FedAdagrad(_AdaptiveServerOptimizer):
    name = "fedadagrad"

    def _second(self, v, delta_sq):
        return v + delta_sq


class FedAdam(_AdaptiveServerOptimizer):
    name = "fedadam"

    def _second(self, v, delta_sq):
        return self.beta2 * v + (1.0 - self.beta2) * delta_sq


class FedYogi(_AdaptiveServerOptimizer):
    name = "fedyogi"

    def _second(self, v, delta_sq):
        return v - (1.0 - self.beta2) * delta_sq * torch.sign(v - delta_sq)


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    "none": IdentityServerOptimizer,
    "fedavgm": FedAvgM,
    "fedadagrad": FedAdagrad,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
}


def is_identity(optimizer: ServerOptimizer | None) -> bool:
    return optimizer is None or isinstance(optimizer, IdentityServerOptimizer)


def build_server_optimizer(config: Any) -> ServerOptimizer:
    """From a ``ServerOptimizerConfig``; unknown names list the valid ones."""
    name = config.name
    if name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer '{name}'; valid: {', '.join(sorted(SERVER_OPTIMIZERS))}")
    cls = SERVER_OPTIMIZERS[name]
    if cls is IdentityServerOptimizer:
        return cls()
    return cls(lr=config.lr, beta1=config.beta1, beta2=config.beta2, tau=config.tau)
