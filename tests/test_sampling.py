"""derive_seed and client sampling: stable across processes, distinct per part, uniform draws."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from fedpeft import seeding
from fedpeft.seeding import derive_seed, sample_clients


def test_derive_seed_is_sha256_of_the_joined_parts_in_63_bits():
    """The stated formula, computed here with hashlib: the first 8 digest bytes, little endian, top bit off."""
    digest = hashlib.sha256(b"7/sample/3").digest()
    assert derive_seed(7, "sample", 3) == int.from_bytes(digest[:8], "little") & (2**63 - 1)
    seeds = [derive_seed(0, "x", i) for i in range(2000)]
    assert all(0 <= s < 2**63 for s in seeds)
    assert max(seeds) > 2**62  # the 63 bits are used, not a narrow range


def test_derive_seed_is_the_same_in_another_process_whatever_its_hash_seed():
    """Unlike hash(), which Python salts per process (PYTHONHASHSEED)."""
    code = "from fedpeft.seeding import derive_seed; print(derive_seed(11, 'fedls_mask', 4, 'layers.0'))"
    src = str(Path(seeding.__file__).parents[1])
    outs = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=src)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip())
    assert outs == {str(derive_seed(11, "fedls_mask", 4, "layers.0"))}


def test_derive_seed_separates_parts_order_and_tags():
    seeds = {derive_seed(seed, tag, r, c) for seed in range(3) for tag in ("sample", "batches", "noise")
             for r in range(20) for c in range(20)}
    assert len(seeds) == 3 * 3 * 20 * 20  # no collision among 3600 derived seeds
    assert derive_seed(1, "a") != derive_seed("a", 1)
    assert derive_seed(1, 2) != derive_seed(2, 1)


def test_sample_clients_draws_distinct_sorted_clients_uniformly():
    draws = [sample_clients(5, r, 10, 3) for r in range(1, 3001)]
    assert all(len(set(d)) == 3 and d == sorted(d) for d in draws)
    counts = Counter(c for d in draws for c in d)
    # each of 10 clients expected 900 times (3000 x 3/10); binomial sd = sqrt(9000 * 0.1 * 0.9) ~ 28.5
    assert set(counts) == set(range(10)) and all(abs(n - 900) < 5 * 28.5 for n in counts.values())
    assert sample_clients(5, 1, 10, 3) == draws[0]  # a round's draw depends on (seed, round) only
    assert sample_clients(6, 1, 10, 3) != draws[0] or sample_clients(6, 2, 10, 3) != draws[1]
