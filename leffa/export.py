"""A trained model as a diffusers-style folder, and back.

Layout: ``unet/`` (the Generative UNet), ``reference_unet/``, ``vae/``, ``scheduler/`` as diffusers'
``save_pretrained`` writes them (safetensors), plus ``leffa.json`` with the module's settings.
``UNet2DConditionModel.from_pretrained(folder, subfolder="unet")`` reads a UNet back (its text
cross-attention comes back randomly initialised and unused); :func:`load_exported` rebuilds the
whole module, register tokens included.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

__all__ = ["export_folder", "is_export_folder", "read_export_state_dict", "load_exported"]

COMPONENTS = {"unet": "generative_unet", "reference_unet": "reference_unet", "vae": "vae"}
# settings that describe a folder on the machine that wrote it, not the model
LOCAL_SETTINGS = ("pretrained_model", "reference_pretrained_model", "init_from", "unet_config", "vae_config")


def export_folder(module, out_dir: str | Path) -> Path:
    """Write ``module`` (a ``LeffaModule``) as a diffusers-style folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for folder, attribute in COMPONENTS.items():
        getattr(module, attribute).save_pretrained(out / folder, safe_serialization=True)
    module.scheduler.save_pretrained(out / "scheduler")
    settings = {k: v for k, v in dict(module.hparams).items() if k not in LOCAL_SETTINGS and not k.startswith("_")}
    (out / "leffa.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
    return out


def is_export_folder(path: str | Path) -> bool:
    return (Path(path) / "leffa.json").is_file()


def read_export_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The module state dict of an exported folder (all three components, registers included)."""
    state = {}
    for folder, attribute in COMPONENTS.items():
        files = sorted((Path(path) / folder).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors weights in {Path(path) / folder}")
        for file in files:
            state.update({f"{attribute}.{k}": v for k, v in load_file(str(file)).items()})
    return state


def load_exported(path: str | Path, **overrides):
    """A ``LeffaModule`` from an exported folder; ``overrides`` change settings (e.g. ``use_leffa_loss``)."""
    from leffa.module import LeffaModule

    path = Path(path)
    settings = json.loads((path / "leffa.json").read_text())
    module = LeffaModule(pretrained_model=str(path), reference_pretrained_model=str(path / "reference_unet"),
                         **{**settings, **overrides})
    from leffa.checkpoints import load_weights

    load_weights(module, read_export_state_dict(path), source=str(path))
    return module


def export_main(argv: list[str] | None = None) -> Path:
    """``leffa export --ckpt CKPT --out DIR [--weights ema|live]``: a checkpoint as a diffusers-style folder."""
    import argparse

    from leffa.visualize import module_from_checkpoint

    p = argparse.ArgumentParser(prog="leffa export", description=export_main.__doc__.split(":")[1].strip())
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--weights", default="ema", choices=["ema", "live"])
    args = p.parse_args(argv)
    out = export_folder(module_from_checkpoint(args.ckpt, args.weights), args.out)
    print(f"exported to {out}")
    return out
