"""Reports of runs: read ``metrics.jsonl`` (``metrics_io``), plot it (``plots``), write a markdown report
(``markdown``) and compare several runs (``compare``).

``write_report(run_dir)`` is called by the engine at the end of every run and never raises.
"""

from __future__ import annotations

from pathlib import Path


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``RUN_DIR/report/report.md`` with PNG plots; returns its path. Never raises (warns instead)."""
    import logging

    try:
        from fedpeft.report.markdown import write_report as _write
    except Exception as exc:  # noqa: BLE001 - e.g. a broken matplotlib install must not fail a run
        logging.getLogger(__name__).warning("cannot build the report of %s: %s", run_dir, exc)
        return Path(run_dir) / "report" / "report.md"
    return _write(run_dir, out_dir)


def compare_runs(run_dirs, out_dir: str | Path | None = None) -> Path:
    """Write ``compare.md`` and plots for several runs; see ``fedpeft.report.compare``."""
    from fedpeft.report.compare import compare_runs as _compare

    return _compare(run_dirs, out_dir)


__all__ = ["write_report", "compare_runs"]
