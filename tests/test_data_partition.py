"""Partitions: sizes sum to the dataset, determinism, limits, bad input, and the seed-001 GLUE table."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft.data.partition import (
    PartitionError,
    count_table,
    cumulative_counts,
    dirichlet_counts,
    dirichlet_proportions,
    empty_clients,
    format_table,
    label_dirichlet,
    partition,
    save_table_csv,
    split_counts,
)

KINDS = ["iid", "dirichlet", "task_dirichlet", "pathological", "quantity_skew"]


def _labels(sizes: dict[str, int]) -> list[str]:
    return [name for name, n in sizes.items() for _ in range(n)]


SMALL = _labels({"a": 120, "b": 45, "c": 300, "d": 7})


def _assert_exact_cover(parts: list[list[int]], n: int) -> None:
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(n)), "every record in exactly one client"


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_covers_each_record_once_and_is_deterministic(kind):
    parts = partition(SMALL, 6, kind, seed=3, alpha=0.5, min_frac=0.01, classes_per_client=2)
    assert len(parts) == 6
    _assert_exact_cover(parts, len(SMALL))
    assert parts == partition(SMALL, 6, kind, seed=3, alpha=0.5, min_frac=0.01, classes_per_client=2)
    if kind != "iid":  # iid with a different seed still differs, but sizes are equal; check the indices
        other = partition(SMALL, 6, kind, seed=4, alpha=0.5, min_frac=0.01, classes_per_client=2)
        assert other != parts
    assert all(part == sorted(part) for part in parts)


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in partition(SMALL, 5, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(SMALL)


def test_dirichlet_large_alpha_approaches_iid():
    labels = _labels({"a": 2000, "b": 2000, "c": 2000})
    _, table = count_table(labels, partition(labels, 5, "dirichlet", seed=1, alpha=1e5))
    np.testing.assert_allclose(table / table.sum(axis=0), 0.2, atol=0.02)
    _, skewed = count_table(labels, partition(labels, 5, "dirichlet", seed=1, alpha=0.05))
    assert (skewed / skewed.sum(axis=0)).max() > 0.5


def test_min_frac_zeroes_small_shares_and_zero_clients_are_reported():
    p = dirichlet_proportions(10, 0.1, seed=0, min_frac=0.05)
    assert np.isclose(p.sum(), 1) and ((p == 0) | (p >= 0.05)).all() and (p == 0).any()
    labels = _labels({"only": 50})
    parts = label_dirichlet(labels, 10, alpha=0.1, seed=0, min_frac=0.05)
    empty = empty_clients(parts)
    assert empty and all(len(parts[c]) == 0 for c in empty)
    _assert_exact_cover(parts, 50)


def test_all_shares_below_min_frac_fall_back_to_uniform():
    assert np.allclose(dirichlet_proportions(4, 0.5, seed=0, min_frac=0.9), 0.25)


def test_count_helpers_sum_to_total():
    p = np.array([0.333, 0.0, 0.5, 0.167])
    for fn in (cumulative_counts, split_counts):
        counts = fn(1001, p)
        assert counts.sum() == 1001 and counts[1] == 0


def test_pathological_gives_each_client_k_values():
    labels = _labels({str(i): 30 for i in range(10)})
    parts = partition(labels, 5, "pathological", seed=0, classes_per_client=2)
    values, table = count_table(labels, parts)
    assert ((table > 0).sum(axis=1) == 2).all()
    assert (table.sum(axis=0) == 30).all()


def test_natural_one_value_per_client_in_first_appearance_order():
    labels = ["f2", "f2", "f0", "f1", "f0"]
    assert partition(labels, 3, "natural", seed=0) == [[0, 1], [2, 4], [3]]
    with pytest.raises(PartitionError, match="3"):
        partition(labels, 4, "natural", seed=0)


def test_quantity_skew_sizes_vary_labels_do_not_matter():
    labels = ["x"] * 1000
    sizes = sorted(len(p) for p in partition(labels, 5, "quantity_skew", seed=0, alpha=0.3))
    assert sum(sizes) == 1000 and sizes[-1] > 2 * sizes[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(labels=SMALL, num_clients=4, kind="dirichlet", alpha=0.0), "alpha"),
        (dict(labels=SMALL, num_clients=4, kind="quantity_skew", alpha=-1.0), "alpha"),
        (dict(labels=["a", "b"], num_clients=3, kind="iid"), "more clients"),
        (dict(labels=[], num_clients=3, kind="dirichlet"), "empty"),
        (dict(labels=SMALL, num_clients=4, kind="shards"), "shards"),
        (dict(labels=SMALL, num_clients=1, kind="pathological", classes_per_client=2), "cover only"),
        (dict(labels=SMALL, num_clients=4, kind="pathological", classes_per_client=9), "classes_per_client"),
        (dict(labels=SMALL, num_clients=4, kind="dirichlet", label_order=["a", "b", "c"]), "'d'"),
    ],
)
def test_bad_input_names_the_value(kwargs, message):
    with pytest.raises(PartitionError, match=message):
        partition(seed=0, **kwargs)


def test_table_text_and_csv(tmp_path):
    parts = partition(SMALL, 3, "iid", seed=0)
    values, table = count_table(SMALL, parts)
    assert values == ["a", "b", "c", "d"]
    text = format_table(values, table)
    assert text.splitlines()[-1].split()[-1] == str(len(SMALL))
    path = save_table_csv(tmp_path / "t.csv", values, table)
    rows = path.read_text().splitlines()
    assert rows[0] == "client,a,b,c,d,total" and rows[-1].startswith("total,120,45,300,7,")


# Seed 001 (FL-TAC README, scripts/inspect_partition.py --scenario glue): the published table.
GLUE_SIZES = {"sst2": 67349, "mrpc": 3668, "qqp": 363846, "qnli": 104743, "rte": 2490}
SEED_001_GLUE_TABLE = [  # client rows; columns sst2 mrpc qqp qnli rte
    [9765, 0, 0, 4435, 1029],
    [15540, 263, 12764, 10121, 43],
    [0, 536, 0, 11902, 245],
    [9174, 131, 8855, 2208, 151],
    [0, 2164, 31032, 5540, 518],
    [1669, 58, 13121, 8412, 379],
    [5443, 71, 165334, 43650, 0],
    [3777, 175, 0, 12879, 88],
    [12940, 270, 132740, 5596, 36],
    [9041, 0, 0, 0, 1],
]


def test_reproduces_seed_001_glue_partition_counts():
    counts = dirichlet_counts(list(GLUE_SIZES.values()), 10, alpha=0.5, seed=42, min_frac=0.01)
    assert counts.T.tolist() == SEED_001_GLUE_TABLE


def test_reproduces_seed_001_glue_partition_on_records():
    labels = _labels(GLUE_SIZES)
    parts = partition(labels, 10, "task_dirichlet", seed=42, alpha=0.5, min_frac=0.01)
    values, table = count_table(labels, parts)
    assert values == list(GLUE_SIZES)
    assert table.tolist() == SEED_001_GLUE_TABLE
    assert table.sum() == 542096
