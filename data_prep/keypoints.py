"""A pose image from 18 OpenPose COCO-18 keypoints: coloured limbs and joints on black.

Joint order (OpenPose COCO-18): 0 nose, 1 neck, 2 r-shoulder, 3 r-elbow, 4 r-wrist, 5 l-shoulder,
6 l-elbow, 7 l-wrist, 8 r-hip, 9 r-knee, 10 r-ankle, 11 l-hip, 12 l-knee, 13 l-ankle, 14 r-eye,
15 l-eye, 16 r-ear, 17 l-ear. Limbs and colours follow the usual OpenPose COCO rendering
(the 17 limbs without the ear-shoulder links), as drawn by the pose-transfer code bases.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COCO18_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
COCO18_COLOURS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip


def draw_coco18(points: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """Render (18, 2) keypoints (x, y) in pixels of an image of `size` (W, H); NaN = missing.

    Line width and joint radius are 4 px at 256 px height, scaled with the height.
    """
    if points.shape != (18, 2):
        raise ValueError(f"expected (18, 2) COCO-18 keypoints, got shape {points.shape}")
    width, height = size
    thickness = max(1, round(4 * height / 256))
    image = Image.new("RGB", size, (0, 0, 0))
    draw = ImageDraw.Draw(image)
    visible = ~np.isnan(points).any(axis=1)
    for limb, (a, b) in enumerate(COCO18_LIMBS):
        if visible[a] and visible[b]:
            draw.line([tuple(points[a]), tuple(points[b])], fill=COCO18_COLOURS[limb], width=thickness)
    for joint in np.flatnonzero(visible):
        x, y = points[joint]
        draw.ellipse((x - thickness, y - thickness, x + thickness, y + thickness), fill=COCO18_COLOURS[joint])
    return image
