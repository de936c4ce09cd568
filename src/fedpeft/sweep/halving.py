"""Successive halving (Jamieson & Talwalkar 2016; Li et al.'s Hyperband rung schedule) as a pure driver.

Rung k trains every surviving trial for ``min_rounds * eta**k`` federated rounds; the best
``max(1, floor(n / eta))`` of the n trials of a rung (by the chosen objective) go on to rung k+1. It
stops when one trial is left or the next rung would exceed ``max_rounds``. Promoted trials are
*rerun* from round 1 with the larger budget rather than continued: the client learning-rate schedule
(cosine by default) spans ``federation.rounds``, so a continued short run is not the longer run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


def keep_count(n: int, eta: int) -> int:
    """How many of ``n`` trials a rung promotes: the top 1/eta, at least one."""
    return max(1, n // eta)


def promote(scores: dict[int, float], eta: int, lower_is_better: bool) -> list[int]:
    """The trial indices promoted from a rung, best first; ties broken by the lower index. A NaN score
    (a trial that failed) is ranked last."""
    def key(index: int) -> tuple:
        value = scores[index]
        bad = value is None or math.isnan(value)
        return (bad, 0.0 if bad else (value if lower_is_better else -value), index)

    ranked = sorted(scores, key=key)
    return ranked[:keep_count(len(scores), eta)]


def rung_rounds(min_rounds: int, eta: int, max_rounds: int | None, trials: int) -> list[int]:
    """Rounds of each rung: min_rounds * eta**k while more than one trial is left and within max_rounds."""
    rounds, n = [min_rounds], trials
    while n > 1:
        n = keep_count(n, eta)
        nxt = rounds[-1] * eta
        if max_rounds is not None and nxt > max_rounds:
            break
        rounds.append(nxt)
    return rounds


@dataclass
class HalvingResult:
    rungs: list[dict[int, float]] = field(default_factory=list)
    """Per rung: trial index -> its score at that rung's budget."""
    rounds: list[int] = field(default_factory=list)
    best: int | None = None


def successive_halving(trials: Sequence[int], objective: Callable[[int, int], float], min_rounds: int, eta: int,
                       lower_is_better: bool, max_rounds: int | None = None) -> HalvingResult:
    """Run ``objective(trial, rounds)`` rung by rung. The objective may be memoised by the caller (the sweep
    reads finished trials from its state file), so a resumed sweep replays the same decisions."""
    if eta < 2:
        raise ValueError(f"halving.eta must be >= 2, got {eta}")
    result = HalvingResult(rounds=rung_rounds(min_rounds, eta, max_rounds, len(trials)))
    alive = list(trials)
    for k, rounds in enumerate(result.rounds):
        scores = {t: objective(t, rounds) for t in alive}
        result.rungs.append(scores)
        promoted = promote(scores, eta, lower_is_better)
        alive = sorted(promoted)  # the next rung runs in trial order
        if k == len(result.rounds) - 1:
            result.best = promoted[0]
    return result
