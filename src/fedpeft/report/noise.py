"""Is a before/after change bigger than sampling noise?

An accuracy (or exact match) measured on n records is a binomial proportion: its standard error is
sqrt(p (1 - p) / n). The change between the round-0 and the final evaluation is called within noise when
it is no larger than ``Z`` = 2 standard errors of the difference of two independent proportions,
sqrt(p0 (1 - p0) / n0 + p1 (1 - p1) / n1) (about a 95 % band). Both evaluations use the same records, so
the paired error is usually smaller: the rule errs on the side of warning.
"""

from __future__ import annotations

import math
from typing import Any

Z = 2.0
PROPORTIONS = ("accuracy", "exact_match", "acc", "pairwise_accuracy", "preference_accuracy")


def is_proportion(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in PROPORTIONS


def difference_se(p0: float, n0: int, p1: float, n1: int) -> float:
    """Standard error of ``p1 - p0`` for proportions measured on ``n0`` and ``n1`` records."""
    return math.sqrt(p0 * (1 - p0) / n0 + p1 * (1 - p1) / n1)


def within_noise(p0: float, n0: int, p1: float, n1: int, z: float = Z) -> bool:
    """True when ``|p1 - p0| <= z`` standard errors of the difference (an unchanged 0 or 1 included)."""
    return abs(p1 - p0) <= z * difference_se(p0, n0, p1, n1) + 1e-12


def noise_warnings(first: dict[str, Any] | None, last: dict[str, Any] | None) -> list[str]:
    """Warnings for the overall proportion metrics of two ``eval`` events (round 0 and the final one)
    whose change is within noise."""
    if not first or not last or first is last:
        return []
    n0, n1 = first.get("examples"), last.get("examples")
    if not n0 or not n1:
        return []
    out = []
    before, after = first.get("metrics") or {}, last.get("metrics") or {}
    for name, p1 in after.items():
        p0 = before.get(name)
        if "/" in name or not is_proportion(name) or not isinstance(p0, (int, float)) or not isinstance(p1, (int, float)):
            continue
        if within_noise(p0, n0, p1, n1):
            se = difference_se(p0, n0, p1, n1)
            out.append(
                f"**Within noise:** {name} went from {p0:.3f} (round 0, n={n0}) to {p1:.3f} (round {last.get('round')}, "
                f"n={n1}), a change of {p1 - p0:+.3f}, no more than {Z:g} binomial standard errors of the difference "
                f"({Z:g} x {se:.3f} = {Z * se:.3f}). The model barely moved: try a larger training.lr, more rounds or "
                f"more local steps (docs/data.md, 'Learning rates'), or evaluate on more records.")
    return out
