"""A trained model as a diffusers-style folder, and back.

Layout: ``unet/`` (the Generative UNet), ``reference_unet/``, ``vae/``, ``scheduler/`` as diffusers'
``save_pretrained`` writes them (safetensors), plus ``leffa.json`` with the module's settings.
``UNet2DConditionModel.from_pretrained(folder, subfolder="unet")`` reads a UNet back (its text
cross-attention comes back randomly initialised and unused); :func:`leffa.checkpoints.load_module`
(or :func:`load_exported`) rebuilds the whole module, register tokens included.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from leffa.checkpoints import EXPORT_COMPONENTS, EXPORT_SETTINGS, is_export_folder, load_module
from leffa.errors import UserError

__all__ = ["export_folder", "load_exported", "export_main"]

# settings that describe a folder on the machine that wrote it, not the model
LOCAL_SETTINGS = ("pretrained_model", "reference_pretrained_model", "init_from", "unet_config", "vae_config",
                  "vae_pretrained")


def export_folder(module, out_dir: str | Path) -> Path:
    """Write ``module`` (a ``LeffaModule``) as a diffusers-style folder.

    ``out_dir`` must not exist yet (or be empty): the folder is written under a temporary name
    beside it and renamed when complete, so nothing already there is overwritten and a killed
    export leaves no half-written folder under the given name.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; export into a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        for folder, attribute in EXPORT_COMPONENTS.items():
            getattr(module, attribute).save_pretrained(staging / folder, safe_serialization=True)
        module.scheduler.save_pretrained(staging / "scheduler")
        settings = {k: v for k, v in dict(module.hparams).items()
                    if k not in LOCAL_SETTINGS and not k.startswith("_")}
        (staging / EXPORT_SETTINGS).write_text(json.dumps(settings, indent=2, sort_keys=True))
        os.replace(staging, out)  # an empty out_dir is replaced; a non-empty one was refused above
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def load_exported(path: str | Path, **overrides):
    """A ``LeffaModule`` from an exported folder; ``overrides`` change settings (e.g. ``use_leffa_loss``)."""
    if not is_export_folder(path):
        raise UserError(f"{path}: not a leffa export folder (no {EXPORT_SETTINGS})")
    return load_module(path, **overrides)


def export_main(argv: list[str] | None = None) -> Path:
    """``leffa export --ckpt CKPT --out DIR [--weights ema|live]``: a checkpoint as a diffusers-style folder."""
    import argparse

    p = argparse.ArgumentParser(prog="leffa export", description=export_main.__doc__.split(":")[1].strip())
    p.add_argument("--ckpt", required=True, help="a Lightning checkpoint, a sharded checkpoint folder or an export")
    p.add_argument("--out", required=True)
    p.add_argument("--weights", default="ema", choices=["ema", "live"])
    args = p.parse_args(argv)
    out = export_folder(load_module(args.ckpt, args.weights), args.out)
    print(f"exported to {out}")
    return out
