"""User errors: bad input that a person can fix (a missing file, a wrong key, a bad value).

Raise :class:`UserError` (or :class:`MissingFileError`) with one line that names the file or key
and says what to do. The command-line entry points (``leffa ...``, ``python -m data_prep ...``)
print that line (also for a ``FileNotFoundError``, whose message names the path) and exit with
status 2; ``LEFFA_DEBUG=1`` shows the traceback too. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

__all__ = ["UserError", "MissingFileError", "DEBUG_ENV", "user_errors_as_one_line"]

DEBUG_ENV = "LEFFA_DEBUG"
T = TypeVar("T")


class UserError(ValueError):
    """Bad input from the user (a bad value, key or file); its message is the whole report."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named, or that a config names, is not there."""


def user_errors_as_one_line(main: Callable[[], T], extra: tuple[type[BaseException], ...] = ()) -> T:
    """Run ``main``; a :class:`UserError` (or one of ``extra``) becomes ``error: <message>`` on
    stderr and exit status 2, unless ``$LEFFA_DEBUG`` is set to a non-empty value other than 0."""
    try:
        return main()
    except (UserError, *extra) as error:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
