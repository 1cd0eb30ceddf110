"""Reading the small text files that list pairs (``pairs.txt``, dataset pair lists, CSV indexes).

Both the prediction folder (``leffa.data.predict_folder``) and the dataset converters (``data_prep``) read
their pair files here, so a bad file gives the same one-line :class:`~leffa.errors.UserError`
everywhere: ``<path>:<line>: <what is wrong>``. Files are UTF-8 (a leading byte-order mark is
dropped); line ends may be ``\\n`` or ``\\r\\n``; blank lines are ignored.
"""

from __future__ import annotations

from pathlib import Path

from leffa.errors import UserError

__all__ = ["read_text_lines", "read_pair_file", "check_file_names"]

_SHOWN = 80  # characters of an offending line quoted in an error


def read_text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file without line ends; bytes that are not UTF-8 name their line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from err
    data = data.removeprefix(b"\xef\xbb\xbf")
    lines = []
    for number, raw in enumerate(data.splitlines(), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise UserError(
                f"{path}:{number}: not UTF-8 text (byte {raw[err.start:err.start + 1]!r} at column {err.start + 1}); "
                "save the file as UTF-8"
            ) from None
    return lines


def quote(line: str) -> str:
    """An offending line as shown in an error message (shortened)."""
    line = line.strip()
    return repr(line if len(line) <= _SHOWN else line[:_SHOWN] + "...")


def read_pair_file(path: Path, columns: tuple[str, ...]) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line of a whitespace-separated file whose lines
    have exactly one field per name in `columns`."""
    rows = []
    for number, line in enumerate(read_text_lines(path), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(columns):
            raise UserError(
                f"{path}:{number}: expected {len(columns)} columns ({' '.join(columns)}), got {len(fields)}: "
                f"{quote(line)}"
            )
        rows.append((number, fields))
    return rows


def check_file_names(path: Path, number: int, names: list[str]) -> list[str]:
    """`names` from line `number` of `path`, refused (UserError) unless each is a plain file name:
    names from data files are joined to dataset folders, so none may lead out of them."""
    for name in names:
        if name in (".", "..") or Path(name).name != name or "\\" in name:
            raise UserError(f"{path}:{number}: {name!r} is not a plain file name; pair files name files, not paths")
    return names
