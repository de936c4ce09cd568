"""``fedpeft run``: run or resume a federated experiment from a YAML config."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedpeft.commands.common import OVERRIDES, exit_on

console = Console(stderr=True)


def _summary_table(summary) -> Table:
    table = Table(title=f"fedpeft run: {summary.run_dir}")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in sorted(set(summary.initial_metrics) | set(summary.final_metrics)):
        before = summary.initial_metrics.get(key)
        after = summary.final_metrics.get(key)
        table.add_row(key, "-" if before is None else f"{before:.3f}", "-" if after is None else f"{after:.3f}")
    return table


def register(app: typer.Typer) -> None:
    @app.command(
        "run",
        context_settings=OVERRIDES,
        help=(
            "Run a federated experiment.\n\n"
            "Examples:\n\n"
            "  fedpeft run --config configs/quickstart.yaml\n\n"
            "  fedpeft run --config configs/quickstart.yaml federation.rounds=3 training.lr=5e-4\n\n"
            "  fedpeft run --resume runs/quickstart-20261122-101500   (continue after the last completed round)\n\n"
            "  fedpeft run --config configs/quickstart.yaml --print-config   (show the resolved config and exit)\n\n"
            "Any config key can be overridden as key.sub=value after the options."
        ),
    )
    def run(
        ctx: typer.Context,
        config: Path = typer.Option(None, "--config", "-c", help="Experiment YAML (see configs/)."),
        resume: Path = typer.Option(None, "--resume", help="Run directory to continue from its last completed round "
                                    "(with --config: start it there if it holds no run yet; the configs must agree)."),
        run_dir: Path = typer.Option(None, "--run-dir", help="Where to write the run (default: output.dir/<name>-<time>)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in a non-empty --run-dir."),
        print_config: bool = typer.Option(False, "--print-config", help="Print the fully resolved config and exit."),
    ) -> None:
        from fedpeft.config import ConfigError, load_config
        from fedpeft.federation.run_dir import RunDirectory, RunDirError, config_differences, default_run_dir

        overrides = list(ctx.args)
        if config is None and resume is None:
            raise typer.BadParameter("give --config FILE (or --resume RUN_DIR)", param_hint="--config")
        if resume is not None and run_dir is not None and resume != run_dir:
            raise typer.BadParameter("--run-dir and --resume name different directories", param_hint="--run-dir")
        if resume is not None and overwrite:
            raise typer.BadParameter("--resume continues a run, --overwrite replaces it: give one", param_hint="--overwrite")
        # Bad input exits 2; an OSError (disk full, read-only or missing directory) exits 1 with the path and
        # the cause. FileNotFoundError is an OSError: the inner block, asked first, keeps it at 2.
        with exit_on(OSError, code=1), exit_on(ConfigError, FileNotFoundError, ValueError):
            given = load_config(config, overrides) if config is not None else None
            saved_path = resume / "config.yaml" if resume is not None else None
            if saved_path is not None and saved_path.is_file():
                cfg, resuming, target = load_config(saved_path, overrides), True, resume
                if given is not None:
                    differences = config_differences(cfg, given)
                    if differences:
                        raise RunDirError(f"--config {config} does not describe the run in {resume}:\n  "
                                          + "\n  ".join(differences[:20])
                                          + "\nresume without --config (the run's config.yaml is used), or start "
                                          "a new run in another --run-dir")
            elif resume is not None and given is None:
                raise RunDirError(f"--resume {resume}: no config.yaml there; is it a fedpeft run directory? "
                                  "(with --config it starts the run there)")
            else:  # a new run; --resume DIR with --config starts it in DIR (so the same command resumes it)
                cfg, resuming, target = given, False, resume or run_dir or default_run_dir(given)
            if print_config:
                typer.echo(cfg.to_yaml())
                return
            # Lock, directory and config.yaml now, before the slow imports: a kill from here on is resumable.
            opened = RunDirectory.open(target, cfg, resume=resuming, overwrite=overwrite)
            from fedpeft.federation.engine import run_experiment
            from fedpeft.federation.transport import RunStopped
            from fedpeft.models.registry import ModelNotFoundError

            try:
                summary = run_experiment(run_directory=opened)
            except ModelNotFoundError as exc:
                raise ConfigError(str(exc)) from None
            except RunStopped as exc:  # the run began and cannot go on; its last checkpoint is the resume point
                typer.echo(f"run stopped: {exc}", err=True)
                raise typer.Exit(1) from None
        console.print(_summary_table(summary))
        console.print(
            f"{summary.rounds} rounds in {summary.seconds:.1f} s, peak RSS {summary.peak_rss_mb:.0f} MiB, "
            f"uplink {summary.uplink_bytes / 1e6:.2f} MB, downlink {summary.downlink_bytes / 1e6:.2f} MB\n"
            f"final adapter (PEFT format): {summary.final_adapter_dir}\nevents: {summary.run_dir / 'metrics.jsonl'}"
            + (f"\nreport: {summary.report_path}" if summary.report_path else "")
            + (f"\nprivacy ({summary.privacy['mode']}): epsilon {summary.privacy['epsilon']:.3f} at delta "
               f"{summary.privacy['delta']:g}" if summary.privacy and "epsilon" in summary.privacy else "")
            + (f"\nDP-SGD: epsilon per client up to {summary.privacy['dp_sgd_epsilon_max']:.3f} at delta "
               f"{summary.privacy['dp_sgd_delta']:g}" if summary.privacy and "dp_sgd_delta" in summary.privacy else "")
        )
