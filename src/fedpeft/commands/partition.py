"""``fedpeft partition``: show how a config splits its data over clients, without loading any model."""

from __future__ import annotations

from pathlib import Path

import typer

from fedpeft.commands.common import OVERRIDES, exit_on


def parse_sizes(text: str) -> dict[str, int]:
    """``"sst2=67349,mrpc=3668"`` -> ``{"sst2": 67349, "mrpc": 3668}`` (order kept)."""
    sizes: dict[str, int] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise typer.BadParameter(f"size {item!r} is not of the form name=count", param_hint="--sizes")
        try:
            count = int(value)
        except ValueError:
            raise typer.BadParameter(f"size {item!r}: {value!r} is not an integer", param_hint="--sizes") from None
        if count < 0:
            raise typer.BadParameter(f"size {item!r}: count must be >= 0", param_hint="--sizes")
        sizes[name.strip()] = count
    if not sizes:
        raise typer.BadParameter("no sizes given", param_hint="--sizes")
    return sizes


def _rich_table(title: str, values, table):
    from rich.table import Table

    out = Table(title=title)
    out.add_column("client", justify="right")
    for value in values:
        out.add_column(str(value), justify="right")
    out.add_column("total", justify="right", style="bold")
    for c, row in enumerate(table):
        cells = [str(int(v)) if v else "[dim]0[/dim]" for v in row]
        out.add_row(f"#{c}", *cells, str(int(row.sum())))
    totals = table.sum(axis=0)
    out.add_section()
    out.add_row("total", *(str(int(v)) for v in totals), str(int(totals.sum())), style="bold")
    return out


def register(app: typer.Typer) -> None:
    @app.command(
        "partition",
        context_settings=OVERRIDES,
        help=(
            "Show the client x label table of a config's data partition (with totals) and save it as CSV. "
            "Loads the data only, never a model.\n\n"
            "Examples:\n\n"
            "  fedpeft partition --config configs/quickstart.yaml\n\n"
            "  fedpeft partition --config configs/quickstart.yaml data.partition.alpha=0.1 federation.num_clients=20\n\n"
            "  fedpeft partition --sizes sst2=67349,mrpc=3668,qqp=363846,qnli=104743,rte=2490 "
            "seed=42 data.partition.kind=task_dirichlet data.partition.min_frac=0.01   (FL-TAC's GLUE table, no data)\n\n"
            "Any config key can be overridden as key.sub=value after the options."
        ),
    )
    def partition_command(
        ctx: typer.Context,
        config: Path = typer.Option(None, "--config", "-c", help="Experiment YAML (default: the built-in defaults)."),
        out: Path = typer.Option(None, "--out", "-o", help="CSV path (default: <output.dir>/<name>-partition.csv)."),
        sizes: str = typer.Option(None, "--sizes", help="Partition labels of these sizes instead of loading data: "
                                  "name=count,name=count (in task order)."),
        plain: bool = typer.Option(False, "--plain", help="Print a plain-text table (FL-TAC's layout) instead of a rich one."),
    ) -> None:
        from fedpeft.config import ConfigError, load_config
        from fedpeft.data.partition import (
            count_table,
            empty_clients,
            format_table,
            partition,
            save_table_csv,
        )
        from fedpeft.data.sources import DataError

        label_sets: list[str] = []
        with exit_on(ConfigError, DataError, ValueError, FileNotFoundError):
            cfg = load_config(config, list(ctx.args), check_method=False)  # no method runs here
            pcfg = cfg.data.partition
            num_clients = cfg.federation.num_clients
            if sizes:
                size_map = parse_sizes(sizes)
                labels = [name for name, n in size_map.items() for _ in range(n)]
                order = list(size_map)
                source = "--sizes"
            else:
                from fedpeft.data.dataset import load_experiment_data

                data = load_experiment_data(cfg)
                labels = data.labels()
                order = None
                source = cfg.data.source
                label_sets = data.label_set_lines()
            parts = partition(labels, num_clients, pcfg.kind, cfg.seed, alpha=pcfg.alpha, min_frac=pcfg.min_frac,
                              classes_per_client=pcfg.classes_per_client, label_order=order)

        values, table = count_table(labels, parts, order)
        title = (f"partition of {source} by {'task' if sizes else pcfg.by}: kind={pcfg.kind}, clients={num_clients}, "
                 f"alpha={pcfg.alpha}, min_frac={pcfg.min_frac}, seed={cfg.seed}")
        from rich.console import Console

        console = Console()
        widths = [max(len(str(v)), len(str(int(table[:, i].sum())))) for i, v in enumerate(values)]
        needed = 8 + sum(w + 3 for w in widths) + len(str(int(table.sum()))) + 6
        if plain or needed > console.width:  # rich would squeeze the columns and cut the numbers
            typer.echo(f"=== {title} ===")
            typer.echo(format_table(values, table))
        else:
            console.print(_rich_table(title, values, table))
        for line in label_sets:
            typer.echo(line)
        holders = (table > 0).sum(axis=0)
        typer.echo("clients holding each value: " + ", ".join(f"{v} {int(h)}/{num_clients}" for v, h in zip(values, holders)))
        empty = empty_clients(parts)
        if empty:
            typer.echo(f"warning: {len(empty)} client(s) received no records: {', '.join(f'#{c}' for c in empty)}")
        path = out or Path(cfg.output.dir) / f"{cfg.name}-partition.csv"
        typer.echo(f"saved {save_table_csv(path, values, table)}")
