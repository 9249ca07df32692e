"""User-facing errors: the CLI prints these as one line and exits non-zero, never with a traceback."""

from __future__ import annotations


class SftoolError(Exception):
    """A problem the user can fix (bad input, missing file, refused connection).

    Anything else that escapes is a bug and keeps its traceback.
    """

    exit_code: int = 2


def exit_for(exc: SftoolError):
    """Print ``exc`` as one ``error:`` line on stderr and return the ``typer.Exit`` to raise (sub-apps)."""
    import typer

    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(exc.exit_code)
