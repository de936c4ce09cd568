"""Benchmark data for the evaluation suites: a dataset split by built-in name, and seeded stratified
samples of it.

``load_benchmark(name, splits, data_dir)`` reads the first of ``splits`` that the built-in dataset
(``fedpeft.data.builtin``) has: the local copy under ``data_dir`` (else ``$FEDPEFT_DATA_DIR``, else
``../shared/data``), else its hub id when huggingface.co answers (or when ``HF_HUB_OFFLINE`` asks for the
local hub cache). Missing data is a ``BenchmarkDataMissing`` saying where it looked, so a suite can skip
that task and run the others.

``stratified_sample(records, limit, seed, key)`` is how a suite's ``--limit`` picks examples: every
stratum (MMLU subject, Dolly category) present keeps at least one record and the rest of the budget is
shared in proportion to the strata's sizes, each stratum sampled with its own seeded generator, so a
limited run estimates the same quantity as the full one.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

from fedpeft.data.builtin import load_builtin
from fedpeft.data.sources import DataError, Record, hub_offline


class BenchmarkDataMissing(DataError):
    """The data of a benchmark task is neither in the data directory nor loadable from the hub."""


_HUB_REACHABLE: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers (asked once per process), so that an offline machine skips hub-only
    tasks at once instead of after ``datasets``' retries."""
    global _HUB_REACHABLE
    if _HUB_REACHABLE is None:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
    return _HUB_REACHABLE


def load_benchmark(name: str, splits: str | Sequence[str], data_dir: str | Path | None) -> list[Record]:
    """Records of built-in dataset ``name``: the first of ``splits`` that loads (local copy, else hub)."""
    use_hub = hub_offline() or hub_reachable()
    errors = []
    for split in [splits] if isinstance(splits, str) else list(splits):
        try:
            return load_builtin(name, split, data_dir, hub=use_hub)
        except DataError as exc:
            errors.append(str(exc))
    note = "" if use_hub else " (huggingface.co is unreachable)"
    raise BenchmarkDataMissing("; ".join(errors) + note)


def _quotas(sizes: dict[str, int], limit: int) -> dict[str, int]:
    """One record per stratum, and ``limit - len(sizes)`` more shared in proportion to each stratum's
    remaining records (largest remainder). Never more than a stratum holds, since the shares are of
    ``sum(size - 1) >= limit - len(sizes)``."""
    spare = limit - len(sizes)
    rest = {key: size - 1 for key, size in sizes.items()}
    total = sum(rest.values())
    exact = {key: spare * n / total if total else 0.0 for key, n in rest.items()}
    quota = {key: int(value) for key, value in exact.items()}
    leftover = spare - sum(quota.values())
    for key in sorted(exact, key=lambda k: (quota[k] - exact[k], k))[:leftover]:
        quota[key] += 1
    return {key: 1 + quota[key] for key in sizes}


def stratified_sample(records: Sequence[Record], limit: int | None, seed: int = 0,
                      key: Callable[[Record], str] | None = None) -> list[Record]:
    """At most ``limit`` records, covering every stratum ``key(record)`` present, proportionally.

    With ``limit`` below the number of strata, a seeded sample of ``limit`` strata gives one record each
    (all strata cannot be covered). Records keep their original order. ``limit=None``: all records.
    """
    records = list(records)
    if limit is None or limit >= len(records):
        return records
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    key = key or (lambda record: "")
    strata: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        strata.setdefault(str(key(record)), []).append(index)
    names = sorted(strata)
    if limit < len(names):
        quotas = {name: 1 for name in random.Random(f"{seed}/strata").sample(names, limit)}
    else:
        quotas = _quotas({name: len(strata[name]) for name in names}, limit)
    chosen: list[int] = []
    for name, quota in quotas.items():
        chosen += random.Random(f"{seed}/{name}").sample(strata[name], quota)  # a string seed is stable
    return [records[i] for i in sorted(chosen)]
