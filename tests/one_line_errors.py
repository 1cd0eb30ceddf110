"""Asserting the project's error contract in tests: a user error is exit status 2 and exactly one
``error:`` line on stderr, naming what it is about, with no traceback."""

from __future__ import annotations

import pytest

from leffa.cli import cli_main


def error_line(capsys, error: pytest.ExceptionInfo, *named: object, quiet: bool = False) -> str:
    """Exit status 2 and exactly one ``error:`` line on stderr, naming each of ``named``, no traceback;
    ``quiet``: nothing on stdout either (refused before any work)."""
    assert error.value.code == 2, error.value.code
    captured = capsys.readouterr()
    assert not quiet or captured.out == "", captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(lines), lines
    for item in named:
        assert str(item) in errors[0], errors[0]
    return errors[0]


def refused(capsys, argv: list[str], *named: object) -> str:
    """``leffa <argv>`` refused with :func:`error_line`'s contract; returns the line."""
    with pytest.raises(SystemExit) as error:
        cli_main(argv)
    return error_line(capsys, error, *named)
