"""Optional live logging of a run's events to TensorBoard or Weights & Biases. Off by default.

The engine writes ``metrics.jsonl`` in any case; a live logger only mirrors its events as scalars while
the run goes. Each backend is imported only when asked for, and a backend whose library is not
installed is skipped with a warning, never an error::

    loggers = make_loggers(["tensorboard"], run_dir, config_dict)   # [] -> nothing is imported
    for event in events: loggers.log_event(event)                    # same dicts as metrics.jsonl
    loggers.close()

Scalars (x axis = round): ``train/loss`` (mean over the round's jobs), ``train/loss/client_<id>``,
``eval/<metric>``, ``comm/uplink_bytes``, ``comm/cum_uplink_bytes`` (and downlink),
``time/round_seconds``, ``time/<phase>_seconds``, ``memory/peak_rss_mb``, ``aggregate/<metric>``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedpeft.metering.metric_values import flatten_metrics

log = logging.getLogger(__name__)

BACKENDS = ("tensorboard", "wandb")


class LiveLogger:
    """Base: receives scalars per round. Subclasses write them somewhere."""

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardLogger(LiveLogger):
    def __init__(self, log_dir: Path, config: Mapping[str, Any] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(log_dir))
        if config:
            import json

            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(LiveLogger):
    def __init__(self, run_dir: Path, config: Mapping[str, Any] | None = None, **init_kwargs: Any) -> None:
        import wandb

        init_kwargs.setdefault("project", "fedpeft")
        init_kwargs.setdefault("name", run_dir.name)
        init_kwargs.setdefault("dir", str(run_dir))
        self.wandb = wandb
        self.run = wandb.init(config=dict(config or {}), **init_kwargs)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        self.run.log({**values, "round": step})

    def close(self) -> None:
        self.run.finish()


def event_scalars(event: Mapping[str, Any]) -> tuple[int, dict[str, float]] | None:
    """(round, scalars) that a metrics.jsonl event contributes, or None for events without scalars.

    ``client_train`` events give only the per-client loss here; :class:`LoggerGroup` adds the mean
    over the round's jobs when the round ends.
    """
    kind, r = event.get("event"), event.get("round")
    if not isinstance(r, int):
        return None
    if kind == "client_train" and isinstance(event.get("loss"), (int, float)):
        return r, {f"train/loss/client_{event.get('client')}": float(event["loss"])}
    if kind == "eval":
        return r, {f"eval/{k}": v for k, v in flatten_metrics(event.get("metrics")).items()}
    if kind == "aggregate":
        skip = {"event", "time", "round", "clients", "num_updates", "seconds"}
        values = flatten_metrics({k: v for k, v in event.items() if k not in skip}, prefix="aggregate/")
        if isinstance(event.get("seconds"), (int, float)):
            values["time/aggregate_seconds"] = float(event["seconds"])
        return r, values
    if kind == "round_end":
        values = {}
        for key, name in (("uplink_bytes", "comm/uplink_bytes"), ("downlink_bytes", "comm/downlink_bytes"),
                          ("cum_uplink_bytes", "comm/cum_uplink_bytes"), ("cum_downlink_bytes", "comm/cum_downlink_bytes"),
                          ("seconds", "time/round_seconds"), ("peak_rss_mb", "memory/peak_rss_mb"), ("lr", "train/lr")):
            if isinstance(event.get(key), (int, float)) and not isinstance(event.get(key), bool):
                values[name] = float(event[key])
        for phase, seconds in flatten_metrics(event.get("phase_seconds")).items():
            values[f"time/{phase}_seconds"] = seconds
        return r, values
    return None


class LoggerGroup:
    """Fans events out to every live logger; a logger that fails is dropped with a warning."""

    def __init__(self, loggers: Iterable[LiveLogger] = ()) -> None:
        self.loggers = list(loggers)
        self._round_losses: dict[int, list[float]] = defaultdict(list)

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def log_event(self, event: Mapping[str, Any]) -> None:
        if not self.loggers:
            return
        found = event_scalars(event)
        if found is None:
            return
        step, values = found
        if event.get("event") == "client_train":
            self._round_losses[step].extend(values.values())
        if event.get("event") == "round_end" and self._round_losses.get(step):
            losses = self._round_losses.pop(step)
            values["train/loss"] = sum(losses) / len(losses)
        if values:
            for logger in list(self.loggers):
                try:
                    logger.scalars(values, step)
                except Exception as exc:  # noqa: BLE001 - live logging must never stop a run
                    log.warning("live logger %s failed (%s); disabling it", type(logger).__name__, exc)
                    self.loggers.remove(logger)

    def close(self) -> None:
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("closing live logger %s failed: %s", type(logger).__name__, exc)
        self.loggers = []


def make_loggers(names: Iterable[str] | None, run_dir: str | Path, config: Mapping[str, Any] | None = None) -> LoggerGroup:
    """Live loggers for ``names`` (subset of ``BACKENDS``); missing libraries are skipped with a warning."""
    run_dir = Path(run_dir)
    loggers: list[LiveLogger] = []
    for name in names or ():
        name = name.lower()
        if name not in BACKENDS:
            raise ValueError(f"unknown live logger '{name}'; expected one of {', '.join(BACKENDS)}")
        try:
            if name == "tensorboard":
                loggers.append(TensorBoardLogger(run_dir / "tensorboard", config))
            else:
                loggers.append(WandbLogger(run_dir, config))
        except ImportError as exc:
            hint = "pip install tensorboard" if name == "tensorboard" else "pip install wandb"
            log.warning("live logger '%s' is not available (%s); %s to enable it", name, exc, hint)
        except Exception as exc:  # noqa: BLE001 - e.g. wandb not logged in
            log.warning("live logger '%s' could not start: %s", name, exc)
    return LoggerGroup(loggers)
