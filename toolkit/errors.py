"""User-facing errors: the CLI prints these as one line and exits non-zero, never with a traceback."""

from __future__ import annotations


class SftoolError(Exception):
    """A problem the user can fix (bad input, missing file, refused connection).

    Anything else that escapes is a bug and keeps its traceback.
    """

    exit_code: int = 2
