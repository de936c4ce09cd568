"""Points of a search space: the grid's full product, or a seeded random sample. Pure functions.

A space maps a config key (``training.lr``) to either a list of values or one distribution:
``{choice: [a, b, ...]}``, ``{uniform: [low, high]}``, ``{loguniform: [low, high]}``, ``{int: [low, high]}``
(both ends included). A grid needs every entry to be a list (or a choice); a random sample draws each
key independently, a list being a uniform choice among its values.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")


def entry_kind(key: str, entry: Any) -> str:
    """``list`` or the distribution's name; a clear error for anything else."""
    if isinstance(entry, list):
        if not entry:
            raise ValueError(f"space.{key}: an empty list of values")
        return "list"
    if isinstance(entry, dict) and len(entry) == 1:
        (kind, args), = entry.items()
        if kind not in DISTRIBUTIONS:
            raise ValueError(f"space.{key}: unknown distribution '{kind}'; expected one of {', '.join(DISTRIBUTIONS)} "
                             "or a list of values")
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise ValueError(f"space.{key}: choice needs a non-empty list of values, got {args!r}")
            return kind
        if (not isinstance(args, list) or len(args) != 2
                or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)):
            raise ValueError(f"space.{key}: {kind} needs [low, high] numbers, got {args!r}")
        low, high = args
        if not low <= high:
            raise ValueError(f"space.{key}: {kind} needs low <= high, got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"space.{key}: loguniform needs low > 0, got {low}")
        if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise ValueError(f"space.{key}: int needs integer bounds, got [{low}, {high}]")
        return kind
    raise ValueError(f"space.{key}: expected a list of values or one of {{{': ..., '.join(DISTRIBUTIONS)}: ...}}, "
                     f"got {entry!r}")


def choices(key: str, entry: Any) -> list[Any] | None:
    """The finite values of an entry (a list or a choice), None for a continuous distribution."""
    kind = entry_kind(key, entry)
    if kind == "list":
        return list(entry)
    if kind == "choice":
        return list(entry["choice"])
    return None


def grid_points(space: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination, the first key varying slowest (``itertools.product`` order)."""
    if not space:
        raise ValueError("space: empty; give at least one config key with its values")
    values = []
    for key, entry in space.items():
        finite = choices(key, entry)
        if finite is None:
            raise ValueError(f"space.{key}: strategy grid needs a list of values, got the distribution {entry!r} "
                             "(use strategy random, or list the values)")
        values.append(finite)
    return [dict(zip(space, combo)) for combo in itertools.product(*values)]


def _draw(rng: np.random.Generator, key: str, entry: Any) -> Any:
    finite = choices(key, entry)
    if finite is not None:
        return finite[int(rng.integers(len(finite)))]
    (kind, (low, high)), = entry.items()
    if kind == "uniform":
        return float(rng.uniform(low, high))
    if kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return int(rng.integers(int(low), int(high) + 1))  # int: both ends included


def random_points(space: dict[str, Any], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` points drawn from one ``numpy`` generator seeded with ``seed``, keys in spec order."""
    if not space:
        raise ValueError("space: empty; give at least one config key with its values")
    if n < 1:
        raise ValueError(f"n_trials must be >= 1, got {n}")
    for key, entry in space.items():
        entry_kind(key, entry)
    rng = np.random.default_rng(seed)
    return [{key: _draw(rng, key, entry) for key, entry in space.items()} for _ in range(n)]
