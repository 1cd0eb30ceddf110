"""Random images for the synthetic set: garment-like reference textures, target backgrounds and
a blob-shaped garment region. Everything is drawn from the numpy Generator it is given."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 1.0, size=3)


def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))  # x, y: (H, W)


def _two_tone(rng: np.random.Generator, profile: np.ndarray) -> np.ndarray:
    """Blend two random colours by a (H, W) profile in [0, 1] -> (H, W, 3)."""
    first, second = _colour(rng), _colour(rng)
    return first * (1 - profile[..., None]) + second * profile[..., None]


def stripes(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Soft-edged stripes of random angle, period and sharpness."""
    x, y = _pixel_grid(height, width)
    angle, period = rng.uniform(0, np.pi), rng.uniform(0.06, 0.2) * width
    wave = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + rng.uniform(0, 2 * np.pi))
    return _two_tone(rng, np.clip(0.5 + rng.uniform(0.6, 2.0) * wave, 0, 1))


def checker(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A rotated, soft-edged checkerboard."""
    x, y = _pixel_grid(height, width)
    angle, cell = rng.uniform(0, np.pi / 2), rng.uniform(0.08, 0.25) * width
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    wave = np.sin(np.pi * u / cell) * np.sin(np.pi * v / cell)
    return _two_tone(rng, np.clip(0.5 + rng.uniform(1.0, 3.0) * wave, 0, 1))


def add_blobs(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Blend 2 to 5 Gaussian colour blobs over an (H, W, 3) image."""
    height, width, _ = image.shape
    x, y = _pixel_grid(height, width)
    for _ in range(rng.integers(2, 6)):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        sigma = rng.uniform(0.08, 0.25) * width
        alpha = rng.uniform(0.4, 0.9) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
        image = image * (1 - alpha[..., None]) + _colour(rng) * alpha[..., None]
    return image


def add_strokes(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Rows of short random strokes, like printed lettering on a garment."""
    height, width, _ = image.shape
    canvas = Image.fromarray(np.uint8(np.round(image * 255)), mode="RGB")
    draw = ImageDraw.Draw(canvas)
    ink = tuple(int(c) for c in rng.integers(0, 256, size=3))
    glyph = max(3, round(0.06 * width))
    top = rng.uniform(0.15, 0.6) * height
    for row in range(rng.integers(1, 4)):
        x, y = rng.uniform(0.1, 0.3) * width, top + row * 2.2 * glyph
        while x < 0.85 * width:
            points = [(x + rng.uniform(0, glyph), y + rng.uniform(0, 1.6 * glyph)) for _ in range(rng.integers(2, 4))]
            draw.line(points, fill=ink, width=max(1, glyph // 4))
            x += glyph * rng.uniform(1.0, 1.6)
    return np.asarray(canvas, dtype=np.float64) / 255


def reference_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A garment-like (H, W, 3) texture in [0, 1]: stripes, checker or plaid, blobs, maybe strokes."""
    kind = rng.integers(0, 3)
    if kind == 0:
        image = stripes(rng, height, width)
    elif kind == 1:
        image = checker(rng, height, width)
    else:
        image = 0.5 * stripes(rng, height, width) + 0.5 * stripes(rng, height, width)  # plaid
    image = add_blobs(rng, image)
    if rng.uniform() < 0.6:
        image = add_strokes(rng, image)
    return np.clip(image, 0, 1)


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A (H, W, 3) target background in [0, 1]: a gradient, smooth noise, or a flat colour with grain."""
    kind = rng.integers(0, 3)
    x, y = _pixel_grid(height, width)
    if kind == 0:
        angle = rng.uniform(0, 2 * np.pi)
        ramp = x / width * np.cos(angle) + y / height * np.sin(angle)
        image = _two_tone(rng, (ramp - ramp.min()) / max(np.ptp(ramp), 1e-9))
    elif kind == 1:
        coarse = rng.uniform(0, 255, size=(4, 3, 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(coarse, mode="RGB").resize((width, height), Image.BICUBIC)) / 255
    else:
        image = np.broadcast_to(_colour(rng), (height, width, 3))
    return np.clip(image + rng.normal(0, 0.02, size=(height, width, 3)), 0, 1)


def garment_region(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, dict]:
    """A blob (an ellipse with a wavy rim) over normalised coords (x, y in [-1, 1]); returns mask and shape."""
    shape = {"cx": rng.uniform(-0.15, 0.15), "cy": rng.uniform(-0.15, 0.15),
             "a": rng.uniform(0.45, 0.75), "b": rng.uniform(0.5, 0.8)}  # fmt: skip
    u, v = (x - shape["cx"]) / shape["a"], (y - shape["cy"]) / shape["b"]
    phi = np.arctan2(v, u)
    rim = 1 + rng.uniform(0, 0.12) * np.cos(2 * phi + rng.uniform(0, 2 * np.pi))
    rim += rng.uniform(0, 0.12) * np.cos(3 * phi + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) <= rim, shape
