"""``fedpeft deploy``: run an experiment config on a Flower federation (needs ``fedpeft[flower]``).

  rehearsal  a SuperLink + N SuperNodes on 127.0.0.1 (--insecure), run, read the run status, stop them
  app        write the Flower app folder of a config (for ``flwr run`` by hand)
  run        submit a config to a running SuperLink and wait for its status

See docs/deploy.md for real machines (TLS, node authentication).
"""

from __future__ import annotations

import functools
import inspect
import json
import tempfile
from pathlib import Path
from typing import Any

import typer

from fedpeft.commands.common import OVERRIDES, exit_on, fail

deploy_app = typer.Typer(
    name="deploy",
    help="Run an experiment on a Flower federation: a local rehearsal or real machines (docs/deploy.md).",
    no_args_is_help=True,
)


def _need_flower() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        fail("Flower is not installed; install it with: pip install 'fedpeft[flower]'")


def _load(config: Path, overrides: list[str]):
    from fedpeft.config import ConfigError, load_config

    with exit_on(ConfigError):
        return load_config(config, overrides)


def _settings(options: dict, resume: bool = False, resolve_run_dir: bool = False) -> dict:
    """Keyword settings for ``write_app`` from the shared deploy options. ``resolve_run_dir``: the run
    directory is on this machine (a rehearsal); otherwise it is a path on the SuperLink's machine and
    kept as given."""
    run_dir = options["run_dir"]
    if resume and not run_dir:
        raise typer.BadParameter("--resume needs --run-dir (the run directory to continue)", param_hint="--resume")
    if run_dir:
        run_dir = str(Path(run_dir).resolve()) if resolve_run_dir else str(run_dir)
    return {**options, "run_dir": run_dir or None, "resume": True if resume else None,
            "secagg": True if options["secagg"] else None}


def _print_outcome(run_dir: Path, run_id: int, status: str, seconds: float) -> None:
    from fedpeft.federation.metrics_log import read_events

    typer.echo(f"Flower run {run_id}: {status} ({seconds:.1f} s)")
    events_path = run_dir / "metrics.jsonl"
    if not events_path.is_file():
        return
    events = read_events(events_path)
    rounds = [e for e in events if e["event"] == "round_end"]
    failed = [e for e in events if e["event"] == "client_failed"]
    for e in rounds:
        typer.echo(f"  round {e['round']}: {e['seconds']:.1f} s, up {e['uplink_bytes']} B, down {e['downlink_bytes']} B, "
                   f"peak RSS {e['peak_rss_mb']:.0f} MiB (server)")
    for e in failed:
        typer.echo(f"  client_failed: round {e['round']} client {e['client']}: {e['error']}")
    end = [e for e in events if e["event"] == "run_end"]
    if end:
        typer.echo(f"  final metrics: {json.dumps(end[-1]['final_metrics'])}")
    typer.echo(f"run directory: {run_dir}")


SETTING_OPTIONS: dict[str, tuple[type, Any]] = {
    "run_dir": (Path, typer.Option(None, "--run-dir", help="Run directory (on the SuperLink's machine).")),
    "min_clients": (int, typer.Option(None, "--min-clients", help="Fewest replies a round aggregates (default 1).")),
    "round_timeout": (float, typer.Option(None, "--round-timeout", help="Seconds a round waits for replies (default 600).")),
    "straggler_timeout": (float, typer.Option(None, "--straggler-timeout", help="Once min-clients replied, seconds to "
                                              "wait for the rest (default 0: until round-timeout).")),
    "node_wait": (float, typer.Option(None, "--node-wait", help="Seconds to wait at start for SuperNodes (default 120).")),
    "secagg": (bool, typer.Option(False, "--secagg", help="Flower's SecAgg+: the server sees only each round's "
                                  "weighted mean (fedit, fedprox, ffa_lora; one client per SuperNode per round).")),
}
"""The deploy settings every command takes (docs in deploy/flower/settings.py)."""


def with_settings(command):
    """Add the ``SETTING_OPTIONS`` to ``command``'s CLI options; it receives them as one dict, ``options``."""
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.name != "options"]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
              for name, (kind, option) in SETTING_OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        options = {name: kwargs.pop(name) for name in SETTING_OPTIONS}
        return command(*args, options=options, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + shared)
    return wrapper


@deploy_app.command("rehearsal", context_settings=OVERRIDES, help=(
    "Start a SuperLink and N SuperNodes on 127.0.0.1 (--insecure), run the config on them, read the run's status "
    "from Flower, stop the processes. Node i serves clients i, i+N, ... of the config's partition.\n\n"
    "Example: fedpeft deploy rehearsal --config configs/tiny.yaml --clients 2 federation.rounds=2"))
@with_settings
def rehearsal(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", "-c", help="Experiment YAML."),
    clients: int = typer.Option(2, "--clients", "-n", help="Number of SuperNodes to start."),
    workdir: Path = typer.Option(None, "--workdir", help="Flower home, logs, client stores (default: a temp dir)."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Give up on the run after this many seconds."),
    warm_worker: bool = typer.Option(True, "--warm-worker/--cold", help="Keep the model loaded in a worker per "
                                     "node (default), or build it in every ClientApp process."),
    options: dict = None,
) -> None:
    _need_flower()
    import time

    from fedpeft.deploy.flower.app import write_app
    from fedpeft.deploy.flower.local import DeployError, LocalFederation, pull_logs, rehearsal_node_configs
    from fedpeft.federation.engine import default_run_dir

    cfg = _load(config, list(ctx.args))
    run_dir = Path(options["run_dir"] or default_run_dir(cfg)).resolve()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="fedpeft-rehearsal-")).resolve()
    try:
        nodes = rehearsal_node_configs(clients, cfg.federation.num_clients, workdir / "client-stores",
                                       warm_worker=warm_worker)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--clients") from None
    app_dir = write_app(workdir / "app", cfg, **_settings({**options, "run_dir": run_dir}, resolve_run_dir=True))
    typer.echo(f"rehearsal: SuperLink + {clients} SuperNodes on 127.0.0.1, logs in {workdir / 'logs'}", err=True)
    start = time.perf_counter()
    with exit_on(DeployError, code=1), LocalFederation(workdir, nodes) as federation:
        run_id, status = federation.run(app_dir, timeout=timeout)
        if status != "finished:completed":
            typer.echo(pull_logs(run_id, federation.env)[-6000:], err=True)
    _print_outcome(run_dir, run_id, status, time.perf_counter() - start)
    if status != "finished:completed":
        raise typer.Exit(1)


@deploy_app.command("app", context_settings=OVERRIDES, help=(
    "Write the Flower app folder of a config (pyproject.toml with the resolved experiment in its run config), "
    "to run by hand: flwr run DIR <connection> --stream.\n\n"
    "Example: fedpeft deploy app --config configs/quickstart.yaml --out flower-app --run-dir /srv/runs/q1"))
@with_settings
def app_folder(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", "-c", help="Experiment YAML."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write."),
    resume: bool = typer.Option(False, "--resume", help="Continue --run-dir from its last completed round."),
    options: dict = None,
) -> None:
    _need_flower()
    from fedpeft.deploy.flower.app import write_app

    cfg = _load(config, list(ctx.args))
    settings = _settings(options, resume)
    folder = write_app(out, cfg, **settings)
    typer.echo(f"wrote {folder / 'pyproject.toml'}; run it with: flwr run {folder} <connection> --stream")


@deploy_app.command("run", context_settings=OVERRIDES, help=(
    "Submit a config to a running SuperLink and wait until Flower reports the run finished (the exit code "
    "follows the run's status, not flwr's).\n\n"
    "Example: fedpeft deploy run --config configs/quickstart.yaml --superlink link.example.org:9093 "
    "--root-certificates ca.crt --run-dir /srv/runs/q1 --min-clients 3 --straggler-timeout 120"))
@with_settings
def run(
    ctx: typer.Context,
    config: Path = typer.Option(..., "--config", "-c", help="Experiment YAML."),
    superlink: str = typer.Option(None, "--superlink", help="SuperLink address host:port (saved as connection "
                                  "'fedpeft' in $FLWR_HOME/config.toml)."),
    connection: str = typer.Option(None, "--connection", help="An existing connection in $FLWR_HOME/config.toml."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP (rehearsals only)."),
    root_certificates: Path = typer.Option(None, "--root-certificates", help="CA certificate (PEM) of the SuperLink."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait for the run to finish."),
    resume: bool = typer.Option(False, "--resume", help="Continue --run-dir from its last completed round."),
    timeout: float = typer.Option(86400.0, "--timeout", help="Give up waiting after this many seconds."),
    options: dict = None,
) -> None:
    _need_flower()
    import os
    import time

    from fedpeft.deploy.flower.app import write_app
    from fedpeft.deploy.flower.local import DeployError, flower_env, submit, wait_for_run, write_connection

    if bool(superlink) == bool(connection):
        raise typer.BadParameter("give either --superlink HOST:PORT or --connection NAME", param_hint="--superlink")
    cfg = _load(config, list(ctx.args))
    env = flower_env(os.environ.get("FLWR_HOME"))
    if superlink:
        home = Path(env.get("FLWR_HOME") or Path.home() / ".flwr")
        write_connection(home, superlink, name="fedpeft", insecure=insecure,
                         root_certificates=str(root_certificates.resolve()) if root_certificates else None,
                         make_default=False)
        connection = "fedpeft"
    settings = _settings(options, resume)
    app_dir = write_app(Path(tempfile.mkdtemp(prefix="fedpeft-app-")), cfg, **settings)
    start = time.perf_counter()
    with exit_on(DeployError, code=1):
        run_id = submit(app_dir, env, connection)
        typer.echo(f"submitted Flower run {run_id} (logs: flwr log {run_id} {connection})", err=True)
        if not wait:
            return
        status = wait_for_run(run_id, env, connection, timeout=timeout, poll=5.0)
    typer.echo(f"Flower run {run_id}: {status} ({time.perf_counter() - start:.1f} s)")
    if options["run_dir"] and Path(options["run_dir"]).is_dir():
        _print_outcome(Path(options["run_dir"]), run_id, status, time.perf_counter() - start)
    if status != "finished:completed":
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(deploy_app, name="deploy")
