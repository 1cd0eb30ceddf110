"""The UNets of the Leffa architectures (paper Sec. 3.1), built from stock diffusers classes.

Each is a ``UNet2DConditionModel`` from a local SD1.5(-inpainting) or SDXL(-inpainting) folder, or
an inline config. There is no text: the text cross-attention of every transformer block goes
(``model.cross_attention``, see :func:`set_cross_attention`), SDXL's added text/time embedding goes
(as the released code sets ``addition_embed_type = None``), and the Generative UNet's input
convolution is widened to take the conditioning channels, the new channels starting at zero.
"""

from __future__ import annotations

import inspect
import math

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from leffa.errors import UserError
from leffa.pretrained import component_location, load_unet

__all__ = ["CROSS_ATTENTION", "CrossAttentionPassthrough", "build_unet", "check_cross_attention_mode",
           "set_cross_attention", "drop_added_embedding", "set_input_channels", "unet_config_of", "is_sdxl",
           "pretrained_input_channels", "attention_levels", "halved"]

#: ``model.cross_attention``: what becomes of each transformer block's text cross-attention
CROSS_ATTENTION = ("passthrough", "removed")


class CrossAttentionPassthrough(nn.Module):
    """Stands in for a transformer block's text cross-attention (``attn2``) and returns its input.

    The block still runs ``h = attn2(norm2(h)) + h``, so it adds ``norm2(h)`` to ``h``: what the
    authors' code computes (its skip processor returns the input it is given), with ``norm2`` kept
    and trained and ``attn2``'s projections, which would never be used, gone.
    """

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def check_cross_attention_mode(mode: str) -> None:
    """One line for a ``model.cross_attention`` that is not one of :data:`CROSS_ATTENTION`."""
    if mode not in CROSS_ATTENTION:
        raise UserError(f"model.cross_attention: unknown {mode!r}; valid: {', '.join(CROSS_ATTENTION)}")


def set_cross_attention(unet: UNet2DConditionModel, mode: str) -> int:
    """Replace the text cross-attention of every transformer block; returns how many.

    ``passthrough`` (the released checkpoints' function, and CatVTON's): ``attn2`` becomes a
    :class:`CrossAttentionPassthrough`, ``norm2`` stays, each block adds ``norm2(h)``. ``removed``
    (the paper's text): ``attn2`` and ``norm2`` are deleted; ``BasicTransformerBlock`` skips the
    step when ``attn2`` is None.
    """
    check_cross_attention_mode(mode)
    changed = 0
    for block in unet.modules():
        if isinstance(block, BasicTransformerBlock) and block.attn2 is not None \
                and not isinstance(block.attn2, CrossAttentionPassthrough):
            if mode == "removed":
                block.attn2, block.norm2 = None, None
            else:
                block.attn2 = CrossAttentionPassthrough()
            changed += 1
    return changed


def drop_added_embedding(unet: UNet2DConditionModel) -> bool:
    """Delete an added embedding (SDXL's ``text_time``: pooled text and size conditioning) and set
    ``addition_embed_type`` to None, so the UNet runs without ``added_cond_kwargs``, as the released
    code's does; returns whether there was one."""
    if unet.config.addition_embed_type is None:
        return False
    for name in ("add_embedding", "add_time_proj"):
        if hasattr(unet, name):
            delattr(unet, name)
    unet.register_to_config(addition_embed_type=None)
    return True


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


def build_unet(pretrained: str | None, config: dict | None, in_channels: int,
               cross_attention: str = "passthrough") -> UNet2DConditionModel:
    """Load (or build) a UNet, replace its text cross-attention (``cross_attention``), drop an added
    embedding and give it ``in_channels`` inputs."""
    check_cross_attention_mode(cross_attention)  # before any weights are read
    unet = load_unet(pretrained, config)
    set_cross_attention(unet, cross_attention)
    drop_added_embedding(unet)
    set_input_channels(unet, in_channels)
    return unet


def unet_config_of(pretrained: str | None, config: dict | None) -> dict:
    """The config of the UNet that :func:`build_unet` starts from (read from the folder's
    ``config.json`` when a folder is given, no weights loaded; else ``config``)."""
    if pretrained is not None:
        root, sub = component_location(pretrained, "unet")
        return dict(UNet2DConditionModel.load_config(root, subfolder=sub, local_files_only=True))
    return dict(config or {})


def is_sdxl(pretrained: str | None, config: dict | None) -> bool:
    """Whether the UNet is SDXL's (its config has the ``text_time`` added embedding, as SDXL and
    SDXL-inpainting have and SD1.5 has not)."""
    return unet_config_of(pretrained, config).get("addition_embed_type") == "text_time"


def pretrained_input_channels(pretrained: str | None, config: dict | None) -> int:
    """The input channels of the UNet that :func:`build_unet` starts from, i.e. before ``set_input_channels``."""
    default = inspect.signature(UNet2DConditionModel.__init__).parameters["in_channels"].default
    return unet_config_of(pretrained, config).get("in_channels", default)


def attention_levels(unet: UNet2DConditionModel) -> dict[str, int]:
    """How many times the UNet has halved the latent at each attention layer (by processor name):
    down block i of n works on the latent halved i times, the middle block n - 1 times, up block i
    n - 1 - i times."""
    levels = len(unet.down_blocks)
    found = {}
    for name in unet.attn_processors:
        block, _, rest = name.partition(".")
        if block == "mid_block":
            found[name] = levels - 1
        else:
            index = int(rest.split(".", 1)[0])
            found[name] = index if block == "down_blocks" else levels - 1 - index
    return found


def halved(size: tuple[int, int], times: int) -> tuple[int, int]:
    """``size`` halved ``times`` times, rounded up as the UNet's stride-2 convolutions (padding 1) do."""
    h, w = size
    for _ in range(times):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w
