"""Reading raw dataset files; every failure becomes a SampleError that names the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.sample import SampleError

# PIL raises OSError for missing, truncated or unidentified files, SyntaxError for broken PNG
# chunks and ValueError/EOFError for some malformed headers.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


def _open_loaded(path: Path) -> Image.Image:
    if not path.is_file():
        raise SampleError(f"missing file {path}")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later in a worker
            return image.copy()
    except _PIL_ERRORS as err:
        raise SampleError(f"cannot read image {path}: {err}") from err


def load_rgb(path: Path, size: tuple[int, int] | None = None) -> Image.Image:
    """An RGB image; resized bilinearly to `size` (W, H) when given and different."""
    image = _open_loaded(path).convert("RGB")
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
    """A stored binary mask as uint8 {0, 255}: grey >= 128 -> 255 (the VITON-HD loaders' threshold)."""
    image = _open_loaded(path).convert("L")
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
    except (OSError, ValueError) as err:
        raise SampleError(f"cannot read JSON {path}: {err}") from err


def read_pair_lines(path: Path, columns: int, root_hint: str) -> list[list[str]]:
    """Whitespace-separated pair file -> rows of `columns` fields (blank lines ignored).

    A missing or malformed pair file is an error for the whole run, not a skipped sample.
    """
    if not path.is_file():
        raise FileNotFoundError(f"pair file {path} not found; {root_hint}")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != columns:
                raise ValueError(f"{path}:{number}: expected {columns} columns, got {len(fields)}: {line.strip()!r}")
            rows.append(fields)
    return rows
