"""Running a sweep: each trial a normal run directory under ``SWEEP_DIR/trials/<name>`` (in this process,
through the same ``RunDirectory`` + ``run_experiment`` as ``fedpeft run``), the state written atomically
after every trial, so a killed sweep resumes where it stopped:

- a trial recorded as finished in ``sweep_state.json`` is never rerun;
- a trial that was interrupted resumes from its run directory's last checkpoint (``--resume`` semantics);
- a changed spec (or base config) is refused by its fingerprint rather than mixed with old results.

Trial names are deterministic: ``t<index>`` (the index of the point in the grid / the random sample),
``t<index>-r<rounds>`` for successive-halving rungs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedpeft.config import ConfigError, ExperimentConfig
from fedpeft.federation.durable import replace_durable
from fedpeft.federation.engine import run_experiment
from fedpeft.federation.run_dir import RunDirectory, RunDirError
from fedpeft.federation.transport import RunStopped
from fedpeft.report.plots import lower_is_better, primary_metric
from fedpeft.sweep.halving import successive_halving
from fedpeft.sweep.results import write_results
from fedpeft.sweep.spec import Sweep
from fedpeft.sweep.val_loss import validation_loss

log = logging.getLogger(__name__)

STATE_FILE = "sweep_state.json"
LOCK_FILE = ".sweep.lock"
DONE = ("finished", "stopped")
"""Trial states that are final: a stopped trial (no client update accepted in a round) is reported, not retried."""
KILL_ENV = "FEDPEFT_SWEEP_KILL_AT"
"""Testing aid: ``after:<trial name>`` makes the process SIGKILL itself once that trial is recorded."""

TrialFn = Callable[[ExperimentConfig, Path], dict[str, Any]]


def run_trial(config: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """One trial: a new run in ``run_dir``, or the resumption of the one interrupted there; then its
    validation loss. Returns final metrics, seconds and the loss."""
    resuming = (run_dir / "config.yaml").is_file()
    opened = RunDirectory.open(run_dir, config, resume=resuming)
    summary = run_experiment(run_directory=opened)
    return {"final_metrics": dict(summary.final_metrics), "seconds": summary.seconds,
            "val_loss": validation_loss(config, run_dir)}


class SweepRunner:
    def __init__(self, sweep: Sweep, out_dir: str | Path, trial_fn: TrialFn = run_trial) -> None:
        self.sweep, self.out_dir, self.trial_fn = sweep, Path(out_dir), trial_fn
        self.state_path = self.out_dir / STATE_FILE
        self._lock = self._take_lock()
        try:
            self.state = self._load_state()
        except BaseException:
            self.close()
            raise

    def _take_lock(self):
        """One sweep process per directory (the kernel drops the flock when the process dies, kill -9 too)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.out_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"sweep directory {self.out_dir} is in use by another fedpeft sweep") from None
            raise
        return handle

    def close(self) -> None:
        if not self._lock.closed:
            self._lock.close()

    # --- state ---------------------------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        fingerprint = self.sweep.fingerprint()
        if self.state_path.is_file():
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
            if state.get("fingerprint") != fingerprint:
                raise ConfigError(f"{self.out_dir} holds a sweep of another spec (fingerprint {state.get('fingerprint')}, "
                                  f"this spec {fingerprint}); use another --dir for a changed spec")
            return state
        return {"fingerprint": fingerprint, "strategy": self.sweep.spec.strategy, "trials": {}}

    def _save_state(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        replace_durable(self.state_path, json.dumps(self.state, indent=1, sort_keys=True).encode())

    # --- trials --------------------------------------------------------------------------------------
    def trial_name(self, index: int, rounds: int | None) -> str:
        return f"t{index:03d}" if rounds is None else f"t{index:03d}-r{rounds}"

    def metric_name(self, final_metrics: dict[str, float]) -> str:
        chosen = self.sweep.spec.metric or self.state.get("metric_name") or primary_metric(
            [k for k in final_metrics if "/" not in k] or list(final_metrics))
        if chosen is None or chosen not in final_metrics:
            raise ConfigError(f"metric: '{chosen}' is not among the trial's final metrics "
                              f"({', '.join(sorted(final_metrics)) or 'none'})")
        return chosen

    def trial(self, index: int, rounds: int | None = None) -> dict[str, Any]:
        """The record of trial ``index`` (at a rung's ``rounds``): from the state when finished, else run now."""
        name = self.trial_name(index, rounds)
        done = self.state["trials"].get(name)
        if done is not None and done.get("status") in DONE:
            return done
        point = self.sweep.points[index]
        config = self.sweep.configs[index] if rounds is None else self.sweep.config_for(point, rounds)
        run_dir = self.out_dir / "trials" / name
        log.info("sweep trial %s: %s", name, point)
        start = time.perf_counter()
        record = {"trial": name, "index": index, "params": point, "rounds": config.federation.rounds,
                  "run_dir": str(run_dir)}
        try:
            result = self.trial_fn(config, run_dir)
        except RunStopped as exc:  # the run cannot go on (no update accepted): report it, go on with the others
            log.warning("sweep trial %s stopped: %s", name, exc)
            record.update(status="stopped", error=str(exc), metric=None, val_loss=None, final_metrics={},
                          seconds=round(time.perf_counter() - start, 2))
        else:
            metric_name = self.metric_name(result["final_metrics"])
            self.state["metric_name"] = metric_name
            record.update(status="finished", metric=result["final_metrics"].get(metric_name),
                          val_loss=result["val_loss"], final_metrics=result["final_metrics"],
                          seconds=round(float(result.get("seconds", time.perf_counter() - start)), 2))
        self.state["trials"][name] = record
        self._save_state()
        if os.environ.get(KILL_ENV) == f"after:{name}":
            os.kill(os.getpid(), signal.SIGKILL)
        return record

    def score(self, record: dict[str, Any]) -> float:
        value = record["val_loss"] if self.sweep.spec.select_by == "val_loss" else record["metric"]
        return float(value) if value is not None else math.nan

    def metric_lower_is_better(self) -> bool:
        return lower_is_better(self.state.get("metric_name") or "")

    # --- the sweep -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict[str, Any]:
        self._save_state()
        spec = self.sweep.spec
        indices = list(range(len(self.sweep.points)))
        if spec.strategy == "halving":
            lower = spec.select_by == "val_loss"  # the metric's direction is known after the first trial
            def objective(index: int, rounds: int) -> float:
                record = self.trial(index, rounds)
                return self.score(record)

            h = spec.halving
            self.trial(indices[0], h.min_rounds)  # fixes the metric name, hence its direction
            if spec.select_by == "metric":
                lower = self.metric_lower_is_better()
            outcome = successive_halving(indices, objective, h.min_rounds, h.eta, lower, h.max_rounds)
            self.state["halving"] = {"rounds": outcome.rounds, "best": outcome.best,
                                     "rungs": [{str(k): v for k, v in rung.items()} for rung in outcome.rungs]}
            self._save_state()
            records = [self.state["trials"][self.trial_name(i, r)]
                       for r, rung in zip(outcome.rounds, outcome.rungs) for i in sorted(rung)]
        else:
            records = [self.trial(i) for i in indices]
        return self.write(records)

    def write(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        keys = list(self.sweep.spec.space)
        rows = [{"trial": r["trial"], **{k: r["params"].get(k) for k in keys}, "rounds": r["rounds"],
                 "val_loss": r["val_loss"], "metric": r["metric"], "seconds": r["seconds"], "status": r["status"],
                 "run_dir": os.path.relpath(r["run_dir"], self.out_dir)} for r in records]
        metric_name = self.state.get("metric_name", "metric")
        summary = write_results(rows, keys, metric_name, self.out_dir, self.sweep.spec.select_by,
                                self.metric_lower_is_better(),
                                title=f"Sweep {self.sweep.source} ({self.sweep.spec.strategy}, {len(rows)} runs)")
        return {"rows": rows, "metric_name": metric_name, **summary}
