"""The Generative UNet's conditioning channels (Leffa paper Sec. 3.1 and the released checkpoints).

The UNet input is ``[noisy latent (4) ; conditioning]``, the conditioning parts in the order below:

- ``tryon``: mask (1) + masked-image latent (4), 9 channels, SD1.5-inpainting's own layout;
- ``pose``: DensePose latent (4), 8 channels;
- ``pose_image``: DensePose image resized to the latent grid (3), 7 channels;
- ``released``: mask (1) + masked-image latent (4) + resized DensePose (3), 12 channels, the layout
  of the released checkpoints (``virtual_tryon*.pth``, ``pose_transfer.pth``), used for both tasks
  (all-ones mask for pose), computed as the released pipeline computes it: the DensePose image
  resized to the latent grid with nearest, the masked image ``tgt * (mask < 0.5)``, and the
  masked-image and reference latents drawn from the VAE posterior (:func:`samples_posterior`).

The other layouts are the project's own: DensePose resized with antialiased bilinear, the masked
image ``tgt * (1 - mask)``, latents at the posterior mode.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from leffa.errors import UserError

__all__ = ["LAYOUTS", "conditioning_channels", "build_conditioning", "samples_posterior", "encoded_images"]

LAYOUTS: dict[str, tuple[str, ...]] = {
    "tryon": ("mask", "masked_image"),
    "pose": ("densepose_latent",),
    "pose_image": ("densepose_image",),
    "released": ("mask", "masked_image", "densepose_image"),
}
PART_CHANNELS = {"mask": 1, "masked_image": 4, "densepose_latent": 4, "densepose_image": 3}
# the layouts computed as the released pipeline computes them (module docstring)
RELEASED_RULES = frozenset({"released"})
# the parts made by the VAE, by the name of the image they encode (``build_conditioning`` hands
# ``encode`` that name; cached latents are stored under it: ``leffa.data.latents``)
ENCODED_PARTS = {"masked_image": "masked", "densepose_latent": "densepose"}


def _layout(name: str) -> tuple[str, ...]:
    if name not in LAYOUTS:
        raise UserError(f"model.conditioning: unknown layout {name!r}; valid: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def conditioning_channels(name: str) -> int:
    """Number of conditioning channels of a layout (the UNet takes 4 more)."""
    return sum(PART_CHANNELS[p] for p in _layout(name))


def samples_posterior(name: str) -> bool:
    """Whether the layout's image latents (masked image, and the reference with it) are samples of
    the VAE posterior, as the released pipeline draws them; else the posterior mode."""
    _layout(name)
    return name in RELEASED_RULES


def encoded_images(name: str) -> tuple[str, ...]:
    """The images a training step of layout ``name`` encodes with the VAE: the target, the
    reference, then the conditioning's (``masked`` for a masked image, ``densepose`` for a DensePose
    latent), in the order they are encoded."""
    return ("tgt", "ref", *(ENCODED_PARTS[p] for p in _layout(name) if p in ENCODED_PARTS))


def build_conditioning(name: str, batch: dict, encode: Callable[[torch.Tensor, str], torch.Tensor],
                       latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B, conditioning_channels(name), h, w) from the batch's ``tgt``, ``mask`` and ``densepose``.

    ``encode(image, image_name)`` maps an image (B, 3, H, W) in [-1, 1] to its scaled latent (B, 4,
    h, w) (a posterior sample for the layouts of :func:`samples_posterior`: the caller's choice of
    ``encode``); ``image_name`` is ``masked`` or ``densepose`` (:func:`encoded_images`), so that
    the caller may take cached latents instead. The masked image keeps the person outside the mask
    and is 0 (grey) inside it (with the batch's binary mask, ``tgt * (1 - mask)`` and the released
    ``tgt * (mask < 0.5)`` are the same image).
    """
    released = name in RELEASED_RULES
    parts = []
    for part in _layout(name):
        if part == "mask":
            parts.append(F.interpolate(batch["mask"], size=latent_hw, mode="nearest"))
        elif part == "masked_image":
            keep = (batch["mask"] < 0.5).to(batch["tgt"].dtype) if released else 1.0 - batch["mask"]
            parts.append(encode(batch["tgt"] * keep, ENCODED_PARTS[part]))
        elif part == "densepose_latent":
            parts.append(encode(batch["densepose"], ENCODED_PARTS[part]))
        elif released:  # densepose_image, as the released pipeline resizes it
            parts.append(F.interpolate(batch["densepose"], size=latent_hw, mode="nearest"))
        else:  # densepose_image
            parts.append(F.interpolate(batch["densepose"], size=latent_hw, mode="bilinear", antialias=True))
    return torch.cat(parts, dim=1)
