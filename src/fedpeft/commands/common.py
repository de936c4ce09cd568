"""What every command does the same way: take ``key.sub=value`` config overrides after its options, and
turn the errors of bad input (config, data, paths) into one ``error: ...`` line on stderr and an exit code
instead of a traceback. Not a command itself (``COMMAND_MODULES`` does not list it)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer

# Commands that accept config overrides (key.sub=value) after their options.
OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": False}


def fail(message: str, code: int = 2) -> NoReturn:
    """``error: message`` on stderr and exit with ``code`` (2: bad input, 1: the work itself failed).
    Plain text, not rich: rich would wrap long names and paths and read ``[...]`` in them as markup."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code) from None


@contextmanager
def exit_on(*errors: type[BaseException], code: int = 2,
            message: Callable[[BaseException], str] = str) -> Iterator[None]:
    """Run the block; one of ``errors`` raised in it becomes ``fail(message(exc), code)``. Others pass
    through, ``typer.Exit`` included, so blocks nest: the inner one is asked first."""
    try:
        yield
    except errors as exc:
        fail(message(exc), code)
