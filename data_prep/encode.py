"""Images, arrays and metadata -> the bytes stored in a shard (PIL and numpy only, never pickle)."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

JPEG_QUALITY = 95
# 4:4:4 chroma: PIL's default 4:2:0 subsampling at quality 95 blurs thin coloured garment detail.
JPEG_SUBSAMPLING = 0


def jpeg_bytes(image: Image.Image) -> bytes:
    """RGB JPEG at quality 95."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    """Lossless PNG in the image's own mode (L for masks, RGB for pose images)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """`.npy` bytes via numpy.save with pickling disabled."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def json_bytes(meta: dict) -> bytes:
    """UTF-8 JSON with sorted keys, so the same sample always gives the same bytes."""
    return json.dumps(meta, sort_keys=True).encode("utf-8")
