"""Reading raw dataset files; every failure becomes a SampleError that names the file.

Photos, masks and pose images are read by leffa's one image reader (`leffa.images`): EXIF
orientation applied, 16-bit scaled to 8 bits, transparent pixels composited (photos on white, masks
and poses on black). What it did is collected per sample (`take_conversions`) for the manifest.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.sample import SampleError
from leffa.images import BLACK, WHITE, normalize_image
from leffa.pair_file import check_file_names, read_pair_file

# PIL raises OSError for missing, truncated or unidentified files, SyntaxError for broken PNG
# chunks and ValueError/EOFError for some malformed headers. An image of more pixels than
# Image.MAX_IMAGE_PIXELS (a possible decompression bomb) raises DecompressionBombError above twice
# the limit and only warns between once and twice it; the warning is made an error below, so every
# image over the limit is refused before it is decoded.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError, Image.DecompressionBombWarning)
# What normalize_image did to the images read since the last take_conversions() (in this process:
# split_conversion.load_or_reason takes them after each sample, in the worker that loaded it).
_CONVERSIONS: list[str] = []


def take_conversions() -> list[str]:
    """The conversions (`leffa.images.ORIENTATION_APPLIED`, ...) of the images read since the
    last call, one entry per image and conversion; forgets them."""
    taken = list(_CONVERSIONS)
    _CONVERSIONS.clear()
    return taken


def _open_loaded(path: Path) -> Image.Image:
    if not path.is_file():
        raise SampleError(f"missing file {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decode now: a truncated file fails here, not later in a worker
                return image.copy()
    except _PIL_ERRORS as err:
        raise SampleError(f"cannot read image {path}: {err}") from err


def _normalized(path: Path, mode: str, background: tuple[int, int, int]) -> Image.Image:
    image, conversions = normalize_image(_open_loaded(path), mode, background)
    _CONVERSIONS.extend(conversions)
    return image


def load_rgb(path: Path, size: tuple[int, int] | None = None, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """An RGB image, upright, transparent pixels on `background` (white: a photo; black: a pose
    image); resized bilinearly to `size` (W, H) when given and different."""
    image = _normalized(path, "RGB", background)
    if size is not None and image.size != size:
        image = image.resize(size, Image.BILINEAR)
    return image


def load_labels(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A label map (mode P: palette indices, or L/I: values) as (H, W) ints; NEAREST resize to `size`."""
    image = _open_loaded(path)
    if image.mode not in ("P", "L", "I", "I;16"):
        raise SampleError(f"label map {path} has mode {image.mode}; expected a single-channel P or L image")
    if size is not None and image.size != size:
        image = image.resize(size, Image.NEAREST)
    return np.asarray(image).astype(np.int64)


def load_binary_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A stored binary mask as uint8 {0, 255}: grey >= 128 -> 255 (the VITON-HD loaders' threshold);
    transparent pixels are black (0)."""
    image = _normalized(path, "L", BLACK)
    if image.size != size:
        image = image.resize(size, Image.NEAREST)
    return np.where(np.asarray(image) >= 128, 255, 0).astype(np.uint8)


def load_json(path: Path) -> dict:
    """A JSON file as a dict."""
    if not path.is_file():
        raise SampleError(f"missing file {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: nested too deeply
        raise SampleError(f"cannot read JSON {path}: {err}") from err


def read_pair_lines(path: Path, columns: tuple[str, ...], root_hint: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line of a whitespace-separated pair file.

    A missing pair file, a line without exactly one field per name in `columns`, or bytes that
    are not UTF-8 stop the whole run (naming the file and line) instead of skipping samples.
    """
    if not path.is_file():
        raise FileNotFoundError(f"pair file {path} not found; {root_hint}")
    return [(number, check_file_names(path, number, fields)) for number, fields in read_pair_file(path, columns)]
