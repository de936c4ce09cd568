"""The privacy section of a run, as the engine sees it: one object built before the model loads.

:class:`RunPrivacy` holds the client-level part (``client_dp.ClientLevelDP``: plan annotations, the
server's clip / noise / accountant step, the budget) and the record-level part (``dp_sgd``: per-client
DP-SGD accounting), logs one ``privacy`` event per round and keeps its state for the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedpeft.data.partition import partition
from fedpeft.privacy.client_dp import ClientLevelDP
from fedpeft.privacy.dp_sgd import RecordLevelAccounting, check_opacus_modules


def records_per_client(config: Any, labels: Sequence[str]) -> list[int]:
    """Training records of each client under the configured partition (the split ``prepare_client_data``
    makes; before encoding drops any, so an upper bound)."""
    pcfg = config.data.partition
    indices = partition(labels, config.federation.num_clients, pcfg.kind, config.seed, alpha=pcfg.alpha,
                        min_frac=pcfg.min_frac, classes_per_client=pcfg.classes_per_client)
    return [len(idx) for idx in indices]


class RunPrivacy:
    def __init__(self, config: Any, labels: Sequence[str]) -> None:
        p, fed = config.privacy, config.federation
        self.client = (ClientLevelDP(p, fed.num_clients, fed.clients_per_round, fed.rounds, config.seed)
                       if p.client_level else None)
        self.record = None
        if p.dp_sgd.enabled:
            largest = max(records_per_client(config, labels))
            if p.dp_sgd.delta >= 1 / largest:
                raise ValueError(f"privacy.dp_sgd.delta={p.dp_sgd.delta} must be below 1 / (records of the largest "
                                 f"client) = 1/{largest} = {1 / largest:.3g}: record-level DP with delta >= 1/n allows "
                                 "releasing one record outright")
            self.record = RecordLevelAccounting(p.dp_sgd.noise_multiplier, p.dp_sgd.delta,
                                                fed.batch_size * fed.grad_accumulation)

    @classmethod
    def build(cls, config: Any, labels: Sequence[str]) -> "RunPrivacy | None":
        return cls(config, labels) if config.privacy.enabled else None

    def check_model(self, model) -> None:
        if self.record is not None:
            check_opacus_modules(model)

    def annotate(self, plans: Sequence[Any]) -> None:
        """Client-level DP: the round's clip norm and each client's noise share travel with its plan."""
        if self.client is not None:
            for plan in plans:
                plan.info = {**plan.info, "dp": self.client.plan_info()}

    def budget_stop(self, round_idx: int) -> str | None:
        return self.client.budget_stop(round_idx) if self.client is not None else None

    def server_step(self, round_idx: int, global_state: Mapping[str, Any], updates: list[Any],
                    trained: Sequence[tuple[int, int, int]]) -> tuple[list[Any], dict[str, Any]]:
        """``trained``: (client, local steps, records) of each accepted DP-SGD job."""
        metrics: dict[str, Any] = {}
        if self.client is not None and updates:
            updates, metrics = self.client.server_step(round_idx, global_state, updates)
        if self.record is not None:
            for client_id, steps, records in trained:
                self.record.charge(client_id, steps, records)
            metrics.update(self.record.summary())
        return updates, metrics

    def epsilon(self) -> float | None:
        """The headline epsilon: client-level when on, else the largest client's DP-SGD epsilon."""
        if self.client is not None:
            return self.client.epsilon()
        return self.record.summary()["dp_sgd_epsilon_max"] if self.record is not None else None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.client is not None:
            out.update(mode=self.client.mode, epsilon=self.client.epsilon(), delta=self.client.delta,
                       noise_multiplier=self.client.noise_multiplier)
        else:
            out.update(mode="none")
        if self.record is not None:
            out.update(self.record.summary())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"client_level": self.client.state_dict() if self.client is not None else {},
                "dp_sgd": self.record.state_dict() if self.record is not None else {}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.client is not None:
            self.client.load_state_dict(state.get("client_level", {}))
        if self.record is not None:
            self.record.load_state_dict(state.get("dp_sgd", {}))
