"""Deterministic randomness: every random choice of a round derives from (seed, round, client, ...),
so a resumed run draws exactly what the uninterrupted run drew, whatever happened in between."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_clients(seed: int, round_idx: int, num_clients: int, per_round: int,
                   eligible: Sequence[int] | None = None) -> list[int]:
    """``per_round`` distinct clients drawn uniformly without replacement, sorted."""
    pool = np.arange(num_clients) if eligible is None else np.asarray(sorted(eligible))
    if per_round > len(pool):
        raise ValueError(f"cannot sample {per_round} clients from {len(pool)} eligible")
    rng = np.random.default_rng(derive_seed(seed, "sample", round_idx))
    return sorted(int(c) for c in rng.choice(pool, size=per_round, replace=False))


def index_stream(indices: Sequence[int], seed: int) -> Iterator[int]:
    """Endless stream over ``indices``: a fresh permutation each pass (epochs without replacement)."""
    rng = np.random.default_rng(seed)
    pool = np.asarray(indices)
    if len(pool) == 0:
        raise ValueError("index_stream over an empty set")
    while True:
        yield from (int(i) for i in rng.permutation(pool))
