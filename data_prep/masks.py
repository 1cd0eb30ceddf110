"""Garment-agnostic inpainting masks (uint8, 255 = region to generate) from parse maps + keypoints.

Keypoints are (N, 2) float arrays of (x, y) pixel positions in the label map's frame, NaN where
a joint is missing. Dilations use square windows, as cv2.dilate with an all-ones kernel does:
a k x k kernel applied n times equals one square of side n * (k - 1) + 1.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# Helpers


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


def _drawing(mask_shape: tuple[int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    height, width = mask_shape
    canvas = Image.new("L", (width, height), 0)
    return canvas, ImageDraw.Draw(canvas)


def to_uint8(region: np.ndarray) -> np.ndarray:
    return np.where(region, 255, 0).astype(np.uint8)


# VITON-HD (labels: image-parse-v3, CIHP/LIP 20 classes; keypoints: OpenPose BODY_25)

VITONHD_GARMENT = (5, 6, 7, 10, 14, 15)  # upper-clothes, dress, coat, neck, left arm, right arm
VITONHD_KEEP = (4, 13, 9, 12, 16, 17, 18, 19)  # head: sunglasses, face; lower body: pants, skirt, legs, shoes
VITONHD_ARMS = ((2, 3, 4), (5, 6, 7))  # BODY_25 shoulder-elbow-wrist, right and left
VITONHD_TORSO = (2, 5, 12, 9)  # BODY_25 right shoulder, left shoulder, left hip, right hip


def vitonhd_agnostic_mask(labels: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """VITON-HD try-on mask, after get_img_agnostic / get_parse_agnostic of shadow2496/VITON-HD.

    Region = parse labels {5, 6, 7} (upper clothes, dress, coat), {10} (neck), {14, 15} (arms)
    + lines of radius r along shoulder-elbow-wrist (BODY_25 2-3-4, 5-6-7) with discs at the joints
    + the torso polygon (2, 5, 12, 9); dilated by a square of side 2 * max(1, r // 2) + 1; minus
    head {4, 13} and lower body {9, 12, 16, 17, 18, 19}, which are never generated.
    r = 20 px at 1024 px height (VITON-HD's value), scaled with the height.
    """
    height = labels.shape[0]
    radius = max(1, round(20 * height / 1024))
    canvas, draw = _drawing(labels.shape)
    for chain in VITONHD_ARMS:
        joints = present(pose, chain)
        if len(joints) >= 2:
            draw.line(joints, fill=255, width=2 * radius)
        for x, y in joints:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    torso = present(pose, VITONHD_TORSO)
    if len(torso) == len(VITONHD_TORSO):
        draw.polygon(torso, fill=255)
    region = np.isin(labels, VITONHD_GARMENT) | (np.asarray(canvas) > 0)
    region = dilate(region, 2 * max(1, radius // 2) + 1)
    return to_uint8(region & ~np.isin(labels, VITONHD_KEEP))


# DressCode (labels: label_maps/*_4.png, ATR 18 classes; keypoints: OpenPose COCO-18)

DRESSCODE_CATEGORIES = ("upper_body", "lower_body", "dresses")
DRESSCODE_ALWAYS_KEEP = (1, 2, 3, 9, 10, 16, 17)  # hat, hair, sunglasses, shoes, bag, scarf
DRESSCODE_HEAD = (1, 2, 3, 11)  # hat, hair, sunglasses, head
DRESSCODE_ARMS = (14, 15)
DRESSCODE_RULES = {  # category -> (labels to repaint, extra labels to keep)
    "upper_body": ((4,), (5, 6)),  # upper clothes; keep skirt, pants
    "lower_body": ((6, 12, 13), (4, 14, 15)),  # pants, legs; keep upper clothes, arms
    "dresses": ((7, 12, 13), ()),  # dress, legs
}
DRESSCODE_ARM_CHAIN = (7, 6, 5, 2, 3, 4)  # COCO-18 l-wrist, l-elbow, l-shoulder, r-shoulder, r-elbow, r-wrist


def _dresscode_dilation(height: int) -> int:
    # dress-code data/dataset.py: 20x20 (H > 512), 10x10 (H > 256) or 5x5 kernel, 5 iterations.
    kernel = 20 if height > 512 else 10 if height > 256 else 5
    return 5 * (kernel - 1) + 1


def dresscode_agnostic_mask(labels: np.ndarray, pose: np.ndarray, category: str) -> np.ndarray:
    """DressCode try-on mask: the rule of aimagelab/dress-code data/dataset.py (also used by
    IDM-VTON inference_dc.py, ladi-vton and Leffa's demo get_agnostic_mask_dc).

    1. keep = hat, hair, sunglasses, shoes, bag, scarf + the category's extra kept labels;
       region = the category's repaint labels (table DRESSCODE_RULES).
    2. upper_body, dresses: a poly-line of width 30 px (at 512 px height) through wrist-elbow-
       shoulder-shoulder-elbow-wrist, missing joints left out, dilated by a 46 px square when
       H > 512; it joins the region, and arm pixels outside it (hands) are kept.
    3. upper_body, dresses (neck): head pixels lower than the shoulder line minus 20 px (at 512)
       join the region, head pixels above it are kept; lower_body keeps the whole head.
    4. region dilated by a square of side 96 / 46 / 21 px (H > 512 / H > 256 / else); mask =
       dilated region minus kept pixels.
    """
    if category not in DRESSCODE_RULES:
        raise ValueError(f"unknown DressCode category {category!r}; valid: {', '.join(DRESSCODE_CATEGORIES)}")
    repaint, extra_keep = DRESSCODE_RULES[category]
    height, width = labels.shape
    scale = height / 512.0
    keep = np.isin(labels, DRESSCODE_ALWAYS_KEEP + extra_keep)
    region = np.isin(labels, repaint)
    head = np.isin(labels, DRESSCODE_HEAD)
    if category in ("upper_body", "dresses"):
        canvas, draw = _drawing(labels.shape)
        chain = present(pose, DRESSCODE_ARM_CHAIN)
        if len(chain) >= 2:
            draw.line(chain, fill=255, width=max(1, round(30 * scale)), joint="curve")
        arm_line = np.asarray(canvas) > 0
        if height > 512:
            arm_line = dilate(arm_line, 5 * (10 - 1) + 1)
        keep |= np.isin(labels, DRESSCODE_ARMS) & ~arm_line
        region |= arm_line
        shoulders = present(pose, (2, 5))
        if len(shoulders) == 2:
            (x0, y0), (x1, y1) = shoulders
            slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0.0
            columns = np.arange(width)
            line_y = y0 + slope * (columns - x0) - 20 * scale  # (W,)
            below = np.arange(height)[:, None] >= np.maximum(np.floor(line_y), 0)[None, :]  # (H, W)
            region |= head & below
            keep |= head & ~below
        else:
            keep |= head
    else:
        keep |= head
    region = dilate(region, _dresscode_dilation(height))
    return to_uint8(region & ~keep)
