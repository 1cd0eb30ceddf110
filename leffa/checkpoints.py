"""Reading a trained model from every checkpoint form: Lightning checkpoints (live or EMA weights),
sharded checkpoint folders (``torch.distributed.checkpoint``), folders written by ``leffa export``,
the authors' released ``.pth`` files and safetensors files.

Only tensors and plain values are ever loaded: ``torch.load(weights_only=True)``, safetensors, and
for the shard index an unpickler that allows an explicit list of (module, name) pairs. Every
problem with a user's file (missing, truncated, refused, of the wrong kind) is a one-line
:class:`~leffa.errors.UserError` naming the path.
"""

from __future__ import annotations

import json
import math
import operator
import pickle
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from leffa.architectures.registry import architecture_class, architecture_record, upgrade_settings
from leffa.errors import MissingFileError, UserError
from leffa.released import convert_released_state_dict, is_released_state_dict

__all__ = [
    "read_state_dict", "read_settings", "load_weights",
    "load_checkpoint_file", "check_checkpoint", "guard_checkpoint_loading", "is_export_folder",
    "read_export_state_dict", "is_sharded_checkpoint", "read_sharded_state_dict", "EXPORT_SETTINGS",
    "EXPORT_FOLDERS_KEY",
]

WEIGHTS = ("ema", "live")
# a folder written by ``leffa export``: one diffusers folder per component (the architecture's
# ``export_folders`` and the VAE), plus the module's settings and, under EXPORT_FOLDERS_KEY, the folders
EXPORT_SETTINGS = "leffa.json"
EXPORT_FOLDERS_KEY = "export_folders"
WEIGHTS_ONLY_HINT = ("it holds weights only, no model settings: give it as model.init_from together with a "
                     "config (leffa predict --config ... --model.init_from PATH)")


# ---------------------------------------------------------------- reading plain checkpoint files

def load_checkpoint_file(path: str | Path, mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU; a refused, truncated or foreign file is a
    :class:`UserError` naming it. ``mmap=True`` reads only the pickle, not the tensor data."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and _is_zip(path))
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        if refused or "Weights only load failed" in str(error):
            what = f" ({refused.group(1)})" if refused else ""
            raise UserError(f"{path}: refusing to load a checkpoint that holds code or objects other than "
                            f"tensors and plain values{what}") from error
        raise UserError(f"{path}: cannot read this checkpoint ({_first_line(error)}); is the file complete?") \
            from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read this checkpoint ({_first_line(error)}); is the file complete?") \
            from error
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path}: not a checkpoint (it holds a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(4) == b"PK\x03\x04"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------- every form

def is_export_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``leffa export`` (it holds ``leffa.json``)."""
    return (Path(path) / EXPORT_SETTINGS).is_file()


def read_state_dict(path: str | Path, weights: str = "ema",
                    released_components: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The model state dict stored in ``path``.

    Args:
        path: a Lightning ``.ckpt``, a ``torch.save``d state dict (also the authors' released
            ``virtual_tryon*.pth``), a ``.safetensors`` file, a folder written by ``leffa export``,
            or a sharded checkpoint folder (``ModelParallelStrategy``, or ``FSDPStrategy`` with
            ``state_dict_type: sharded``; see :func:`read_sharded_state_dict`).
        weights: ``"ema"``: the checkpoint's ``state_dict``, which holds the EMA weights when
            ``EMAWeightAveraging`` was on (and the live ones otherwise); ``"live"``: the raw
            training weights (``current_model_state``, written by the EMA callback), falling back
            to ``state_dict`` when the run had no EMA.
        released_components: the reading architecture's ``released_components`` (released prefix
            -> component), for the authors' ``.pth`` files; None: such a file is one error line.
    """
    if weights not in WEIGHTS:
        raise UserError(f"unknown weights {weights!r}; valid: {', '.join(WEIGHTS)}")
    path = _existing(path)
    if is_export_folder(path):
        return read_export_state_dict(path)
    if is_sharded_checkpoint(path):
        return read_sharded_state_dict(path, weights)
    _refuse_other_folder(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    checkpoint = load_checkpoint_file(path)
    if weights == "live" and "current_model_state" in checkpoint:
        return checkpoint["current_model_state"]
    state = checkpoint.get("state_dict", checkpoint)
    # the authors' released virtual_tryon*.pth: one flat dict of unet.*, unet_encoder.*, vae.*
    return convert_released_state_dict(state, released_components) if is_released_state_dict(state) else state


def read_settings(path: str | Path) -> dict:
    """The ``LeffaModule`` settings a checkpoint was trained with: a Lightning checkpoint's
    ``hyper_parameters``, a sharded folder's (in its ``meta.pt``), an export folder's ``leffa.json``
    (with the folder itself as the pretrained model). Weights-only forms (released ``.pth``,
    safetensors) have none: a :class:`UserError` says to use ``model.init_from``."""
    path = _existing(path)
    if is_export_folder(path):
        settings, folders = _read_export(path)
        record = architecture_record(settings.get("architecture", "dual_unet"))
        record["init_args"].update(architecture_class(record["class_path"]).export_args(path))
        settings.update(architecture=record, pretrained_model=str(path), unet_config=None, vae_config=None)
    elif is_sharded_checkpoint(path):
        _read_shard_index(path)
        meta = path / LIGHTNING_META
        settings = load_checkpoint_file(meta, mmap=True).get("hyper_parameters") if meta.is_file() else None
    else:
        _refuse_other_folder(path)
        if path.suffix == ".safetensors":
            raise UserError(f"{path}: {WEIGHTS_ONLY_HINT}")
        settings = load_checkpoint_file(path, mmap=True).get("hyper_parameters")
    if not isinstance(settings, dict):
        raise UserError(f"{path}: {WEIGHTS_ONLY_HINT}")
    settings = upgrade_settings({k: v for k, v in settings.items() if not k.startswith("_")})
    # written before model.cross_attention existed, when the text cross-attention was always removed
    settings.setdefault("cross_attention", "removed")
    return settings


def load_weights(module: nn.Module, state_dict: dict[str, torch.Tensor], optional: tuple[str, ...] = (),
                 source: str = "checkpoint", target: str = "the model") -> None:
    """Load ``state_dict`` into ``module``; every key must match except those containing a
    substring of ``optional`` (e.g. new register tokens), and shapes must agree. ``source`` and
    ``target`` name the two sides in the one-line error (e.g. the checkpoint and the base model)."""
    own = module.state_dict()
    for name, tensor in state_dict.items():
        if name in own and own[name].shape != tensor.shape:
            raise UserError(
                f"{source}: {name} has shape {tuple(tensor.shape)} but {target} wants {tuple(own[name].shape)} "
                "(another base model, e.g. SD1.5 against SDXL, another conditioning layout or model size?)"
            )
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not any(o in k for o in optional)]
    if missing or unexpected:
        raise UserError(
            f"{source} does not match {target}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingFileError(f"checkpoint not found: {path}")
    return path


def _refuse_other_folder(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"{path}: a folder that is neither a sharded checkpoint (no {SHARD_INDEX}) nor a "
                        f"leffa export (no {EXPORT_SETTINGS}); give a checkpoint file or such a folder")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path}: cannot read this safetensors file ({_first_line(error)})") from error


def _read_export(path: Path) -> tuple[dict, dict[str, str]]:
    """An export folder's settings (``leffa.json``, without the folders) and its folders (export
    folder -> module attribute), each folder's weights checked to read. Exports written before the
    folders were recorded get their architecture's. A folder name that is not one plain name (it
    comes from a file) is one error line."""
    file = path / EXPORT_SETTINGS
    try:
        settings = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise UserError(f"{file}: not valid JSON ({_first_line(error)})") from error
    if not isinstance(settings, dict):
        raise UserError(f"{file}: expected a mapping of settings")
    settings = upgrade_settings(settings)
    folders = settings.pop(EXPORT_FOLDERS_KEY, None)
    if folders is None:
        record = architecture_record(settings.get("architecture", "dual_unet"))
        folders = {**architecture_class(record["class_path"]).export_folders, "vae": "vae"}
    if not isinstance(folders, dict) or not all(
            isinstance(f, str) and isinstance(a, str) and f and a and "/" not in f and "\\" not in f
            and not f.startswith(".") and a.isidentifier() for f, a in folders.items()):
        raise UserError(f"{file}: {EXPORT_FOLDERS_KEY} must map plain folder names to component names")
    _check_export_weights(path, folders)
    return settings, folders


def _check_export_weights(path: Path, folders: dict[str, str]) -> None:
    """Every safetensors file of an export folder's components reads as one (safetensors' own check
    of its header against the file's size), before diffusers' ``from_pretrained`` reads the folder
    (it would fail inside diffusers, with a traceback): a :class:`UserError` naming the file."""
    for folder in folders:
        for file in sorted((path / folder).glob("*.safetensors")):
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except (SafetensorError, OSError) as error:
                raise UserError(f"{file}: cannot read this safetensors file ({_first_line(error)}); is the "
                                "export complete? Export the checkpoint again") from error


def read_export_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The module state dict of an exported folder (every component, registers included)."""
    path = _existing(path)
    state = {}
    for folder, attribute in _read_export(path)[1].items():
        files = sorted((path / folder).glob("*.safetensors"))
        if not files:
            raise MissingFileError(f"no safetensors weights in {path / folder}")
        for file in files:
            state.update({f"{attribute}.{k}": v for k, v in _read_safetensors(file).items()})
    return state


# ---------------------------------------------------------------- resuming through the Trainer

def check_checkpoint(path: str | Path) -> None:
    """Check what the Trainer's ``ckpt_path`` is about to load: it exists, and it reads as tensors and
    plain values (a checkpoint file with ``weights_only=True``; a sharded folder's index with the
    allow-list reader, its ``meta.pt`` with ``weights_only=True``). Anything else is a one-line
    :class:`UserError` naming the path; nothing in the file is run."""
    if "://" in str(path):  # a remote checkpoint: Lightning reads it, with weights_only=True (see below)
        return
    if str(path) in ("best", "last", "hpc") or str(path).startswith("registry:"):
        return  # the Trainer resolves these names to a file, which the strategy checks (see below)
    path = _existing(path)
    if is_sharded_checkpoint(path):
        _read_shard_index(path)
        if (path / LIGHTNING_META).is_file():
            load_checkpoint_file(path / LIGHTNING_META, mmap=True)
        return
    if is_export_folder(path):
        raise UserError(f"{path}: an export folder holds weights only and cannot resume a run; give it as "
                        "model.init_from")
    _refuse_other_folder(path)
    load_checkpoint_file(path, mmap=True)


def guard_checkpoint_loading(strategy) -> None:
    """Make ``strategy.load_checkpoint`` (where every ``ckpt_path`` of fit, validate, test and predict
    is read) run :func:`check_checkpoint` first and read with ``weights_only=True``.

    Why on the strategy: sharded strategies hand the folder to ``torch.distributed.checkpoint``,
    which unpickles its index with ``pickle.load`` and bypasses the Trainer's ``CheckpointIO``;
    the strategy is the one place every form passes through. Idempotent.
    """
    load = strategy.load_checkpoint
    if getattr(load, "checks_checkpoints", False):
        return

    def checked_load(checkpoint_path, weights_only=None):
        from torch.distributed.checkpoint.api import CheckpointException

        check_checkpoint(checkpoint_path)
        try:
            return load(checkpoint_path, weights_only=True)
        except CheckpointException as error:  # a sharded folder's tensor data, read by DCP
            raise _shard_data_error(Path(checkpoint_path), error) from error

    checked_load.checks_checkpoints = True
    strategy.load_checkpoint = checked_load


# ---------------------------------------------------------------- sharded checkpoint folders

# Lightning writes a sharded checkpoint as a torch.distributed.checkpoint (DCP) folder: ``.metadata``
# (the index of every tensor's shards), ``__<rank>_0.distcp`` (each rank's shards) and ``meta.pt``
# (everything else: global step, loops, hyper-parameters, callback states). The model's tensors are
# under one top-level key: "state_dict" (ModelParallelStrategy) or "model" (FSDPStrategy).
MODEL_GROUPS = ("state_dict", "model")
LIGHTNING_META = "meta.pt"
SHARD_INDEX = ".metadata"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a DCP checkpoint folder (it holds a ``.metadata`` index)."""
    return (Path(path) / SHARD_INDEX).is_file()


class _ShardIndexUnpickler(pickle._Unpickler):
    """Reads DCP's ``.metadata`` (a plain pickle) allowing only the (module, name) pairs its index is
    made of, each given explicitly: no other name of those modules, no dotted name (pickle would
    resolve ``"os.system"`` as an attribute path), and no ``BUILD`` onto a class (it would set
    class attributes). The pure-Python unpickler, so that ``BUILD`` can be checked."""

    ALLOWED = {
        *(("torch.distributed.checkpoint.metadata", name) for name in (
            "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
            "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        *(("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)),
    }

    def find_class(self, module: str, name: str):
        if "." in name or (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}")
        return super().find_class(module, name)

    def load_build(self):
        if isinstance(self.stack[-2], type):
            raise pickle.UnpicklingError(f"refusing to set attributes of the class {self.stack[-2].__name__}")
        super().load_build()

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: load_build}


def _read_shard_index(path: Path):
    """The DCP index of a sharded folder, read with the allow-list unpickler and checked: it is an
    index, and every shard file it names is a plain file name inside ``path``."""
    from torch.distributed.checkpoint.metadata import Metadata

    index_file = path / SHARD_INDEX
    try:
        with open(index_file, "rb") as file:
            index = _ShardIndexUnpickler(file, fix_imports=False).load()
    except pickle.UnpicklingError as error:
        if str(error).startswith("refusing"):
            raise UserError(f"{index_file}: {error} in a checkpoint index (it could run code); not loading "
                            "this folder") from error
        raise UserError(f"{index_file}: cannot read this checkpoint index ({_first_line(error)}); "
                        "is the folder complete?") from error
    except Exception as error:  # a truncated or foreign pickle fails in many ways, all of them the file's
        raise UserError(f"{index_file}: cannot read this checkpoint index ({type(error).__name__}: "
                        f"{_first_line(error)}); is the folder complete?") from error
    if not isinstance(index, Metadata) or not isinstance(index.state_dict_metadata, dict):
        raise UserError(f"{index_file}: not a checkpoint index (it holds a {type(index).__name__})")
    for info in (index.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") or "\\" in name:
            raise UserError(f"{index_file}: names the shard file {name!r}, which is not a file of this folder")
    _check_declared_sizes(path, index_file, index)
    return index


def _check_declared_sizes(path: Path, index_file: Path, index) -> None:
    """What the index declares fits in the shard files: each chunk's bytes (offset + length) lie inside
    its file, and the tensors it declares need no more bytes than the shard files hold together (DCP
    stores every tensor's data uncompressed). Else a forged or incomplete index would make the reader
    allocate tensors of any size, or read past a file's end, and fail with a traceback."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    held: dict[str, int] = {}
    for info in (index.storage_data or {}).values():
        name = info.relative_path
        if name not in held:
            if not (path / name).is_file():
                raise UserError(f"{index_file}: names the shard file {name}, which is not in {path}; is the "
                                "folder complete?")
            held[name] = (path / name).stat().st_size
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not all(isinstance(n, int) and n >= 0 for n in (offset, length)) or offset + length > held[name]:
            raise UserError(f"{index_file}: declares a chunk at bytes {offset}+{length} of {name}, which holds "
                            f"{held[name]} bytes; is the folder complete? Not loading this folder")
    declared, largest = 0, (0, "")
    for key, entry in index.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            continue
        try:
            dims = [operator.index(n) for n in entry.size]
            itemsize = entry.properties.dtype.itemsize
            if any(n < 0 for n in dims):
                raise ValueError("negative size")
        except (TypeError, ValueError, AttributeError) as error:
            raise UserError(f"{index_file}: declares the tensor {key} with a size {entry.size!r} that is no "
                            f"tensor size ({error}); not loading this folder") from error
        size = math.prod(dims) * itemsize
        declared += size
        largest = max(largest, (size, key))
    if declared > sum(held.values()):
        raise UserError(f"{index_file}: declares tensors of {_bytes(declared)} (the largest, {largest[1]}, "
                        f"{_bytes(largest[0])}) but its shard files hold {_bytes(sum(held.values()))}; a forged or "
                        "incomplete index, not loading this folder")


def _bytes(count: int) -> str:
    """A byte count for people: ``40.0 TB``, ``9.3 MB``, ``512 bytes``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _shard_data_error(path: Path, error: BaseException) -> UserError:
    """The one-line error for a failure of DCP reading a sharded folder's tensor data (its
    ``CheckpointException`` holds each rank's exception): a chunk refused by ``torch.load(weights_only=True)``
    (it holds code or objects other than tensors), or any other failure of the folder's files."""
    failures = list(getattr(error, "failures", {}).values())
    cause = failures[0][0] if failures and isinstance(failures[0], tuple) else error
    if isinstance(cause, pickle.UnpicklingError):
        refused = re.search(r"GLOBAL ([\w.]+)", str(cause))
        what = f" ({refused.group(1)})" if refused else ""
        return UserError(f"{path}: refusing to load a tensor chunk of this sharded checkpoint that holds code or "
                         f"objects other than tensors{what}; not loading this folder")
    return UserError(f"{path}: cannot read the tensor data of this sharded checkpoint ({type(cause).__name__}: "
                     f"{_first_line(cause)}); is the folder complete?")


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
        raise UserError(f"{path}: a sharded checkpoint without model weights (top-level keys {sorted(groups)}, "
                        f"expected one of {', '.join(MODEL_GROUPS)})")
    meta_keys = set()
    if (path / LIGHTNING_META).is_file():
        meta_keys = set(load_checkpoint_file(path / LIGHTNING_META, mmap=True))
    if "current_model_state" in meta_keys and weights == "live":
        raise UserError(f"{path}: the live weights of this EMA checkpoint were saved by rank 0 only (one "
                        "shard); use weights='ema'")
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
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():
        # no_dist=True is the intent; DCP warns about it all the same
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load({group: state}, storage_reader=reader, no_dist=True)
        except CheckpointException as error:
            raise _shard_data_error(path, error) from error
    return state
