"""``fedpeft methods``: the federated methods that ``method.name`` accepts, with their options."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table


def register(app: typer.Typer) -> None:
    @app.command("methods", help="List the federated methods (method.name), their options and server-optimizer support.")
    def methods() -> None:
        from fedpeft.strategies import method_catalog
        from fedpeft.strategies.server_optimizers import SERVER_OPTIMIZERS

        table = Table(title="fedpeft methods (method.name)")
        for column in ("name", "what it does", "method.options", "server optimizer"):
            table.add_column(column, overflow="fold")
        for entry in method_catalog():
            table.add_row(entry["name"], entry["summary"] + (" [personalised]" if entry["personalized"] else ""),
                          ", ".join(entry["options"]) or "-", entry["server_optimizer"])
        console = Console()
        console.print(table)
        console.print("server optimizers (method.server_optimizer.name): " + ", ".join(sorted(SERVER_OPTIMIZERS)))
