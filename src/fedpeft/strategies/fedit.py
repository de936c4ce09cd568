"""FedIT (Zhang et al. 2023): A <- sum p_k A_k and B <- sum p_k B_k, separately. Not exact."""

from __future__ import annotations

from collections.abc import Sequence

from fedpeft.adapters import AdapterState
from fedpeft.strategies.base import AggregateResult, ClientUpdate, Strategy, example_weights, weighted_average


class FedIT(Strategy):
    name = "fedit"

    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        averaged = weighted_average([u.tensors for u in updates], example_weights(updates))
        new_values = self.server_optimizer.step(global_state, averaged) if self.server_optimizer else averaged
        new_global = {k: v.clone() for k, v in global_state.items()}
        new_global.update(new_values)
        return AggregateResult(global_state=new_global)
