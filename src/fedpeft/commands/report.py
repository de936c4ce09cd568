"""``fedpeft report RUN_DIR`` and ``fedpeft compare RUN_DIR... [--out DIR]``."""

from __future__ import annotations

from pathlib import Path

import typer

from fedpeft.commands.common import fail


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        run_dir: Path = typer.Argument(..., help="Run directory holding metrics.jsonl."),
        out: Path | None = typer.Option(None, "--out", help="Output directory (default: RUN_DIR/report)."),
    ) -> None:
        """Write RUN_DIR/report/report.md with plots of loss, metrics, bytes and time per phase."""
        from fedpeft.report import write_report
        from fedpeft.report.metrics_io import metrics_path

        if not metrics_path(run_dir).exists():
            fail(f"{run_dir} has no metrics.jsonl (is it a run directory?)")
        path = write_report(run_dir, out)
        typer.echo(f"report: {path}")

    @app.command("compare")
    def compare(
        run_dirs: list[Path] = typer.Argument(..., help="Run directories to compare (seeds of one config are grouped)."),
        out: Path | None = typer.Option(None, "--out", help="Output directory (default: <common parent>/compare)."),
    ) -> None:
        """Put several runs in one table and one set of plots (metric vs round, metric vs cumulative uplink)."""
        from fedpeft.report import compare_runs
        from fedpeft.report.metrics_io import metrics_path

        missing = [str(d) for d in run_dirs if not metrics_path(d).exists()]
        if missing:
            fail(f"no metrics.jsonl in: {', '.join(missing)}")
        path = compare_runs(run_dirs, out)
        typer.echo(f"comparison: {path}")
