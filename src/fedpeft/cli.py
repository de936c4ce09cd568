"""The ``fedpeft`` command line. Commands live in ``fedpeft.commands.<name>``; this file only wires them."""

from __future__ import annotations

import importlib
import logging
import os
import warnings

import typer

from fedpeft.commands import COMMAND_MODULES

app = typer.Typer(
    name="fedpeft",
    help=(
        "Federated parameter-efficient fine-tuning of language models.\n\n"
        "Start with: fedpeft run --config configs/quickstart.yaml\n\n"
        "Override any config key on the command line: fedpeft run --config X.yaml federation.rounds=3"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        # Library chatter (weight-loading bars, deprecation notices of transformers used by peft) hides
        # the run's own progress display; --verbose shows it again.
        warnings.filterwarnings("ignore", category=FutureWarning)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"fedpeft.commands.{_name}")
    except ModuleNotFoundError as exc:  # a command whose module is not written yet
        if exc.name != f"fedpeft.commands.{_name}":
            raise
        continue
    _module.register(app)


def main() -> None:  # pragma: no cover - console entry point
    app()
