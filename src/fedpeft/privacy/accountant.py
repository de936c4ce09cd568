"""The privacy accountant: (epsilon, delta) spent so far, from Opacus's RDP accountant.

Each round (client level) or local step (DP-SGD) is one Poisson-subsampled Gaussian mechanism with
noise multiplier ``z`` (noise std / clipping norm) and sampling rate ``q``. The accountant keeps that
history as ``[(z, q, count), ...]`` (JSON: the checkpoint stores it) and hands it to Opacus's
``RDPAccountant`` whenever epsilon is asked for, so a resumed run reports exactly the epsilon of an
uninterrupted one. (dp-accounting's RDP accountant gives the same numbers where its series for fractional
orders converges; it drops the orders where it does not, which makes its epsilon slightly larger at
large sampling rates: ``tests/test_privacy.py`` compares both.)

What the analysis assumes: Poisson sampling with rate q under add/remove-one adjacency. The engine
samples ``clients_per_round`` clients uniformly *without replacement* (a fixed-size sample,
``seeding.sample_clients``), and DP-SGD's batches are fixed-size slices of shuffled epochs; both are
accounted as Poisson sampling with q = expected sample / population, the usual approximation (Flower's
and TensorFlow Federated's DP-FedAvg accounting make it too), not a proof for fixed-size sampling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from opacus.accountants import RDPAccountant

ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
"""RDP orders (Opacus's default alphas)."""


def epsilon_of(history: Sequence[Sequence[float]], delta: float) -> float:
    """epsilon at ``delta`` of the composition of ``history`` = [(z, q, count), ...] (0 when empty)."""
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(float(z), float(q), int(count)) for z, q, count in history]
    return float(accountant.get_epsilon(delta=delta, alphas=list(ORDERS)))


class RdpLedger:
    """The rounds (or steps) spent: ``step(z, q)`` appends, ``epsilon(delta)`` composes them."""

    def __init__(self, history: Sequence[Sequence[float]] | None = None) -> None:
        self.history: list[list[float]] = [list(h) for h in (history or [])]

    def step(self, noise_multiplier: float, sample_rate: float, count: int = 1) -> None:
        if noise_multiplier <= 0 or not 0 < sample_rate <= 1:
            raise ValueError(f"accountant: noise multiplier {noise_multiplier} must be > 0 and sample rate "
                             f"{sample_rate} in (0, 1]")
        last = self.history[-1] if self.history else None
        if last is not None and last[0] == noise_multiplier and last[1] == sample_rate:
            last[2] += count
        else:
            self.history.append([float(noise_multiplier), float(sample_rate), int(count)])

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.history, delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, delta: float, count: int = 1) -> float:
        """epsilon if ``count`` more steps of (z, q) were spent (the budget check before a round)."""
        return epsilon_of(self.history + [[noise_multiplier, sample_rate, count]], delta)

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.history]}

    @classmethod
    def from_state(cls, state: dict | None) -> "RdpLedger":
        return cls((state or {}).get("history"))


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier z (within ``tolerance``, relative) whose ``steps`` steps at rate
    ``sample_rate`` spend at most ``target_epsilon`` at ``delta`` (bisection on z; epsilon falls as z
    grows)."""
    if target_epsilon <= 0:
        raise ValueError(f"privacy.target_epsilon must be > 0, got {target_epsilon}")
    spent = lambda z: epsilon_of([[z, sample_rate, steps]], delta)  # noqa: E731
    low, high = 1e-2, 1.0
    while spent(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"privacy.target_epsilon={target_epsilon} cannot be reached at delta={delta} over "
                             f"{steps} steps at sampling rate {sample_rate}")
    if spent(low) <= target_epsilon:
        return low
    while (high - low) / high > tolerance:
        mid = math.sqrt(low * high) if low > 0 else high / 2
        if spent(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
