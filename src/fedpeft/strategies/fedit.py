"""FedIT (Zhang et al. 2023): A <- sum p_k A_k and B <- sum p_k B_k, separately. Not exact.

Any ``peft.type``: every trained tensor is averaged the same way (FedAvg): DoRA's magnitudes, IA3's
scaling vectors, LoHa/LoKr factors, AdaLoRA's A, E, B, the virtual tokens of prompt/P-/prefix tuning.

Uplink and downlink: the full adapter. A server optimizer (FedAvgM, FedAdam, ...) steps on the average.
Each round reports ``aggregation_gap_rel``: how far the averaged factors' product is from the exact
average of the clients' products (see ``common.aggregation_gap``).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedpeft.adapters import AdapterState
from fedpeft.strategies.base import ALL_PEFT_TYPES, AggregateResult, ClientUpdate, example_weights
from fedpeft.strategies.common import MethodStrategy, aggregation_gap
from fedpeft.strategies.registry import register_method


@register_method
class FedIT(MethodStrategy):
    name = "fedit"
    summary = "FedAvg on the LoRA factors: A and B averaged separately (not exact)"
    secure_mean = True
    peft_types = ALL_PEFT_TYPES  # a weighted mean of whatever tensors the adapter type trains

    def aggregate(self, round_idx: int, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregateResult:
        weights = example_weights(updates)
        averaged = self.average_updates(global_state, updates, weights)
        metrics = aggregation_gap(updates, weights, averaged)
        return AggregateResult(global_state=self.apply_average(global_state, averaged), metrics=metrics)
