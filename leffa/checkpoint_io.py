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
"""

from __future__ import annotations

import os
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from leffa.atomic_write import write_atomically

__all__ = ["AtomicCheckpointIO", "atomic_torch_save"]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in ``path``'s folder and a rename."""
    write_atomically(path, lambda file: torch.save(obj, file))


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic in the checkpoint's own folder (see the
    module docstring); remote paths (``s3://``, ...) keep Lightning's upload, which is atomic per
    object."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, os.fspath(path).removeprefix("file://"))
