"""Read a run's ``metrics.jsonl`` (schema: ``docs/metrics.md``) robustly into a :class:`RunLog`.

The reader never raises on a damaged log: a truncated last line (a killed run), blank lines, lines that
are not JSON objects or have no ``event`` are skipped with one warning each. Events of a round that was
logged twice (a resume that did not cut the log) keep their last occurrence, so every per-round series
has one value per round.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.metering.flops import lora_training_flops
from fedpeft.metering.metric_values import as_number as _num
from fedpeft.metering.metric_values import flatten_metrics  # re-exported: report users read it here

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PHASES = ("train", "aggregate", "evaluate", "checkpoint")


def metrics_path(run_dir: str | Path) -> Path:
    """``run_dir/metrics.jsonl``; a path to the file itself is accepted too."""
    path = Path(run_dir)
    return path if path.is_file() else path / METRICS_FILE


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Every well-formed event of a metrics file, in file order (bad lines skipped with a warning)."""
    path = Path(path)
    events: list[dict[str, Any]] = []
    try:
        raw = path.read_bytes()
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return events
    text = raw.decode("utf-8", errors="replace")
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            where = "last line (truncated?)" if number >= len(lines) - 1 else f"line {number}"
            log.warning("%s: skipping %s, not valid JSON", path, where)
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
            log.warning("%s: skipping line %d, not an event object", path, number)
            continue
        events.append(obj)
    return events


def _round(event: dict[str, Any]) -> int | None:
    value = event.get("round")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


@dataclass
class RunLog:
    """The events of one run, grouped by kind, with the per-round series the report plots."""

    run_dir: Path
    events: list[dict[str, Any]] = field(default_factory=list)

    # --- raw groups -----------------------------------------------------------------------------
    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]

    def _last_per_round(self, kind: str) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for e in self.of(kind):
            r = _round(e)
            if r is not None:
                out[r] = e
        return dict(sorted(out.items()))

    @property
    def run_start(self) -> dict[str, Any]:
        """The first ``run_start`` (the original start), updated by later ones (resumes)."""
        merged: dict[str, Any] = {}
        for e in self.of("run_start"):
            merged.update({k: v for k, v in e.items() if v is not None})
        return merged

    @property
    def run_end(self) -> dict[str, Any] | None:
        ends = self.of("run_end")
        return ends[-1] if ends else None

    @property
    def config(self) -> dict[str, Any]:
        config = self.run_start.get("config")
        return config if isinstance(config, dict) else {}

    @property
    def complete(self) -> bool:
        return self.run_end is not None

    @property
    def client_train(self) -> list[dict[str, Any]]:
        """Local jobs; a job logged twice for the same (round, client, job) keeps its last record."""
        seen: dict[tuple, dict[str, Any]] = {}
        for e in self.of("client_train"):
            seen[(_round(e), e.get("client"), e.get("job", "default"))] = e
        return list(seen.values())

    @property
    def client_failed(self) -> list[dict[str, Any]]:
        return self.of("client_failed")

    @property
    def round_end(self) -> dict[int, dict[str, Any]]:
        return self._last_per_round("round_end")

    @property
    def aggregate(self) -> dict[int, dict[str, Any]]:
        return self._last_per_round("aggregate")

    def eval_events(self) -> dict[int, list[dict[str, Any]]]:
        """Round -> its eval events, the last one of each ``split`` (global, personal, ...)."""
        by_key: dict[tuple[int, str], dict[str, Any]] = {}
        for e in self.of("eval"):
            r = _round(e)
            if r is not None:
                by_key[(r, str(e.get("split", "global")))] = e
        out: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for (r, _), e in by_key.items():
            out[r].append(e)
        return dict(sorted(out.items()))

    def eval_seconds(self) -> dict[int, float]:
        """Round -> seconds of all its evaluations (every split)."""
        return {r: sum(_num(e.get("seconds")) or 0.0 for e in events) for r, events in self.eval_events().items()}

    @property
    def evals(self) -> dict[int, dict[str, float]]:
        """Round -> flat numeric evaluation metrics, the metrics of every split of that round merged."""
        out = {}
        for r, events in self.eval_events().items():
            metrics: dict[str, float] = {}
            for e in events:
                metrics.update(flatten_metrics(e.get("metrics")))
            if metrics:
                out[r] = metrics
        return out

    # --- labels ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.run_dir.name or str(self.run_dir)

    @property
    def method(self) -> str:
        method = self.run_start.get("method")
        if isinstance(method, str):
            return method
        cfg_method = self.config.get("method")
        if isinstance(cfg_method, dict) and isinstance(cfg_method.get("name"), str):
            return cfg_method["name"]
        return "?"

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    # --- series ---------------------------------------------------------------------------------
    @property
    def rounds(self) -> list[int]:
        """Rounds with any trace in the log (round 0 only when evaluated)."""
        found = set(self.round_end) | set(self.aggregate) | set(self.evals)
        found |= {r for r in (_round(e) for e in self.client_train) if r is not None}
        return sorted(found)

    @property
    def completed_rounds(self) -> int:
        end = self.run_end
        if end and _num(end.get("rounds")) is not None:
            return int(end["rounds"])
        return max(self.round_end, default=0)

    def client_losses(self) -> dict[Any, dict[int, float]]:
        """Client id -> round -> mean local training loss (a client's jobs in a round averaged)."""
        acc: dict[Any, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for e in self.client_train:
            r, loss = _round(e), _num(e.get("loss"))
            if r is not None and loss is not None:
                acc[e.get("client")][r].append(loss)
        return {c: {r: sum(v) / len(v) for r, v in sorted(rs.items())} for c, rs in acc.items()}

    def mean_loss(self) -> dict[int, float]:
        """Round -> mean over the round's local jobs of their mean training loss."""
        acc: dict[int, list[float]] = defaultdict(list)
        for e in self.client_train:
            r, loss = _round(e), _num(e.get("loss"))
            if r is not None and loss is not None:
                acc[r].append(loss)
        return {r: sum(v) / len(v) for r, v in sorted(acc.items())}

    def _sum_client_field(self, key: str) -> dict[int, float]:
        acc: dict[int, float] = defaultdict(float)
        for e in self.client_train:
            r, value = _round(e), _num(e.get(key))
            if r is not None and value is not None:
                acc[r] += value
        return dict(sorted(acc.items()))

    def round_bytes(self, direction: str = "uplink") -> dict[int, float]:
        """Round -> bytes in ``direction`` (uplink/downlink): from round_end, else summed client jobs."""
        key = f"{direction}_bytes"
        from_jobs = self._sum_client_field(key)
        out = dict(from_jobs)
        for r, e in self.round_end.items():
            value = _num(e.get(key))
            if value is not None:
                out[r] = value
        return dict(sorted(out.items()))

    def cumulative_bytes(self, direction: str = "uplink") -> dict[int, float]:
        """Round -> cumulative bytes after that round (round 0 -> 0). Logged cum_* values win."""
        key = f"cum_{direction}_bytes"
        out: dict[int, float] = {0: 0.0}
        running = 0.0
        per_round = self.round_bytes(direction)
        logged = {r: _num(e.get(key)) for r, e in self.round_end.items()}
        for r in sorted(set(per_round) | set(logged)):
            if r <= 0:
                continue
            if logged.get(r) is not None:
                running = logged[r]
            else:
                running += per_round.get(r, 0.0)
            out[r] = running
        return out

    def total_bytes(self, direction: str = "uplink") -> float:
        end = self.run_end
        if end is not None and _num(end.get(f"cum_{direction}_bytes")) is not None:
            return float(end[f"cum_{direction}_bytes"])
        cum = self.cumulative_bytes(direction)
        return cum[max(cum)] if cum else 0.0

    def phase_seconds(self) -> dict[int, dict[str, float]]:
        """Round -> {phase: seconds} with the phases of ``PHASES`` plus ``other`` (round time not in them).

        From ``round_end.phase_seconds`` when logged; otherwise rebuilt from the client jobs
        (train), the aggregate event and the eval event of the round.
        """
        aggregates, eval_seconds = self.aggregate, self.eval_seconds()
        train = self._sum_client_field("seconds")
        checkpoints = self.checkpoint_seconds()
        out: dict[int, dict[str, float]] = {}
        for r in sorted(set(self.round_end) | set(train) | set(aggregates)):
            if r <= 0:
                continue
            end = self.round_end.get(r, {})
            logged = end.get("phase_seconds") if isinstance(end.get("phase_seconds"), dict) else None
            if logged:
                phases = {k: v for k, v in ((k, _num(v)) for k, v in logged.items()) if v is not None}
            else:
                phases = {
                    "train": train.get(r, 0.0),
                    "aggregate": _num(aggregates.get(r, {}).get("seconds")) or 0.0,
                    "evaluate": eval_seconds.get(r, 0.0),
                }
            total = _num(end.get("seconds"))
            if total is not None:
                other = total - sum(phases.values())
                if other > 1e-9:
                    phases["other"] = other
            if r in checkpoints and not phases.get("checkpoint"):
                phases["checkpoint"] = checkpoints[r]  # written after round_end: not part of its seconds
            out[r] = phases
        return out

    def wall_seconds(self) -> float | None:
        end = self.run_end
        if end is not None and _num(end.get("seconds")) is not None:
            return float(end["seconds"])
        times = [_num(e.get("time")) for e in self.events]
        times = [t for t in times if t is not None]
        return (max(times) - min(times)) if len(times) >= 2 else None

    def checkpoint_seconds(self) -> dict[int, float]:
        """Round -> checkpoint seconds, from ``checkpoint`` events ({round, seconds}) when the engine logs
        them (the checkpoint is saved after ``round_end``, so ``phase_seconds.checkpoint`` cannot hold it),
        else from ``round_end.phase_seconds.checkpoint``."""
        out = {}
        for r, e in self.round_end.items():
            phases = e.get("phase_seconds")
            value = _num(phases.get("checkpoint")) if isinstance(phases, dict) else None
            if value:
                out[r] = value
        for r, e in self._last_per_round("checkpoint").items():
            value = _num(e.get("seconds"))
            if value is not None:
                out[r] = value
        return out

    def time_breakdown(self) -> dict[str, float]:
        """Where the run's wall time went: model load, local training, aggregation, evaluation
        (all eval events, round 0 included), checkpoint, and ``other`` (the rest: set-up, data,
        logging, engine overhead). Empty when the wall time is unknown."""
        wall = self.wall_seconds()
        if wall is None:
            return {}
        out = {
            "model load": _num(self.run_start.get("model_load_seconds")) or 0.0,
            "local training": self.train_seconds(),
            "aggregation": sum(_num(e.get("seconds")) or 0.0 for e in self.aggregate.values()),
            "evaluation": sum(self.eval_seconds().values()),
            "checkpoint": sum(self.checkpoint_seconds().values()),
        }
        out["other"] = max(0.0, wall - sum(out.values()))
        return out

    def train_seconds(self) -> float:
        return sum(self._sum_client_field("seconds").values())

    def total_tokens(self) -> float:
        return sum(self._sum_client_field("tokens").values())

    def peak_cuda_mb(self) -> float | None:
        values = [_num(e.get("peak_cuda_mb")) for e in self.of("round_end") + self.of("run_end")]
        values = [v for v in values if v is not None]
        return max(values) if values else None

    def peak_rss_mb(self) -> float | None:
        values = [_num(e.get("peak_rss_mb")) for e in self.of("round_end") + self.of("run_end")]
        values = [v for v in values if v is not None]
        return max(values) if values else None

    def metric_names(self) -> list[str]:
        names: list[str] = []
        for metrics in self.evals.values():
            for name in metrics:
                if name not in names:
                    names.append(name)
        return names

    def final_metrics(self) -> dict[str, float]:
        """``run_end.final_metrics`` when logged, else the metrics of the last evaluated round."""
        end = self.run_end
        if end is not None:
            final = flatten_metrics(end.get("final_metrics"))
            if final:
                return final
        evals = self.evals
        return evals[max(evals)] if evals else {}

    def flops(self) -> float | None:
        """Estimated training FLOPs of the run (see ``fedpeft.metering.flops``), or None when unknown.

        Sums ``client_train.train_flops`` when the engine logs it; otherwise applies the LoRA rule to
        the logged tokens with ``run_start.base_params`` and ``run_start.trainable_params``.
        """
        logged = self._sum_client_field("train_flops")
        if logged:
            return sum(logged.values())
        start = self.run_start
        base, trainable = _num(start.get("base_params")), _num(start.get("trainable_params"))
        tokens = self.total_tokens()
        if base is None or trainable is None or tokens <= 0:
            return None
        return lora_training_flops(tokens, int(base), int(trainable))


def load_run(run_dir: str | Path) -> RunLog:
    """Read ``run_dir/metrics.jsonl`` (missing or empty logs give an empty RunLog and a warning)."""
    path = metrics_path(run_dir)
    run_dir = path.parent
    if not path.exists():
        log.warning("%s has no %s", run_dir, METRICS_FILE)
        return RunLog(run_dir=run_dir, events=[])
    return RunLog(run_dir=run_dir, events=read_events(path))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std
