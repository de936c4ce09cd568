"""Numbers out of logged metrics: shared by the live loggers (``metering.loggers``) and the reports
(``report.metrics_io``), so neither package imports the other for it."""

from __future__ import annotations

import math
from typing import Any


def as_number(value: Any) -> float | None:
    """A finite float, or None for anything else (missing, null, strings, NaN, bools)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def flatten_metrics(metrics: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (possibly nested) metrics dict as ``{'a/b': value}``; non-numbers dropped."""
    out: dict[str, float] = {}
    if not isinstance(metrics, dict):
        return out
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_metrics(value, prefix=f"{name}/"))
        else:
            number = as_number(value)
            if number is not None:
                out[name] = number
    return out
