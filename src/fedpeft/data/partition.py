"""Partitions of a dataset over clients, deterministic from a seed.

Every function takes the per-record labels (task, category or class) and returns one list of record
indices per client. Sizes always sum to the dataset size; a client may end with no records.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check(num_clients: int, num_records: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_records < 1:
        raise ValueError("cannot partition an empty dataset (0 records)")


def iid(labels: Sequence[object], num_clients: int, seed: int) -> list[list[int]]:
    """Shuffle, then cut into num_clients shards whose sizes differ by at most one."""
    _check(num_clients, len(labels))
    if num_clients > len(labels):
        raise ValueError(f"more clients ({num_clients}) than records ({len(labels)}) for an IID split")
    order = np.random.default_rng(seed).permutation(len(labels))
    return [sorted(int(i) for i in shard) for shard in np.array_split(order, num_clients)]


def dirichlet_proportions(num_clients: int, alpha: float, seed: int, min_frac: float = 0.0) -> np.ndarray:
    """p ~ Dir(alpha * 1); entries below min_frac set to 0 and the rest renormalised."""
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    p = np.random.default_rng(seed).dirichlet(np.full(num_clients, alpha))
    if min_frac > 0:
        p = np.where(p < min_frac, 0.0, p)
        if p.sum() == 0:  # every entry under the floor: keep the largest one
            p[np.argmax(p)] = 1.0
        p = p / p.sum()
    return p


def split_counts(total: int, proportions: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total``: floor of total*p, remainder to the largest fractional parts."""
    raw = proportions * total
    counts = np.floor(raw).astype(int)
    remainder = total - counts.sum()
    if remainder > 0:
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:remainder]] += 1
    return counts


def label_dirichlet(labels: Sequence[object], num_clients: int, alpha: float, seed: int,
                    min_frac: float = 0.0) -> list[list[int]]:
    """Per label value (in sorted order, index i): p ~ Dir(alpha) with seed ``seed + i``, records of
    that label shuffled and split in those proportions (FL-TAC's per-task Dirichlet)."""
    _check(num_clients, len(labels))
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    values = sorted({str(v) for v in labels})
    for i, value in enumerate(values):
        idx = np.array([j for j, v in enumerate(labels) if str(v) == value])
        p = dirichlet_proportions(num_clients, alpha, seed + i, min_frac)
        idx = np.random.default_rng(seed + i).permutation(idx)
        bounds = np.cumsum(split_counts(len(idx), p))[:-1]
        for c, part in enumerate(np.split(idx, bounds)):
            clients[c].extend(int(j) for j in part)
    return [sorted(c) for c in clients]


def partition(labels: Sequence[object], num_clients: int, kind: str, seed: int, alpha: float = 0.5,
              min_frac: float = 0.0, classes_per_client: int = 2) -> list[list[int]]:
    """Dispatch on ``kind`` (the ``data.partition.kind`` config value)."""
    if kind == "iid":
        return iid(labels, num_clients, seed)
    if kind in ("dirichlet", "task_dirichlet"):
        return label_dirichlet(labels, num_clients, alpha, seed, min_frac)
    raise ValueError(f"data.partition.kind '{kind}' is not implemented; valid: iid, dirichlet, task_dirichlet")
