"""FedLS (layer sampling with a server momentum buffer; seed 000, ALGORITHMS.md section 3).

Unit (option ``mask_unit``): ``module`` (default: a LoRA module, its A and B sampled together, the unit
of ALGORITHMS.md's per-module statistics) or ``key`` (the seed code's unit: every state-dict key on its
own, so lora_A and lora_B of one module are sampled independently). Below, "module" means the unit. The server keeps, per module i, the last aggregated update
Delta_i (avg - theta over A and B, from the last round the module was trained) and from it the L2 norm
l_i and the entropy H_i of the normalised magnitudes |Delta_i| / sum |Delta_i|. The score is
s_i = (l_i / max l) * (H_i / max H) and the sampling probability p_i = clip(rho * s_i, min_prob, max_prob).

Each round one mask is drawn for all its clients: mask_i = [u_i < p_i] with u ~ U(0,1) from
``numpy.random.default_rng(derive_seed(seed, "fedls_mask", round))`` in sorted module order. Round 1
(no statistics yet) trains every module. If a draw selects nothing, the module with the highest p_i
(first in sorted order on ties) is taken, so a round always trains something. Clients train and upload
only masked-in modules (``trainable`` = ``upload`` = their keys); the downlink is the full adapter.

Server update. theta_new = the average (or the server optimizer's step on it) for trained modules,
theta for left-out ones; then the momentum buffer b (per module; it starts as the first Delta):

- ``all_momentum``     (beta 0.05, mu 0.5; seed code 1): every module: theta <- theta_new + beta * b;
                         b <- mu * b + (1 - mu) * D
- ``left_out_momentum`` (beta 0.1, mu 0.8; seed code 2): left-out modules only: theta <- theta + beta * b;
                         b <- mu * b + (1 - mu) * D; trained modules: theta <- average, b unchanged
- ``no_momentum``      (seed code 3): theta <- average for trained modules, left-out modules unchanged

where D is this round's averaged update: for a left-out module zero (option ``momentum_delta: round``,
the default: the seed code's ``delta_dict = avg - global``, zero for a key nobody trained, so a left-out
module's buffer decays geometrically, b <- mu b), or its last aggregated update (``momentum_delta: last``,
a variant that is not the seed: the buffer never decays and the module drifts linearly while left out).
``beta`` and ``mu`` override the variant's values. Sampling defaults per variant are the seed's:
rho 1, min_prob 0.4, max_prob 0.99, except ``no_momentum``: rho 0.5, max_prob 0.9; ``rho``,
``min_prob``, ``max_prob`` override them.

Every round logs the uplink ratio vs FedIT (bytes of the masked-in keys / bytes of the whole adapter,
per client), the number of modules trained and the mean sampling probability. Server optimizers compose:
they step on the trained modules' average (their state for left-out keys is untouched); the momentum
buffer then acts on top.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from fedpeft.adapters import AdapterState, module_name, state_bytes
from fedpeft.seeding import derive_seed
from fedpeft.strategies.base import AggregateResult, ClientPlan, ClientUpdate
from fedpeft.strategies.common import MethodStrategy
from fedpeft.strategies.registry import MethodOptions, register_method

VARIANTS = {"all_momentum": (0.05, 0.5), "left_out_momentum": (0.1, 0.8), "no_momentum": (0.0, 0.0)}
"""variant -> (beta, mu) of the seed code."""
VARIANT_SAMPLING = {"all_momentum": (1.0, 0.4, 0.99), "left_out_momentum": (1.0, 0.4, 0.99),
                    "no_momentum": (0.5, 0.4, 0.9)}
"""variant -> (rho, min_prob, max_prob) of the seed run that used it."""
MASK_UNITS = ("module", "key")


def module_keys(state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Module name -> its adapter keys (sorted), modules in sorted order."""
    out: dict[str, list[str]] = {}
    for key in sorted(state):
        out.setdefault(module_name(key), []).append(key)
    return dict(sorted(out.items()))


def norm_and_entropy(tensors: Sequence[torch.Tensor]) -> tuple[float, float]:
    """L2 norm of the concatenated tensors and the entropy (nats) of |x| / sum |x| (0 for all zeros)."""
    flat = torch.cat([t.reshape(-1).double() for t in tensors])
    norm = float(flat.norm())
    mag = flat.abs()
    total = float(mag.sum())
    if total <= 0:
        return norm, 0.0
    p = mag / total
    nz = p[p > 0]
    return norm, float(-(nz * nz.log()).sum())


def sampling_probabilities(norms: Sequence[float], entropies: Sequence[float], rho: float, min_prob: float,
                           max_prob: float) -> np.ndarray:
    """p_i = clip(rho * (l_i / max l) * (H_i / max H), min_prob, max_prob)."""
    l = np.asarray(norms, dtype=np.float64)
    h = np.asarray(entropies, dtype=np.float64)
    ln = l / l.max() if l.size and l.max() > 0 else np.zeros_like(l)
    hn = h / h.max() if h.size and h.max() > 0 else np.zeros_like(h)
    return np.clip(rho * ln * hn, min_prob, max_prob)


def sample_mask(probs: np.ndarray, seed: int, round_idx: int) -> np.ndarray:
    """One Bernoulli(p_i) draw per module from the round's derived generator; never all False."""
    rng = np.random.default_rng(derive_seed(seed, "fedls_mask", round_idx))
    mask = rng.random(len(probs)) < probs
    if len(probs) and not mask.any():
        mask[int(np.argmax(probs))] = True
    return mask


class FedLSOptions(MethodOptions):
    variant: Literal["all_momentum", "left_out_momentum", "no_momentum"] = Field(
        "all_momentum", description="Server momentum of the seed code: all_momentum (beta 0.05, mu 0.5), "
        "left_out_momentum (beta 0.1, mu 0.8) or no_momentum.")
    rho: float | None = Field(None, ge=0, description="Score multiplier in p = clip(rho s, min_prob, max_prob); "
                              "null: the variant's (1; no_momentum 0.5).")
    min_prob: float | None = Field(None, ge=0, le=1, description="Lowest sampling probability; null: 0.4.")
    max_prob: float | None = Field(None, ge=0, le=1, description="Highest sampling probability; null: the "
                                   "variant's (0.99; no_momentum 0.9).")
    beta: float | None = Field(None, ge=0, description="Momentum step; null: the variant's.")
    mu: float | None = Field(None, ge=0, le=1, description="Buffer decay; null: the variant's.")
    momentum_delta: Literal["round", "last"] = Field(
        "round", description="Delta of a left-out unit in the buffer update: round (this round's, zero: the seed's, "
        "the buffer decays) or last (its last trained Delta: the buffer never decays).")
    mask_unit: Literal["module", "key"] = Field(
        "module", description="Sampling unit: module (A and B together) or key (the seed's: each state-dict key alone).")

    @model_validator(mode="after")
    def _probability_order(self) -> "FedLSOptions":
        if self.min_prob is not None and self.max_prob is not None and self.min_prob > self.max_prob:
            raise ValueError(f"need min_prob <= max_prob, got {self.min_prob} > {self.max_prob}")
        return self


@register_method
class FedLS(MethodStrategy):
    name = "fedls"
    peft_type_refusal = "it samples LoRA modules (A and B together) and keeps statistics of their updates"
    summary = "layer sampling by update norm x entropy, one mask per round, server momentum for left-out modules"
    Options = FedLSOptions

    def __init__(self, options=None, server_optimizer=None) -> None:
        super().__init__(options, server_optimizer)
        self.variant = str(self.option("variant", "all_momentum"))
        if self.variant not in VARIANTS:
            raise ValueError(f"method.options.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        beta, mu = VARIANTS[self.variant]
        self.beta = float(self.option("beta", beta))
        self.mu = float(self.option("mu", mu))
        rho, min_prob, max_prob = VARIANT_SAMPLING[self.variant]
        self.rho = float(self.option("rho", rho))
        self.min_prob = float(self.option("min_prob", min_prob))
        self.max_prob = float(self.option("max_prob", max_prob))
        self.momentum_delta = str(self.option("momentum_delta", "round"))
        self.mask_unit = str(self.option("mask_unit", "module"))
        if self.mask_unit not in MASK_UNITS:
            raise ValueError(f"method.options.mask_unit must be one of {', '.join(MASK_UNITS)}, got {self.mask_unit!r}")
        self.seed = int(self.option("seed", 0))
        if not 0 <= self.min_prob <= self.max_prob <= 1:
            raise ValueError(f"fedls: need 0 <= min_prob <= max_prob <= 1, got {self.min_prob}, {self.max_prob}")
        if self.rho < 0 or self.beta < 0 or not 0 <= self.mu <= 1:
            raise ValueError(f"fedls: need rho >= 0, beta >= 0, 0 <= mu <= 1 (got {self.rho}, {self.beta}, {self.mu})")
        if self.momentum_delta not in ("last", "round"):
            raise ValueError(f"method.options.momentum_delta must be 'last' or 'round', got {self.momentum_delta!r}")
        # server state
        self.buffer: AdapterState = {}
        self.last_delta: AdapterState = {}
        self.stats: dict[str, tuple[float, float]] = {}  # module -> (l2 norm, entropy) of its last Delta
        # this round
        self.mask: dict[str, bool] = {}
        self.probs: dict[str, float] = {}

    # --- per round ----------------------------------------------------------------------------
    def units(self, state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
        """Sampling unit -> its adapter keys, units in sorted order."""
        if self.mask_unit == "key":
            return {k: [k] for k in sorted(state)}
        return module_keys(state)

    def round_mask(self, round_idx: int, global_state: Mapping[str, torch.Tensor]) -> dict[str, bool]:
        modules = list(self.units(global_state))
        if not self.stats or any(m not in self.stats for m in modules):
            self.probs = {m: 1.0 for m in modules}
            return {m: True for m in modules}
        probs = sampling_probabilities([self.stats[m][0] for m in modules], [self.stats[m][1] for m in modules],
                                       self.rho, self.min_prob, self.max_prob)
        self.probs = dict(zip(modules, probs.tolist()))
        return dict(zip(modules, sample_mask(probs, self.seed, round_idx).tolist()))

    def configure_round(self, round_idx: int, clients: Sequence[int], global_state: AdapterState, store: Any
                        ) -> list[ClientPlan]:
        self.mask = self.round_mask(round_idx, global_state)
        groups = self.units(global_state)
        keys = [k for m, ks in groups.items() if self.mask[m] for k in ks]
        return [ClientPlan(client_id=cid, downlink=global_state, trainable=list(keys), upload=list(keys))
                for cid in clients]

    # --- server -------------------------------------------------------------------------------
    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        groups = self.units(global_state)
        if not self.mask:  # aggregate without configure_round (tests): infer from the uploads
            up = set(updates[0].tensors) if updates else set()
            self.mask = {m: any(k in up for k in ks) for m, ks in groups.items()}
        trained_keys = [k for m, ks in groups.items() if self.mask[m] for k in ks]
        for u in updates:
            if set(u.tensors) != set(trained_keys):
                raise ValueError(f"fedls: client {u.client_id} uploaded keys other than this round's masked-in modules")
        averaged = self.average_updates(global_state, updates)
        delta = {k: averaged[k].float() - global_state[k].float() for k in trained_keys}
        new_global = self.apply_average(global_state, averaged)  # trained: average (or server step); others: theta
        first = not self.buffer
        for m, ks in groups.items():
            if self.mask[m]:
                for k in ks:
                    self.last_delta[k] = delta[k].clone()
                self.stats[m] = norm_and_entropy([delta[k] for k in ks])
        if first:
            self.buffer = {k: d.clone() for k, d in delta.items()}
        elif self.variant != "no_momentum":
            for m, ks in groups.items():
                applies = self.variant == "all_momentum" or not self.mask[m]
                if not applies:
                    continue
                for k in ks:
                    b = self.buffer.get(k)
                    if b is None:  # a module first trained now: its buffer starts as its Delta
                        if k in delta:
                            self.buffer[k] = delta[k].clone()
                        continue
                    if self.mask[m]:
                        d = delta[k]
                    elif self.momentum_delta == "last" and k in self.last_delta:
                        d = self.last_delta[k]
                    else:
                        d = torch.zeros_like(b)
                    new_global[k] = new_global[k].float() + self.beta * b
                    self.buffer[k] = self.mu * b + (1.0 - self.mu) * d
        full = state_bytes(global_state)
        sent = state_bytes({k: global_state[k] for k in trained_keys})
        metrics = {
            "uplink_ratio": sent / full if full else 0.0,
            "uplink_bytes_per_client": sent, "fedit_uplink_bytes_per_client": full,
            "modules_trained": sum(self.mask.values()), "modules_total": len(self.mask),
            "mean_sampling_prob": float(np.mean(list(self.probs.values()))) if self.probs else 1.0,
            "momentum_variant": self.variant,
        }
        self.mask = {}
        return AggregateResult(global_state=new_global, metrics=metrics)

    # --- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            "buffer": {k: v.clone() for k, v in self.buffer.items()},
            "last_delta": {k: v.clone() for k, v in self.last_delta.items()},
            "stats": {m: [float(a), float(b)] for m, (a, b) in self.stats.items()},
        })
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.buffer = {k: torch.as_tensor(v).float().clone() for k, v in state.get("buffer", {}).items()}
        self.last_delta = {k: torch.as_tensor(v).float().clone() for k, v in state.get("last_delta", {}).items()}
        self.stats = {m: (float(v[0]), float(v[1])) for m, v in state.get("stats", {}).items()}
