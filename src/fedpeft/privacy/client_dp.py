"""Client-level DP-FedAvg through the engine: what the server tells clients, what a client does to its
upload, and what the server does to the round's updates before the method aggregates them.

Per round the server puts ``plan.info["dp"]`` (mode, clip norm C, the client's noise std) on every plan.
On the client (:func:`privatize_upload`, in process and on a Flower node alike) the uploaded tensors
become ``start + clip(trained - start, C) + N(0, client_std^2)`` and the update's weight becomes 1: DP-FedAvg
weighs clients equally (an example-count weight would let one client's data move the mean by more than
C / m). The server (:meth:`ClientLevelDP.server_step`) re-clips every update it can see (a client cannot
exceed C in central mode), adds N(0, (z C)^2) to the sum in central mode (as the same vector /m on each
update, so any mean-aggregating method's mean carries noise z C / m), moves the adaptive clip norm, and
charges the accountant for the round. The state (clip norm, accountant history, local-DP participation
counts) is JSON and goes into the checkpoint (``federation/run_state.py``).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedpeft.privacy.accountant import RdpLedger, calibrate_noise_multiplier, epsilon_of
from fedpeft.privacy.mechanism import (
    adaptive_update_multiplier,
    clip_delta,
    client_noise_std,
    distributed_effective_multiplier,
    gaussian_noise,
    next_clip_norm,
    server_noise_std,
    update_delta,
)
from fedpeft.seeding import derive_seed

UNCLIPPED_METRIC = "dp_unclipped"
"""The client's b_k = 1[||delta_k|| <= C] (adaptive clipping)."""


class PrivacyBudgetExhausted(RuntimeError):
    """The next round would spend more than ``privacy.max_epsilon``."""


# --- client side --------------------------------------------------------------------------------------
def privatize_upload(trained: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], keys: Sequence[str],
                     info: Mapping[str, Any], seed: int | None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``trained`` with the tensors of ``keys`` replaced by start + clipped delta (+ the client's noise).
    ``seed`` None draws the noise seed from the OS. Returns the state and metrics to upload."""
    delta = update_delta(trained, start, keys)
    clipped, norm = clip_delta(delta, float(info["clip"]))
    std = float(info["noise_std"])
    if std > 0:
        noise = gaussian_noise(clipped, std, seed if seed is not None else secrets.randbits(63))
        clipped = {k: clipped[k] + noise[k] for k in clipped}
    out = dict(trained)
    for key in keys:
        out[key] = start[key].float() + clipped[key]
    return out, {UNCLIPPED_METRIC: float(norm <= float(info["clip"]))}


def client_noise_seed(run_seed: int, round_idx: int, client_id: int, job: str, reproducible: bool) -> int | None:
    return derive_seed(run_seed, "dp_client_noise", round_idx, client_id, job) if reproducible else None


# --- server side --------------------------------------------------------------------------------------
class ClientLevelDP:
    """The server's part of client-level DP for one run (``privacy`` a PrivacyConfig)."""

    def __init__(self, privacy: Any, num_clients: int, clients_per_round: int, rounds: int, seed: int) -> None:
        self.cfg = privacy
        self.mode = privacy.mode
        self.delta = privacy.delta
        self.num_clients, self.per_round, self.rounds, self.seed = num_clients, clients_per_round, rounds, seed
        # Local DP: the server knows who was sampled, so no amplification by sampling (q = 1 per participation).
        self.sample_rate = 1.0 if self.mode == "local" else clients_per_round / num_clients
        if privacy.noise_multiplier is not None:
            self.noise_multiplier = float(privacy.noise_multiplier)
            self.calibrated = False
        else:
            self.noise_multiplier = calibrate_noise_multiplier(privacy.target_epsilon, self.delta, self.sample_rate, rounds)
            self.calibrated = True
        adaptive = privacy.adaptive_clipping
        self.count_noise_std = (adaptive.count_noise_std if adaptive.count_noise_std is not None
                                else clients_per_round / 20)
        self.update_multiplier = (adaptive_update_multiplier(self.noise_multiplier, self.count_noise_std)
                                  if adaptive.enabled else self.noise_multiplier)
        self.clip = float(privacy.clip_norm)
        self.ledger = RdpLedger()
        self.participations: dict[str, int] = {}  # local DP: client id -> rounds its noised update was accepted
        if privacy.max_epsilon is not None and self._epsilon_after_round() > privacy.max_epsilon:
            raise ValueError(f"privacy.max_epsilon={privacy.max_epsilon}: a single round already spends epsilon="
                             f"{self._epsilon_after_round():.4g} with noise_multiplier={self.noise_multiplier:.4g}, "
                             f"sample rate {self.sample_rate:.4g}, delta={self.delta}")

    # --- accounting -------------------------------------------------------------------------------
    def epsilon(self) -> float:
        if self.mode == "local":
            worst = max(self.participations.values(), default=0)
            return epsilon_of([[self.noise_multiplier, 1.0, worst]] if worst else [], self.delta)
        return self.ledger.epsilon(self.delta)

    def _epsilon_after_round(self) -> float:
        if self.mode == "local":
            worst = max(self.participations.values(), default=0) + 1
            return epsilon_of([[self.noise_multiplier, 1.0, worst]], self.delta)
        return self.ledger.epsilon_after(self.noise_multiplier, self.sample_rate, self.delta)

    def budget_stop(self, round_idx: int) -> str | None:
        """Why round ``round_idx`` must not run (it would exceed privacy.max_epsilon), or None."""
        budget = self.cfg.max_epsilon
        if budget is None:
            return None
        after = self._epsilon_after_round()
        if after <= budget:
            return None
        return (f"privacy budget: round {round_idx} would bring epsilon from {self.epsilon():.4g} to {after:.4g}, "
                f"above privacy.max_epsilon={budget} (delta={self.delta}); the run ends after round {round_idx - 1}")

    # --- per round --------------------------------------------------------------------------------
    def plan_info(self) -> dict[str, Any]:
        """``plan.info["dp"]``: what a client needs (JSON, crosses the wire with the plan)."""
        return {"mode": self.mode, "clip": self.clip,
                "noise_std": client_noise_std(self.mode, self.update_multiplier, self.clip, self.per_round),
                "reproducible": bool(self.cfg.reproducible_noise)}

    def server_step(self, round_idx: int, global_state: Mapping[str, torch.Tensor], updates: Sequence[Any]
                    ) -> tuple[list[Any], dict[str, Any]]:
        """The round's updates after the server's DP work, and the round's privacy metrics. Each update's
        ``num_examples`` is the number of clients it stands for (1, or m for a SecAgg+ mean)."""
        clip = self.clip
        out = []
        for update in updates:
            if self.mode == "central" and update.num_examples == 1:  # visible: enforce the bound here too
                delta = update_delta(update.tensors, global_state, list(update.tensors))
                clipped, _ = clip_delta(delta, clip)
                update.tensors = {k: global_state[k].float() + clipped[k] for k in update.tensors}
            out.append(update)
        clients = int(sum(u.num_examples for u in out))
        std = server_noise_std(self.mode, self.update_multiplier, clip)
        if std > 0 and out:
            noise = gaussian_noise(out[0].tensors, std, derive_seed(self.seed, "dp_server_noise", round_idx))
            for update in out:  # each mean-aggregated update carries noise/m: the mean carries (sum + noise)/m
                update.tensors = {k: v.float() + noise[k] / clients for k, v in update.tensors.items()}
        metrics: dict[str, Any] = {"mode": self.mode, "clip_norm": clip, "noise_multiplier": self.noise_multiplier,
                                   "sample_rate": self.sample_rate, "delta": self.delta, "clients": clients}
        if self.mode == "distributed":
            effective = distributed_effective_multiplier(self.noise_multiplier, self.per_round, clients)
            metrics["effective_noise_multiplier"] = effective
            self.ledger.step(effective, self.sample_rate)
        elif self.mode == "central":
            self.ledger.step(self.noise_multiplier, self.sample_rate)
        else:
            for update in out:
                cid = str(update.client_id)
                self.participations[cid] = self.participations.get(cid, 0) + 1
        if self.cfg.adaptive_clipping.enabled and out:
            bits = sum(float(u.metrics.get(UNCLIPPED_METRIC, 0.0)) for u in out)
            rng = np.random.default_rng(derive_seed(self.seed, "dp_count_noise", round_idx))
            fraction = (bits + float(rng.normal(0.0, self.count_noise_std))) / clients
            self.clip = next_clip_norm(clip, fraction, self.cfg.adaptive_clipping.target_quantile,
                                       self.cfg.adaptive_clipping.lr)
            metrics.update(unclipped_fraction_noisy=fraction, next_clip_norm=self.clip)
        metrics["epsilon"] = self.epsilon()
        return out, metrics

    # --- checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"clip": self.clip, "ledger": self.ledger.state_dict(), "participations": dict(self.participations),
                "noise_multiplier": self.noise_multiplier}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if not math.isclose(float(state["noise_multiplier"]), self.noise_multiplier, rel_tol=1e-12):
            raise ValueError(f"checkpoint: the run's noise multiplier was {state['noise_multiplier']}, the config now "
                             f"gives {self.noise_multiplier}; resume with the privacy section the run started with")
        self.clip = float(state["clip"])
        self.ledger = RdpLedger.from_state(state["ledger"])
        self.participations = {str(k): int(v) for k, v in state.get("participations", {}).items()}
