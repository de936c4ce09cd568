"""Sub-commands of the ``fedpeft`` CLI. Each module defines ``register(app: typer.Typer)``; ``cli.py``
registers every module listed in ``COMMAND_MODULES`` (in that order, so ``--help`` lists them so)."""

COMMAND_MODULES = ["run", "methods", "partition", "data", "eval", "report", "deploy", "sweep", "attack"]
