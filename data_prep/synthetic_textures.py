"""Random images for the synthetic set: reference textures, target backgrounds and a blob-shaped
garment region. Everything is drawn from the numpy Generator it is given.

Reference texture families (:data:`TEXTURES`), fixed before any experiment: the Leffa loss (Eq. 4)
can only teach a flow where the reference's content says where a pixel came from.

- ``periodic``: stripes, checks or plaid (repeating every few pixels, under one token cell) with
  blobs and strokes: the negative control; a warp by a whole period looks as right as the truth.
- ``ramp``: red grows with x, green with y, blue is a smooth field: the positive control; the
  colour of a pixel names its position.
- ``smooth``: low-frequency colour fields, garment-like: red a random smooth monotonic function
  of x, green one of y, blue a smooth random field; position is still encoded (red and green are
  strictly monotonic), but unevenly.
- ``prints``: a plain ground with a few sparse prints (discs, squares, bars) of distinct colours
  at distinct places: identifiable where there is a print, not on the plain ground.
- ``mixed``: half ``periodic``, half ``smooth`` (a woven pattern under a colour gradient).
"""

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


def ramp(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Red linear in x, green linear in y (random ranges of at least 0.6, either direction), blue a
    smooth random field: every pixel's (red, green) is unique."""
    x, y = _pixel_grid(height, width)
    return np.stack([_monotone_line(rng, x / max(width - 1, 1)), _monotone_line(rng, y / max(height - 1, 1)),
                     _smooth_field(rng, height, width)], axis=-1)


def smooth(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-frequency colour fields: red a random smooth strictly increasing (or decreasing) function
    of x, green one of y, blue a smooth random field; every pixel's (red, green) is unique."""
    x, y = _pixel_grid(height, width)
    red = _monotone_line(rng, _smooth_monotone(rng, x[0] / max(width - 1, 1))[None, :].repeat(height, 0))
    green = _monotone_line(rng, _smooth_monotone(rng, y[:, 0] / max(height - 1, 1))[:, None].repeat(width, 1))
    return np.stack([red, green, _smooth_field(rng, height, width)], axis=-1)


PRINT_COLOURS = 6


def prints(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A plain ground with ``PRINT_COLOURS`` prints (disc, square or bar) of distinct colours (each at
    least 0.25 from the ground and from each other in every channel's range), at places that do
    not overlap."""
    ground = rng.uniform(0.2, 0.8, size=3)
    colours = _distinct_colours(rng, ground, PRINT_COLOURS)
    image = np.broadcast_to(ground, (height, width, 3)).copy()
    taken = np.zeros((height, width), dtype=bool)
    x, y = _pixel_grid(height, width)
    size = 0.09 * min(height, width)
    for colour in colours:
        for _ in range(50):  # a free place for this print
            cx, cy = rng.uniform(size, width - size), rng.uniform(size, height - size)
            kind = rng.integers(0, 3)
            if kind == 0:
                shape = np.hypot(x - cx, y - cy) <= size
            elif kind == 1:
                shape = (np.abs(x - cx) <= size) & (np.abs(y - cy) <= size)
            else:
                shape = (np.abs(x - cx) <= 1.6 * size) & (np.abs(y - cy) <= 0.5 * size)
            if not (shape & _grow(taken)).any():
                image[shape], taken = colour, taken | shape
                break
    return image


def mixed(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Half a periodic texture, half a smooth colour field."""
    return np.clip(0.5 * reference_texture(rng, height, width) + 0.5 * smooth(rng, height, width), 0, 1)


def _monotone_line(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """``t`` in [0, 1] mapped linearly onto a random range of length 0.6 to 0.9 inside [0.05, 0.95],
    increasing or decreasing at random."""
    span = rng.uniform(0.6, 0.9)
    low = rng.uniform(0.05, 0.95 - span)
    t = t if rng.uniform() < 0.5 else 1 - t
    return low + span * t


def _smooth_monotone(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """A random smooth strictly increasing map of [0, 1] onto [0, 1]: the integral of a positive
    random slope (three cosine terms, slope between 0.25 and 1.75 of the mean)."""
    dense = np.linspace(0, 1, 257)
    slope = np.ones_like(dense)
    for k in range(1, 4):
        slope += rng.uniform(-0.25, 0.25) * np.cos(np.pi * k * dense + rng.uniform(0, 2 * np.pi))
    cumulative = np.concatenate([[0.0], np.cumsum((slope[1:] + slope[:-1]) / 2)])
    return np.interp(t, dense, cumulative / cumulative[-1])


def _smooth_field(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random (H, W) field in [0.1, 0.9]: a 4x3 grid of values, bicubically enlarged."""
    coarse = rng.uniform(0.1, 0.9, size=(4, 3))
    image = Image.fromarray(np.float32(coarse), mode="F").resize((width, height), Image.BICUBIC)
    return np.clip(np.asarray(image, dtype=np.float64), 0.1, 0.9)


def _distinct_colours(rng: np.random.Generator, ground: np.ndarray, count: int) -> list[np.ndarray]:
    """``count`` colours, each at least 0.25 (max over channels) from the ground and from each other."""
    colours: list[np.ndarray] = []
    while len(colours) < count:
        colour = rng.uniform(0, 1, size=3)
        if all(np.abs(colour - other).max() >= 0.25 for other in [ground, *colours]):
            colours.append(colour)
    return colours


def _grow(region: np.ndarray) -> np.ndarray:
    """``region`` grown by one pixel (4-neighbourhood), so prints never touch."""
    grown = region.copy()
    grown[1:] |= region[:-1]
    grown[:-1] |= region[1:]
    grown[:, 1:] |= region[:, :-1]
    grown[:, :-1] |= region[:, 1:]
    return grown


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


TEXTURES = {"periodic": reference_texture, "ramp": ramp, "smooth": smooth, "prints": prints, "mixed": mixed}
# the families whose content says where a pixel came from (see the module docstring)
IDENTIFIABLE = ("ramp", "smooth", "prints", "mixed")
