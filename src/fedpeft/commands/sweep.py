"""``fedpeft sweep SPEC.yaml``: hyperparameter search over config keys (grid, random, successive halving),
each trial a normal run directory, resumable (docs/sweep.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from fedpeft.commands.common import OVERRIDES, exit_on


def register(app: typer.Typer) -> None:
    @app.command(
        "sweep",
        context_settings=OVERRIDES,
        help=(
            "Hyperparameter sweep over config keys (FedHPO): grid, random or successive halving.\n\n"
            "  fedpeft sweep configs/sweep/tiny_grid.yaml --dir runs/sweep-tiny\n\n"
            "Running the same command again resumes: finished trials are not rerun, an interrupted one "
            "continues from its last checkpoint. key.sub=value after the options overrides the base config."
        ),
    )
    def sweep(
        ctx: typer.Context,
        spec: Path = typer.Argument(..., help="Sweep spec YAML (docs/sweep.md)."),
        out_dir: Path = typer.Option(None, "--dir", help="Sweep directory (default: runs/sweep-<spec name>)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Check the spec and list the trials, run nothing."),
    ) -> None:
        from fedpeft.config import ConfigError
        from fedpeft.federation.run_dir import RunDirError

        with exit_on(ConfigError, RunDirError, ValueError, FileNotFoundError):
            import fedpeft.strategies  # noqa: F401  (registers the method check of every trial's config)
            from fedpeft.sweep.spec import load_sweep

            loaded = load_sweep(spec, list(ctx.args))
            target = out_dir or Path("runs") / f"sweep-{spec.stem}"
            if dry_run:
                for i, point in enumerate(loaded.points):
                    typer.echo(f"t{i:03d}  " + "  ".join(f"{k}={v}" for k, v in point.items()))
                return
            from fedpeft.sweep.runner import SweepRunner

            result = SweepRunner(loaded, target).run()
        typer.echo((target / "results.md").read_text(encoding="utf-8"))
        typer.echo(f"results: {target / 'results.csv'}" + (f", plot: {result['plot']}" if result.get("plot") else ""))
