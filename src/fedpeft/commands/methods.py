"""``fedpeft methods``: the registered federated methods (``method.name``), their capabilities and
options, and the server optimizers with their per-rule defaults. Everything comes from the registry."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from fedpeft.strategies import method_catalog, method_class
from fedpeft.strategies.base import ALL_PEFT_TYPES
from fedpeft.strategies.registry import option_rows
from fedpeft.strategies.server_optimizers import SERVER_OPTIMIZERS, rule_defaults


def _flags(entry: dict) -> str:
    flags = [name for name, on in (("personalised", entry["personalized"]), ("secure-mean", entry["secure_mean"]),
                                   ("edits base weights", entry["edits_base_weights"])) if on]
    types = entry["peft_types"]
    dp = "client DP: " + ("/".join(entry["dp_modes"]) if entry.get("dp_modes") else "no")  # privacy.mode
    flower = "Flower: " + ("no" if entry.get("flower_refusal") else "yes")  # fedpeft deploy
    # model families it refuses (model.head=seq2seq / image_classification; the reason is in the error)
    families = [f"{label}: no" for key, label in (("seq2seq", "seq2seq"), ("image", "images"))
                if entry.get(key, "runs") != "runs"]
    return ", ".join(flags + ["peft: " + ("any" if set(types) >= set(ALL_PEFT_TYPES) else "/".join(types)), dp, flower,
                              *families])


def methods_table() -> Table:
    table = Table(title="fedpeft methods (method.name)")
    for column in ("name", "what it does", "method.options", "capabilities", "server optimizer"):
        table.add_column(column, overflow="fold")
    for entry in method_catalog():
        table.add_row(entry["name"], entry["summary"], ", ".join(entry["options"]) or "-", _flags(entry),
                      entry["server_optimizer"])
    return table


def options_table(name: str) -> Table:
    cls = method_class(name)
    table = Table(title=f"method.options of {cls.name}")
    for column in ("option", "type", "default", "bounds", "description"):
        table.add_column(column, overflow="fold")
    for row in option_rows(cls.Options):
        table.add_row(row["name"], row["type"], repr(row["default"]), row["bounds"] or "-", row["description"])
    return table


def server_optimizers_table() -> Table:
    table = Table(title="server optimizers (method.server_optimizer.name; unset hyperparameters take these defaults)")
    for column in ("name", "rule", "defaults"):
        table.add_column(column, overflow="fold")
    for name, rule in SERVER_OPTIMIZERS.items():
        defaults = ", ".join(f"{k}={v:g}" for k, v in rule_defaults(name).items()) or "-"
        table.add_row(name, (rule.__doc__ or "").strip(), defaults)
    return table


def register(app: typer.Typer) -> None:
    @app.command("methods", help="List the federated methods (method.name), their options and capabilities, and the "
                 "server optimizers with their defaults. With a NAME: that method's options in full.")
    def methods(name: str = typer.Argument(None, help="A method: show its options (type, default, bounds).")) -> None:
        console = Console()
        if name:
            try:
                console.print(options_table(name))
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="NAME") from None
            return
        console.print(methods_table())
        console.print(server_optimizers_table())
