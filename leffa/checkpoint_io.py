"""Checkpoint files written atomically in their own folder (``trainer.plugins`` in the configs).

Lightning's ``TorchCheckpointIO`` writes a local checkpoint to a temporary file in ``$TMPDIR``
and then moves it onto the final name. When ``$TMPDIR`` is on another file system (a node-local
disk or tmpfs, usual on clusters) the move is a copy that first truncates the final file: a job
killed during that copy leaves ``last.ckpt`` empty or cut short, and the previous good one is gone.

``AtomicCheckpointIO`` writes to a hidden temporary name in the checkpoint's own folder, flushes
and fsyncs it, renames it onto the final name (``os.replace``: atomic within one file system) and
fsyncs the folder, so the final name always holds either the previous checkpoint or the new one,
whole. A kill leaves at most a stale ``.<name>.<random>.tmp`` beside it; the next save of the same
name removes it.

Sharded strategies (``FSDPStrategy`` with ``state_dict_type: sharded``, ``ModelParallelStrategy``)
write checkpoint folders through torch's distributed checkpoint and never call this plugin; only
full-state checkpoints (DDP, one device) go through it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "atomic_torch_save"]

TEMP_SUFFIX = ".tmp"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in ``path``'s folder and a rename."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f"{_temp_prefix(path)}{secrets.token_hex(6)}{TEMP_SUFFIX}"
    # O_EXCL: never write into someone else's file; mode 0o666 less the umask, like a plain open()
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_folder(folder)
    # leftovers of saves of this name that were killed before their rename
    for stale in folder.glob(f"{_temp_prefix(path)}*{TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic in the checkpoint's own folder (see the
    module docstring); remote paths (``s3://``, ...) keep Lightning's upload, which is atomic per
    object."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, os.fspath(path).removeprefix("file://"))
