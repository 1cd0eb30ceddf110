"""Pictures for people: sample grids (target, reference, mask, DensePose, prediction)."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

__all__ = ["to_unit", "sample_grid", "save_png"]


def to_unit(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]; a one-channel mask in {0, 1} becomes three grey channels."""
    if image.shape[1] == 1:
        return image.expand(-1, 3, -1, -1).float()
    return ((image.float() + 1) / 2).clamp(0, 1)


def sample_grid(batch: dict, prediction: torch.Tensor) -> torch.Tensor:
    """One row per sample: target | reference | mask | DensePose | prediction, (3, H', W') in [0, 1]."""
    columns = [batch["tgt"], batch["ref"], batch["mask"], batch["densepose"], prediction]
    # (5, B, 3, H, W) -> (B*5, 3, H, W), row-major by sample
    tiles = torch.stack([to_unit(c.detach().cpu()) for c in columns], dim=1).flatten(0, 1)
    return make_grid(tiles, nrow=len(columns), padding=2, pad_value=1.0)


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write a (3, H, W) [0, 1] image, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, path)
    return path
