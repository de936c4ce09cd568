"""Checks that need the data but no model, run before the model loads (a bad partition fails in a
second, not after a minute of loading)."""

from __future__ import annotations

from collections.abc import Sequence

from fedpeft.config import ExperimentConfig
from fedpeft.data.partition import partition


def partition_preflight(config: ExperimentConfig, labels: Sequence[object]) -> None:
    """Raise PartitionError (a ValueError naming the setting) when the configured partition cannot be
    made; the same call as ``prepare_client_data``, so it fails there iff it fails here."""
    pcfg = config.data.partition
    partition(labels, config.federation.num_clients, pcfg.kind, config.seed, alpha=pcfg.alpha,
              min_frac=pcfg.min_frac, classes_per_client=pcfg.classes_per_client)
