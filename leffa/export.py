"""A trained model as a diffusers-style folder, and back; or as one ``.pth`` in the authors' layout.

Layout: one folder per network, as the architecture's ``export_folders`` name them (``dual_unet``:
``unet/`` the Generative UNet, ``reference_unet/``; ``concat_unet``: ``unet/``), ``vae/``,
``scheduler/`` as diffusers' ``save_pretrained`` writes them (safetensors), plus ``leffa.json`` with
the module's settings and the folders.
``UNet2DConditionModel.from_pretrained(folder, subfolder="unet")`` reads a UNet back (its text
cross-attention projections come back randomly initialised: give it a pass-through, as
``leffa.unets.set_cross_attention`` does); :meth:`leffa.module.LeffaModule.from_checkpoint`
(or :func:`load_exported`) rebuilds the whole module, register tokens included.

``--format released`` writes the weights as the authors' ``virtual_tryon.pth`` holds them (see
:func:`export_released`), for their inference code.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch

from leffa.atomic_write import write_atomically
from leffa.architectures.registry import architecture_class, architecture_record, comparable_record
from leffa.checkpoints import (
    EXPORT_FOLDERS_KEY, EXPORT_SETTINGS, is_export_folder, load_checkpoint_file, read_settings, read_state_dict,
)
from leffa.errors import UserError
from leffa.module import LeffaModule
from leffa.released import RELEASED_CONDITIONING, to_released_state_dict
from leffa.trainable import LoraSettings, has_lora, merge_lora, merge_lora_state_dict

__all__ = ["export_folder", "export_released", "load_exported", "export_main"]
FORMATS = ("folder", "released")

# settings that describe a folder on the machine that wrote it, not the model
# (and the architecture's own ``local_args``)
LOCAL_SETTINGS = ("pretrained_model", "init_from", "unet_config", "vae_config", "vae_pretrained")


def export_folder(module, out_dir: str | Path) -> Path:
    """Write ``module`` (a ``LeffaModule``) as a diffusers-style folder.

    ``out_dir`` must not exist yet (or be empty): the folder is written under a temporary name
    beside it and renamed when complete, so nothing already there is overwritten and a killed
    export leaves no half-written folder under the given name. LoRA adapters are merged into
    ``module``'s layers first (in place), so the UNets are plain diffusers UNets.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; export into a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    merge_lora(module)
    staging.mkdir()
    try:
        folders = {**module.denoiser.export_folders, "vae": "vae"}
        for folder, attribute in folders.items():
            getattr(module, attribute).save_pretrained(staging / folder, safe_serialization=True)
        module.scheduler.save_pretrained(staging / "scheduler")
        settings = {k: v for k, v in dict(module.hparams).items()
                    if k not in LOCAL_SETTINGS and not k.startswith("_")}
        settings.update(architecture=comparable_record(module.hparams.architecture, fitting=True),
                        **{EXPORT_FOLDERS_KEY: folders})
        (staging / EXPORT_SETTINGS).write_text(json.dumps(settings, indent=2, sort_keys=True))
        os.replace(staging, out)  # an empty out_dir is replaced; a non-empty one was refused above
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def export_released(ckpt: str | Path, base: str | Path, out: str | Path, weights: str = "ema") -> Path:
    """Write the weights of ``ckpt`` as one ``.pth`` in the layout of ``base`` (a released checkpoint).

    ``unet.*`` = Generative UNet, ``unet_encoder.*`` = Reference UNet, ``vae.*``: exactly the base's
    keys, shapes and dtypes, so the authors' inference code loads it with a strict
    ``load_state_dict``. Every tensor is the checkpoint's except those the released code never uses
    (text cross-attention projections, SDXL's added embedding), which our UNets drop and which are
    copied from ``base``. Refused (one line): a model trained with another conditioning than
    ``released``, another architecture or base model (shapes), ``cross_attention: removed``, extra
    tensors such as register tokens, and an ``out`` that already exists (it is written atomically).
    A LoRA model (``model.trainable: lora``) is written with its adapters merged into the layers
    (peft's merge, with the checkpoint's ``model.lora`` settings).
    """
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists and is not overwritten; choose a new --out")
    try:
        settings = read_settings(ckpt)
    except UserError:  # weights-only forms (released .pth, safetensors): the shapes are checked below
        settings = {}
    conditioning = settings.get("conditioning", RELEASED_CONDITIONING)
    if conditioning != RELEASED_CONDITIONING:
        raise UserError(f"{ckpt} was trained with conditioning {conditioning!r}; the released layout needs "
                        f"model.conditioning: {RELEASED_CONDITIONING}")
    # the architecture's released layout (a weights-only file: the paper's architecture, whose layout it is)
    components = architecture_class(architecture_record(settings.get("architecture", "dual_unet"))["class_path"]
                                    ).released_components
    base_state = load_checkpoint_file(base, mmap=True)  # weights_only=True; tensors read when written
    own = read_state_dict(ckpt, weights, components)
    if has_lora(own):
        if not isinstance(settings.get("lora"), dict):
            raise UserError(f"{ckpt} holds LoRA adapters but not their settings (model.lora); export its "
                            "Lightning checkpoint")
        own = merge_lora_state_dict(own, LoraSettings(**settings["lora"]), source=str(ckpt))
    released = to_released_state_dict(own, base_state, components, source=str(ckpt))
    return write_atomically(out, lambda file: torch.save(released, file))


def load_exported(path: str | Path, **overrides):
    """A ``LeffaModule`` from an exported folder; ``overrides`` change settings (e.g. ``use_leffa_loss``)."""
    if not is_export_folder(path):
        raise UserError(f"{path}: not a leffa export folder (no {EXPORT_SETTINGS})")
    return LeffaModule.from_checkpoint(path, **overrides)


def export_main(argv: list[str] | None = None) -> Path:
    """``leffa export --ckpt CKPT --out OUT [--weights ema|live] [--format folder|released --base PTH]``:
    a checkpoint as a diffusers-style folder, or as one ``.pth`` in the released layout."""
    import argparse

    p = argparse.ArgumentParser(prog="leffa export", description=export_main.__doc__.split(":")[1].strip())
    p.add_argument("--ckpt", required=True, help="a Lightning checkpoint, a sharded checkpoint folder or an export")
    p.add_argument("--out", required=True, help="a new folder (--format folder) or a new .pth file (released)")
    p.add_argument("--weights", default="ema", choices=["ema", "live"])
    p.add_argument("--format", default="folder", choices=FORMATS,
                   help="folder: diffusers-style folder; released: one .pth in the layout of --base")
    p.add_argument("--base", default=None, help="the released checkpoint the model started from (virtual_tryon.pth)")
    args = p.parse_args(argv)
    if args.format == "released":
        if args.base is None:
            raise UserError("--format released needs --base: the released checkpoint (virtual_tryon.pth, "
                            "virtual_tryon_dc.pth or pose_transfer.pth) whose layout and unused weights are written")
        out = export_released(args.ckpt, args.base, args.out, args.weights)
    else:
        if args.base is not None:
            raise UserError("--base is only read with --format released")
        out = export_folder(LeffaModule.from_checkpoint(args.ckpt, args.weights), args.out)
    print(f"exported to {out}")
    return out
