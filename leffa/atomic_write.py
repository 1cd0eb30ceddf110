"""Writing a file so that its final name only ever holds a whole file.

:func:`write_atomically` writes to a hidden temporary name in the file's own folder (created with
``O_EXCL``, so never into someone else's file), flushes and fsyncs it, renames it onto the final
name (``os.replace``: atomic within one file system) and fsyncs the folder. A reader, or a kill at
any moment, sees the previous file or the new one, never a part. A kill leaves at most a stale
``.<name>.<random>.tmp`` beside it; the next write of the same name removes those.
"""

from __future__ import annotations

import glob
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["write_atomically"]

TEMP_SUFFIX = ".tmp"


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a binary file that becomes ``path`` once complete; returns ``path``."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    temp = folder / f"{prefix}{secrets.token_hex(6)}{TEMP_SUFFIX}"
    # mode 0o666 less the umask, like a plain open()
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_folder(folder)
    # leftovers of killed writes of this name (escaped: a name may hold glob characters)
    for stale in folder.glob(f"{glob.escape(prefix)}*{TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (the folder's entry), where the OS allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder: the rename is still atomic
        pass
    finally:
        os.close(fd)
