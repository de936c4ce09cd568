"""Partitions of a dataset over clients, deterministic from a seed.

Every function takes the per-record labels (a task name, a category, a class, or the file a record came
from) and returns one list of record indices per client, each sorted. The lists are disjoint and together
cover every record exactly once; a client may end with no records (see :func:`empty_clients`).

Label values are visited in **order of first appearance** in ``labels`` (value ``i`` is the i-th distinct
value met). For a multi-task dataset built task after task, that is the order of the task list, which is
what FL-TAC's per-task seed ``seed + task_index`` refers to.

Kinds (``data.partition.kind``):

- ``iid``: shuffle, cut into shards whose sizes differ by at most one.
- ``dirichlet`` / ``task_dirichlet``: per label value ``i``, p ~ Dir(alpha * 1) drawn from
  ``numpy.random.default_rng(seed + i)``, entries below ``min_frac`` zeroed and the rest renormalised,
  that label's records permuted by the same generator and cut at ``floor(cumsum(p) * n)`` (Hsu et al.
  2019; FL-TAC's procedure, which this reproduces count for count).
- ``pathological``: every client holds exactly ``classes_per_client`` label values; each value's records
  are split evenly over the clients that hold it (McMahan et al.'s k-classes-per-client split).
- ``natural``: one label value per client (e.g. one file or one user per client).
- ``quantity_skew``: client sizes ~ Dir(alpha) (with ``min_frac``), records assigned IID.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

KINDS = ("iid", "dirichlet", "task_dirichlet", "pathological", "natural", "quantity_skew")


class PartitionError(ValueError):
    """A partition that cannot be made; the message names the parameter and the value."""


# --------------------------------------------------------------------------------------------- helpers
def _check(num_clients: int, num_records: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise PartitionError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if num_records < 1:
        raise PartitionError("cannot partition an empty dataset (0 records)")
    if num_clients > num_records:
        raise PartitionError(
            f"more clients ({num_clients}) than records ({num_records}): every client needs at least a chance of one record"
        )


def _check_alpha(alpha: float) -> None:
    if not np.isfinite(alpha) or alpha <= 0:
        raise PartitionError(f"Dirichlet alpha must be > 0 and finite, got {alpha!r}")


def label_values(labels: Iterable[object]) -> list[object]:
    """Distinct label values in order of first appearance."""
    return list(dict.fromkeys(labels))


def _groups(labels: Sequence[object], label_order: Sequence[object] | None = None) -> tuple[list[object], list[np.ndarray]]:
    """(values, record indices of each value); values in ``label_order`` or first-appearance order."""
    index: dict[object, list[int]] = {}
    for j, v in enumerate(labels):
        index.setdefault(v, []).append(j)
    if label_order is None:
        values = list(index)
    else:
        values = list(label_order)
        allowed = set(values)
        unknown = [v for v in index if v not in allowed]
        if unknown:
            raise PartitionError(
                f"label value {unknown[0]!r} (record {index[unknown[0]][0]}) is not in the label set {values!r}"
            )
    return values, [np.asarray(index.get(v, []), dtype=np.int64) for v in values]


def check_label_set(labels: Sequence[object], allowed: Iterable[object], field: str = "label") -> None:
    """Raise naming the first record whose label is not in ``allowed``."""
    allowed_set = set(allowed)
    for j, v in enumerate(labels):
        if v not in allowed_set:
            raise PartitionError(f"record {j}: {field} {v!r} is not in the label set {sorted(map(str, allowed_set))}")


def _finish(clients: list[list[int]] | list[np.ndarray]) -> list[list[int]]:
    return [sorted(int(i) for i in c) for c in clients]


# ------------------------------------------------------------------------------------ building blocks
def dirichlet_proportions(num_clients: int, alpha: float, seed: int | np.random.Generator,
                          min_frac: float = 0.0) -> np.ndarray:
    """p ~ Dir(alpha * 1); entries below ``min_frac`` set to 0 and the rest renormalised.

    If every entry falls below ``min_frac`` (only possible when ``min_frac > 1 / num_clients``) the
    proportions become uniform, as in FL-TAC. ``seed`` may be a Generator to continue its stream.
    """
    _check_alpha(alpha)
    if not 0 <= min_frac < 1:
        raise PartitionError(f"min_frac must be in [0, 1), got {min_frac!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    p = rng.dirichlet(np.full(num_clients, float(alpha)))
    if min_frac > 0:
        p = np.where(p < min_frac, 0.0, p)
        if p.sum() == 0:
            p = np.full(num_clients, 1.0)
        p = p / p.sum()
    return p


def cumulative_counts(total: int, proportions: np.ndarray) -> np.ndarray:
    """Counts from cut points ``floor(cumsum(p) * total)`` (the last cut is ``total``): the rounding
    used by FL-TAC and most Dirichlet partitioners. A zero proportion always gives a zero count."""
    cuts = (np.cumsum(proportions) * total).astype(np.int64)[:-1]
    cuts = np.clip(cuts, 0, total)
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def split_counts(total: int, proportions: np.ndarray) -> np.ndarray:
    """Counts summing to ``total``: floor of total*p, remainder to the largest fractional parts
    (largest-remainder rounding; used for quantity skew)."""
    raw = np.asarray(proportions, dtype=float) * total
    counts = np.floor(raw).astype(np.int64)
    remainder = int(total - counts.sum())
    if remainder > 0:
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:remainder]] += 1
    return counts


# ------------------------------------------------------------------------------------------ partitions
def iid(labels: Sequence[object], num_clients: int, seed: int) -> list[list[int]]:
    """Shuffle, then cut into ``num_clients`` shards whose sizes differ by at most one."""
    _check(num_clients, len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    return _finish(np.array_split(order, num_clients))


def dirichlet_counts(sizes: Sequence[int], num_clients: int, alpha: float, seed: int,
                     min_frac: float = 0.0) -> np.ndarray:
    """Counts only (label values × clients) of :func:`label_dirichlet` for labels of these sizes, in
    order; needs no records, so tables for large datasets come instantly."""
    _check_alpha(alpha)
    table = np.zeros((len(sizes), num_clients), dtype=np.int64)
    for i, n in enumerate(sizes):
        p = dirichlet_proportions(num_clients, alpha, np.random.default_rng(seed + i), min_frac)
        table[i] = cumulative_counts(int(n), p)
    return table


def label_dirichlet(labels: Sequence[object], num_clients: int, alpha: float, seed: int,
                    min_frac: float = 0.0, label_order: Sequence[object] | None = None) -> list[list[int]]:
    """Per label value ``i`` (first-appearance order, or ``label_order``): a generator seeded
    ``seed + i`` draws p ~ Dir(alpha) (``min_frac`` floor applied), then permutes that value's records,
    which are cut at ``floor(cumsum(p) * n)``. This is FL-TAC's per-task Dirichlet, step for step."""
    _check(num_clients, len(labels))
    _check_alpha(alpha)
    values, groups = _groups(labels, label_order)
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    for i, idx in enumerate(groups):
        rng = np.random.default_rng(seed + i)
        p = dirichlet_proportions(num_clients, alpha, rng, min_frac)
        shuffled = idx[rng.permutation(len(idx))]
        counts = cumulative_counts(len(idx), p)
        for c, part in enumerate(np.split(shuffled, np.cumsum(counts)[:-1])):
            clients[c].extend(part.tolist())
    return _finish(clients)


def pathological(labels: Sequence[object], num_clients: int, classes_per_client: int, seed: int,
                 label_order: Sequence[object] | None = None) -> list[list[int]]:
    """Every client holds exactly ``classes_per_client`` distinct label values.

    The label values are shuffled (seeded), then client ``c`` takes values ``(c*k + j) mod L`` for
    ``j < k``; every value is held by at least one client when ``num_clients * k >= L``. Each value's
    records are shuffled and split as evenly as possible over the clients that hold it.
    """
    _check(num_clients, len(labels))
    values, groups = _groups(labels, label_order)
    num_values = len(values)
    k = classes_per_client
    if k < 1 or k > num_values:
        raise PartitionError(
            f"classes_per_client must be between 1 and the number of label values ({num_values}), got {k}"
        )
    if num_clients * k < num_values:
        raise PartitionError(
            f"pathological partition: {num_clients} clients x {k} classes_per_client cover only "
            f"{num_clients * k} of the {num_values} label values; raise classes_per_client or num_clients"
        )
    rng = np.random.default_rng(seed)
    value_order = rng.permutation(num_values)
    holders: list[list[int]] = [[] for _ in range(num_values)]
    for c in range(num_clients):
        for j in range(k):
            holders[int(value_order[(c * k + j) % num_values])].append(c)
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    for v, idx in enumerate(groups):
        shuffled = idx[rng.permutation(len(idx))]
        for holder, part in zip(holders[v], np.array_split(shuffled, len(holders[v]))):
            clients[holder].extend(part.tolist())
    return _finish(clients)


def natural(labels: Sequence[object], num_clients: int, label_order: Sequence[object] | None = None) -> list[list[int]]:
    """One label value per client: client ``i`` gets every record of the i-th value (e.g. the i-th
    file of a directory of per-client files, or the i-th category)."""
    if not labels:
        raise PartitionError("cannot partition an empty dataset (0 records)")
    values, groups = _groups(labels, label_order)
    if num_clients != len(values):
        shown = ", ".join(map(repr, values[:8])) + (", ..." if len(values) > 8 else "")
        raise PartitionError(
            f"natural partition needs num_clients equal to the number of distinct values "
            f"({len(values)}: {shown}), got num_clients={num_clients}"
        )
    return _finish(groups)


def quantity_skew(labels: Sequence[object], num_clients: int, alpha: float, seed: int,
                  min_frac: float = 0.0) -> list[list[int]]:
    """Client sizes ~ Dir(alpha) (``min_frac`` floor applied, largest-remainder rounding); which records
    a client gets is IID (a seeded permutation cut in those sizes). Labels matter only for their count."""
    _check(num_clients, len(labels))
    rng = np.random.default_rng(seed)
    p = dirichlet_proportions(num_clients, alpha, rng, min_frac)
    counts = split_counts(len(labels), p)
    order = rng.permutation(len(labels))
    return _finish(np.split(order, np.cumsum(counts)[:-1]))


def partition(labels: Sequence[object], num_clients: int, kind: str, seed: int, alpha: float = 0.5,
              min_frac: float = 0.0, classes_per_client: int = 2,
              label_order: Sequence[object] | None = None) -> list[list[int]]:
    """Dispatch on ``kind`` (the ``data.partition.kind`` config value). ``label_order``, when given,
    fixes the order of label values (and so the per-value seeds) and is the allowed label set."""
    labels = list(labels)
    if label_order is not None:
        check_label_set(labels, label_order)
    if kind == "iid":
        return iid(labels, num_clients, seed)
    if kind in ("dirichlet", "task_dirichlet"):
        return label_dirichlet(labels, num_clients, alpha, seed, min_frac, label_order)
    if kind == "pathological":
        return pathological(labels, num_clients, classes_per_client, seed, label_order)
    if kind == "natural":
        return natural(labels, num_clients, label_order)
    if kind == "quantity_skew":
        return quantity_skew(labels, num_clients, alpha, seed, min_frac)
    raise PartitionError(f"data.partition.kind {kind!r} is not known; valid: {', '.join(KINDS)}")


# ----------------------------------------------------------------------------------------- inspection
def count_table(labels: Sequence[object], parts: Sequence[Sequence[int]],
                label_order: Sequence[object] | None = None) -> tuple[list[object], np.ndarray]:
    """(label values, counts[client, value]) of a partition."""
    values = list(label_order) if label_order is not None else label_values(labels)
    column = {v: i for i, v in enumerate(values)}
    table = np.zeros((len(parts), len(values)), dtype=np.int64)
    for c, part in enumerate(parts):
        for j in part:
            table[c, column[labels[j]]] += 1
    return values, table


def empty_clients(parts: Sequence[Sequence[int]]) -> list[int]:
    """Indices of clients that received no record (reported, never an error)."""
    return [c for c, part in enumerate(parts) if len(part) == 0]


def format_table(values: Sequence[object], table: np.ndarray) -> str:
    """Plain-text client × value table with row and column totals (FL-TAC's inspect layout)."""
    names = [str(v) for v in values]
    width = max([8] + [len(n) + 1 for n in names])
    head = "client".ljust(8) + "".join(n.rjust(width) for n in names) + "    total"
    lines = [head, "-" * len(head)]
    for c, row in enumerate(table):
        lines.append(f"#{c:<7}" + "".join(str(int(v)).rjust(width) for v in row) + f"  {int(row.sum()):>7}")
    lines.append("-" * len(head))
    totals = table.sum(axis=0)
    lines.append("total".ljust(8) + "".join(str(int(v)).rjust(width) for v in totals) + f"  {int(totals.sum()):>7}")
    return "\n".join(lines)


def save_table_csv(path: str | Path, values: Sequence[object], table: np.ndarray) -> Path:
    """CSV with header ``client,<values...>,total``, one row per client, then a ``total`` row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["client", *map(str, values), "total"])
        for c, row in enumerate(table):
            writer.writerow([c, *(int(v) for v in row), int(row.sum())])
        totals = table.sum(axis=0)
        writer.writerow(["total", *(int(v) for v in totals), int(totals.sum())])
    return path
