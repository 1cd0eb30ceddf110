"""Reading model weights from a previous stage: Lightning checkpoints (live or EMA weights), sharded
checkpoint folders (``torch.distributed.checkpoint``) or safetensors files. Only tensors are ever
loaded (``weights_only=True`` / safetensors / an allow-list unpickler for the shard index)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["read_state_dict", "load_weights", "is_sharded_checkpoint", "read_sharded_state_dict"]

WEIGHTS = ("ema", "live")


def read_state_dict(path: str | Path, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The model state dict stored in ``path``.

    Args:
        path: a Lightning ``.ckpt``, a ``torch.save``d state dict (also the authors' released
            ``virtual_tryon*.pth``), a ``.safetensors`` file, a folder written by ``leffa.export``,
            or a sharded checkpoint folder (``ModelParallelStrategy``, or ``FSDPStrategy`` with
            ``state_dict_type: sharded``; see :func:`read_sharded_state_dict`).
        weights: ``"ema"``: the checkpoint's ``state_dict``, which holds the EMA weights when
            ``EMAWeightAveraging`` was on (and the live ones otherwise); ``"live"``: the raw
            training weights (``current_model_state``, written by the EMA callback), falling back
            to ``state_dict`` when the run had no EMA.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; valid: {', '.join(WEIGHTS)}")
    from leffa.export import is_export_folder, read_export_state_dict
    from leffa.released import convert_released_state_dict, is_released_state_dict

    path = Path(path).expanduser()
    if is_export_folder(path):
        return read_export_state_dict(path)
    if is_sharded_checkpoint(path):
        return read_sharded_state_dict(path, weights)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if weights == "live" and "current_model_state" in checkpoint:
        return checkpoint["current_model_state"]
    state = checkpoint.get("state_dict", checkpoint)
    # the authors' released virtual_tryon*.pth: one flat dict of unet.*, unet_encoder.*, vae.*
    return convert_released_state_dict(state) if is_released_state_dict(state) else state


def load_weights(module: nn.Module, state_dict: dict[str, torch.Tensor], optional: tuple[str, ...] = (),
                 source: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``module``; every key must match except those containing a
    substring of ``optional`` (e.g. new register tokens), and shapes must agree."""
    own = module.state_dict()
    for name, tensor in state_dict.items():
        if name in own and own[name].shape != tensor.shape:
            raise ValueError(
                f"{source}: {name} has shape {tuple(tensor.shape)} but the model wants {tuple(own[name].shape)} "
                "(was it trained with another conditioning layout or model size?)"
            )
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not any(o in k for o in optional)]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


# ---------------------------------------------------------------- sharded checkpoint folders

# Lightning writes a sharded checkpoint as a torch.distributed.checkpoint (DCP) folder: ``.metadata``
# (the index of every tensor's shards), ``__<rank>_0.distcp`` (each rank's shards) and ``meta.pt``
# (everything else: global step, loops, hyper-parameters, callback states). The model's tensors are
# under one top-level key: "state_dict" (ModelParallelStrategy) or "model" (FSDPStrategy).
MODEL_GROUPS = ("state_dict", "model")
LIGHTNING_META = "meta.pt"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a DCP checkpoint folder (it holds a ``.metadata`` index)."""
    return (Path(path) / ".metadata").is_file()


class _ShardIndexUnpickler(pickle.Unpickler):
    """Reads DCP's ``.metadata`` (a plain pickle) allowing only the classes of the index itself."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
             ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}

    def find_class(self, module: str, name: str):
        dtype = getattr(torch, name, None) if module == "torch" else None
        if module in self.MODULES or (module, name) in self.NAMES or isinstance(dtype, torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in a checkpoint index; refusing to load it")


def _read_shard_index(path: Path):
    with open(path / ".metadata", "rb") as file:
        return _ShardIndexUnpickler(file).load()


def read_sharded_state_dict(path: str | Path, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict of a sharded checkpoint folder, on CPU.

    Works in a single process without a process group: DCP's own reader assembles each tensor from
    every rank's shards into tensors allocated from the index. Only the model's tensors are read,
    not the optimizer state. Tensor data is read with ``torch.load(weights_only=True)``; the index
    with an allow-list unpickler.

    EMA: ``EMAWeightAveraging`` cannot run with a sharded model (``leffa.parallel`` refuses it), so
    a sharded folder written by this project holds the live weights only; ``weights="ema"`` then
    warns and returns them. Should a folder hold EMA weights (``meta.pt`` carries the callback's
    ``current_model_state``), the sharded tensors are the EMA ones and ``"live"`` is an error: the
    live weights were written to ``meta.pt`` by rank 0 alone, i.e. only its shards.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path).expanduser()
    index = _read_shard_index(path)
    groups = {key.split(".", 1)[0] for key in index.state_dict_metadata}
    group = next((g for g in MODEL_GROUPS if g in groups), None)
    if group is None:
        raise ValueError(f"{path}: a sharded checkpoint without model weights (top-level keys {sorted(groups)}, "
                         f"expected one of {', '.join(MODEL_GROUPS)})")
    meta_keys = set()
    if (path / LIGHTNING_META).is_file():
        meta_keys = set(torch.load(path / LIGHTNING_META, map_location="cpu", weights_only=True))
    if "current_model_state" in meta_keys and weights == "live":
        raise ValueError(f"{path}: the live weights of this EMA checkpoint were saved by rank 0 only (one shard); "
                         "use weights='ema'")
    if "current_model_state" not in meta_keys and weights == "ema":
        warnings.warn(f"{path} holds no EMA weights (EMAWeightAveraging does not run with sharded strategies); "
                      "reading the live weights", stacklevel=3)
    # "<group>.<name>" -> empty tensors of the full shape, filled in place by dcp.load
    prefix = group + "."
    state = {
        key.removeprefix(prefix): torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in index.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }
    reader = dcp.FileSystemReader(path)
    reader.read_metadata = lambda *args, **kwargs: index  # the index read above, not a second pickle.load
    with warnings.catch_warnings():
        # no_dist=True is the intent; DCP warns about it all the same
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({group: state}, storage_reader=reader, no_dist=True)
    return state
