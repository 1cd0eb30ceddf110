"""The Generative UNet's conditioning channels (Leffa paper Sec. 3.1 and the released checkpoints).

The UNet input is ``[noisy latent (4) ; conditioning]``, the conditioning parts in the order below:

- ``tryon``: mask (1) + masked-image latent (4), 9 channels, SD1.5-inpainting's own layout;
- ``pose``: DensePose latent (4), 8 channels;
- ``pose_image``: DensePose image resized to the latent grid (3), 7 channels;
- ``released``: mask (1) + masked-image latent (4) + resized DensePose (3), 12 channels, the layout
  of the released ``virtual_tryon*.pth`` checkpoints, used for both tasks (all-ones mask for pose).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from leffa.errors import UserError

__all__ = ["LAYOUTS", "conditioning_channels", "build_conditioning"]

LAYOUTS: dict[str, tuple[str, ...]] = {
    "tryon": ("mask", "masked_image"),
    "pose": ("densepose_latent",),
    "pose_image": ("densepose_image",),
    "released": ("mask", "masked_image", "densepose_image"),
}
PART_CHANNELS = {"mask": 1, "masked_image": 4, "densepose_latent": 4, "densepose_image": 3}


def _layout(name: str) -> tuple[str, ...]:
    if name not in LAYOUTS:
        raise UserError(f"model.conditioning: unknown layout {name!r}; valid: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def conditioning_channels(name: str) -> int:
    """Number of conditioning channels of a layout (the UNet takes 4 more)."""
    return sum(PART_CHANNELS[p] for p in _layout(name))


def build_conditioning(name: str, batch: dict, encode: Callable[[torch.Tensor], torch.Tensor],
                       latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B, conditioning_channels(name), h, w) from the batch's ``tgt``, ``mask`` and ``densepose``.

    ``encode`` maps an image (B, 3, H, W) in [-1, 1] to its scaled latent (B, 4, h, w).
    The masked image keeps the person outside the mask and is 0 (grey) inside it.
    """
    parts = []
    for part in _layout(name):
        if part == "mask":
            parts.append(F.interpolate(batch["mask"], size=latent_hw, mode="nearest"))
        elif part == "masked_image":
            parts.append(encode(batch["tgt"] * (1.0 - batch["mask"])))
        elif part == "densepose_latent":
            parts.append(encode(batch["densepose"]))
        else:  # densepose_image
            parts.append(F.interpolate(batch["densepose"], size=latent_hw, mode="bilinear", antialias=True))
    return torch.cat(parts, dim=1)
