"""Live loggers: events map to per-round scalars; missing backends are skipped, never required."""

from __future__ import annotations

import builtins

import pytest

from fedpeft.metering.loggers import LiveLogger, LoggerGroup, event_scalars, make_loggers


class Recorder(LiveLogger):
    def __init__(self):
        self.calls = []

    def scalars(self, values, step):
        self.calls.append((step, dict(values)))


def test_event_scalars():
    assert event_scalars({"event": "eval", "round": 2, "metrics": {"exact_match": 0.5, "task": {"acc": 1}}}) == (
        2, {"eval/exact_match": 0.5, "eval/task/acc": 1.0})
    step, values = event_scalars({"event": "round_end", "round": 1, "uplink_bytes": 10, "cum_uplink_bytes": 30,
                                  "seconds": 2.0, "phase_seconds": {"train": 1.5}, "peak_rss_mb": 400})
    assert step == 1 and values["comm/cum_uplink_bytes"] == 30 and values["time/train_seconds"] == 1.5
    assert event_scalars({"event": "run_start"}) is None


def test_group_adds_mean_loss_at_round_end_and_drops_failing_logger():
    rec = Recorder()

    class Broken(LiveLogger):
        def scalars(self, values, step):
            raise RuntimeError("offline")

    group = LoggerGroup([rec, Broken()])
    group.log_event({"event": "client_train", "round": 1, "client": 0, "loss": 2.0})
    group.log_event({"event": "client_train", "round": 1, "client": 1, "loss": 4.0})
    group.log_event({"event": "round_end", "round": 1, "seconds": 1.0})
    assert len(group.loggers) == 1
    assert rec.calls[-1] == (1, {"time/round_seconds": 1.0, "train/loss": 3.0})


def test_missing_backend_is_skipped(tmp_path, monkeypatch, caplog):
    real_import = builtins.__import__

    def no_backends(name, *args, **kwargs):
        if name in ("wandb", "torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_backends)
    with caplog.at_level("WARNING"):
        group = make_loggers(["tensorboard", "wandb"], tmp_path)
    assert not group and "not available" in caplog.text
    group.log_event({"event": "eval", "round": 0, "metrics": {"a": 1}})  # a no-op
    assert not make_loggers(None, tmp_path)
    with pytest.raises(ValueError, match="unknown live logger"):
        make_loggers(["mlflow"], tmp_path)
