"""Tiny checkpoints in the authors' released layout, and `leffa export --format released`, for tests."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from leffa.cli import cli_main
from leffa.testing import TINY_UNET, TINY_VAE


def released_file(path, unet=TINY_UNET, dtype=torch.float16, seed=0):
    """A released-layout .pth (stock diffusers UNets with their text cross-attention, and a VAE),
    stored in `dtype`; returns the state dict saved."""
    torch.manual_seed(seed)
    state = {}
    for prefix, model in (
        ("unet.", UNet2DConditionModel(**{**unet, "in_channels": 12})),
        ("unet_encoder.", UNet2DConditionModel(**unet)),
        ("vae.", AutoencoderKL(**TINY_VAE)),
    ):
        state.update({prefix + k: v.to(dtype) for k, v in model.state_dict().items()})
    torch.save(state, path)
    return state


def save_ckpt(module, path):
    """A checkpoint as Lightning writes one: the module's weights and its settings."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def export(ckpt, base, out, *extra):
    cli_main(["export", "--format", "released", "--base", str(base), "--ckpt", str(ckpt), "--out", str(out), *extra])
    return torch.load(out, map_location="cpu", weights_only=True)
