"""Append-only JSON-lines event log (schema: docs/metrics.md)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from fedpeft.federation.durable import storage_error


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


class MetricsLog:
    def __init__(self, path: str | Path, listener=None) -> None:
        self.listener = listener
        """Optional callable receiving every record (live loggers)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": time.time(), **_jsonable(fields)}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as exc:
            raise storage_error(self.path, exc) from exc
        if self.listener is not None:
            self.listener(record)

    def offset(self) -> int:
        """Byte length of the log, synced to disk: the point a resume truncates back to."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return self.path.stat().st_size

    def truncate(self, offset: int) -> None:
        """Cut the log back to ``offset`` bytes. Never extends it: a log shorter than ``offset`` was cut or
        replaced since the checkpoint (``run_dir.check_metrics_log`` catches that before a resume)."""
        self._file.flush()
        size = self.path.stat().st_size
        if size < offset:
            raise RuntimeError(f"{self.path} is {size} bytes, shorter than the {offset} bytes the checkpoint "
                               "recorded: events were lost; it is not padded")
        self._file.truncate(offset)
        self._file.seek(offset)

    def close(self) -> None:
        self._file.close()


def read_events(path: str | Path) -> list[dict]:
    events = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line:
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
    return events
