"""The authors' released checkpoints (``virtual_tryon.pth``, ``virtual_tryon_dc.pth``) in our layout.

They are one flat state dict: ``unet.*`` the Generative UNet (12 input channels: noisy latent 4,
mask 1, masked-image latent 4, DensePose resized to the latent grid 3, i.e. our ``released``
conditioning), ``unet_encoder.*`` the Reference UNet, ``vae.*``; stock diffusers module names.
Their text cross-attention weights are present but unused; we drop them, as our UNets have no
such modules.
"""

from __future__ import annotations

import torch

from leffa.errors import UserError

__all__ = ["is_released_state_dict", "convert_released_state_dict", "RELEASED_CONDITIONING"]

RELEASED_CONDITIONING = "released"
PREFIXES = {"unet.": "generative_unet.", "unet_encoder.": "reference_unet.", "vae.": "vae."}


def is_released_state_dict(state_dict: dict) -> bool:
    """True for the released flat layout (``unet.*`` and ``unet_encoder.*`` keys)."""
    return any(k.startswith("unet.") for k in state_dict) and any(k.startswith("unet_encoder.") for k in state_dict)


def _is_cross_attention(name: str) -> bool:
    parts = name.split(".")
    return "transformer_blocks" in parts and ("attn2" in parts or "norm2" in parts)


def convert_released_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released keys -> ``LeffaModule`` keys, without the unused cross-attention weights."""
    converted = {}
    for name, tensor in state_dict.items():
        # longest prefix first: "unet_encoder." before "unet."
        prefix = next((p for p in sorted(PREFIXES, key=len, reverse=True) if name.startswith(p)), None)
        if prefix is None:
            raise UserError(f"unexpected key in a released checkpoint: {name} (expected unet.*, unet_encoder.*, vae.*)")
        if not _is_cross_attention(name):
            converted[PREFIXES[prefix] + name[len(prefix):]] = tensor
    return converted
