"""The two UNets of the Leffa baseline (paper Sec. 3.1), built from stock diffusers classes.

Both are ``UNet2DConditionModel``s from a local SD1.5 (or SD1.5-inpainting) folder or an inline
config. Text cross-attention is removed (its modules are gone) and the Generative UNet's input
convolution is widened to take the conditioning channels, the new channels starting at zero.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock

from leffa.pretrained import component_location, load_unet

__all__ = ["build_unet", "remove_cross_attention", "set_input_channels", "pretrained_input_channels"]


def remove_cross_attention(unet: UNet2DConditionModel) -> int:
    """Delete ``attn2``/``norm2`` (text cross-attention) from every transformer block; returns how many.

    ``BasicTransformerBlock`` skips its cross-attention when ``attn2`` is None, so the UNet then
    runs with ``encoder_hidden_states=None``.
    """
    removed = 0
    for block in unet.modules():
        if isinstance(block, BasicTransformerBlock) and block.attn2 is not None:
            block.attn2 = None
            block.norm2 = None
            removed += 1
    return removed


@torch.no_grad()
def set_input_channels(unet: UNet2DConditionModel, in_channels: int) -> None:
    """Resize ``conv_in`` to ``in_channels``: extra channels start at zero, surplus ones are dropped.

    Widening keeps the pretrained behaviour exactly (zero weights ignore the new inputs); narrowing
    keeps the first channels, e.g. the 4 noisy-latent channels of an inpainting UNet's 9.
    """
    old = unet.conv_in
    if old.in_channels == in_channels:
        return
    new = torch.nn.Conv2d(
        in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
        dtype=old.weight.dtype, device=old.weight.device,
    )
    new.weight.zero_()
    keep = min(in_channels, old.in_channels)
    new.weight[:, :keep] = old.weight[:, :keep]
    new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)


def build_unet(pretrained: str | None, config: dict | None, in_channels: int) -> UNet2DConditionModel:
    """Load (or build) a UNet, remove its text cross-attention and give it ``in_channels`` inputs."""
    unet = load_unet(pretrained, config)
    remove_cross_attention(unet)
    set_input_channels(unet, in_channels)
    return unet


def pretrained_input_channels(pretrained: str | None, config: dict | None) -> int:
    """The input channels of the UNet that :func:`build_unet` starts from (read from its config,
    no weights loaded), i.e. before ``set_input_channels``."""
    if pretrained is not None:
        root, sub = component_location(pretrained, "unet")
        config = UNet2DConditionModel.load_config(root, subfolder=sub, local_files_only=True)
    default = inspect.signature(UNet2DConditionModel.__init__).parameters["in_channels"].default
    return (config or {}).get("in_channels", default)
