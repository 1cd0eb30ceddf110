"""Pixel geometry shared by the garment-agnostic mask rules of the converters (`vitonhd.py`,
`dresscode.py`: uint8 masks, 255 = region to generate, from parse maps + keypoints).

Keypoints are (N, 2) float arrays of (x, y) pixel positions in the label map's frame, NaN where
a joint is missing. Dilations use square windows, as cv2.dilate with an all-ones kernel does:
a k x k kernel applied n times equals one square of side n * (k - 1) + 1.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def dilate(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary dilation of a (H, W) bool mask by a size x size square (separable running max)."""
    if size <= 1:
        return mask.copy()
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    height, width = mask.shape
    padded = np.pad(mask, ((before, after), (0, 0)))
    rows = np.zeros_like(mask)
    for offset in range(size):
        rows |= padded[offset : offset + height]
    padded = np.pad(rows, ((0, 0), (before, after)))
    out = np.zeros_like(mask)
    for offset in range(size):
        out |= padded[:, offset : offset + width]
    return out


def present(points: np.ndarray, indices) -> list[tuple[float, float]]:
    """The (x, y) of the listed joints that are not missing, in the listed order."""
    return [tuple(points[i]) for i in indices if i < len(points) and not np.isnan(points[i]).any()]


def drawing(mask_shape: tuple[int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A black L canvas of `mask_shape` (H, W) and its ImageDraw, to draw limbs and polygons on."""
    height, width = mask_shape
    canvas = Image.new("L", (width, height), 0)
    return canvas, ImageDraw.Draw(canvas)


def to_uint8(region: np.ndarray) -> np.ndarray:
    """A bool region as a mask: uint8, 255 inside, 0 outside."""
    return np.where(region, 255, 0).astype(np.uint8)
