"""Checkpoint files written atomically in their own folder (``trainer.plugins`` in the configs).

Lightning's ``TorchCheckpointIO`` writes a local checkpoint to a temporary file in ``$TMPDIR``
and then moves it onto the final name. When ``$TMPDIR`` is on another file system (a node-local
disk or tmpfs, usual on clusters) the move is a copy that first truncates the final file: a job
killed during that copy leaves ``last.ckpt`` empty or cut short, and the previous good one is gone.

``AtomicCheckpointIO`` writes to a hidden temporary name in the checkpoint's own folder, flushes
and fsyncs it, renames it onto the final name (``os.replace``: atomic within one file system) and
fsyncs the folder, so the final name always holds either the previous checkpoint or the new one,
whole (``leffa.atomic_write``).

Sharded strategies (``FSDPStrategy`` with ``state_dict_type: sharded``, ``ModelParallelStrategy``)
write checkpoint folders through torch's distributed checkpoint and never call this plugin; only
full-state checkpoints (DDP, one device) go through it.

A save that fails for want of space (or on another write error) is one line, ``error: no space
left saving <path>; the previous checkpoint is kept``, rather than torch's zip-writer traceback
(``enforce fail at inline_container.cc``): the temporary file is removed and the final name still
holds the previous checkpoint.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from leffa.atomic_write import write_atomically
from leffa.errors import UserError

__all__ = ["AtomicCheckpointIO", "CheckpointWriteError", "atomic_torch_save"]


#: errors of a write that found no room: the disk, or the user's quota, is full
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (one line for the user; still an ``OSError`` to code that
    catches write failures)."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in ``path``'s folder and a rename. A
    failed write (a full disk, an I/O error) is a :class:`UserError` naming ``path``."""
    existed = os.path.exists(path)
    try:
        write_atomically(path, lambda file: torch.save(obj, file))
    except (OSError, RuntimeError) as error:
        cause = _write_error(error)
        if cause is None:
            raise
        kept = "the previous checkpoint is kept" if existed else "nothing was written"
        if isinstance(cause, OSError) and cause.errno in NO_SPACE:
            raise CheckpointWriteError(f"no space left saving {path}; {kept}") from error
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause).splitlines()[0]
        raise CheckpointWriteError(f"could not save {path} ({reason}); {kept}") from error


def _write_error(error: BaseException) -> BaseException | None:
    """The write failure behind ``error``: an ``OSError`` in its chain (torch's zip writer raises
    ``RuntimeError: [enforce fail at inline_container.cc] ...`` from the file's own OSError), or
    the zip writer's error itself; None for anything else (a bug keeps its traceback)."""
    seen, current = set(), error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        current = current.__cause__ or current.__context__
    message = str(error)
    if isinstance(error, RuntimeError) and ("inline_container" in message or "file write failed" in message):
        return error
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic in the checkpoint's own folder (see the
    module docstring); remote paths (``s3://``, ...) keep Lightning's upload, which is atomic per
    object."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, os.fspath(path).removeprefix("file://"))
