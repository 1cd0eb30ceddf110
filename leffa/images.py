"""Image files as the person who made them means them: the one reader of every image leffa and
``data_prep`` open (shard members, ``--data.predict_folder``, the folder converter and the other
converters, ``leffa eval``).

On top of PIL's decoding, ``normalize_image``:

- applies the EXIF orientation (a phone stores a portrait photo sideways and says so in EXIF),
  so sizes and pixels are those of the upright picture;
- scales 16-bit grey (PIL modes ``I;16*`` and ``I``) to 8 bits: 65535 -> 255, 32768 -> 128
  (PIL itself clips, making anything above 255 white; 16-bit RGB(A) PNGs PIL already opens as
  8-bit RGB(A));
- composites transparent pixels (an alpha channel, or a PNG transparency colour) onto a
  background instead of keeping whatever colour lies under them: white for photos (person,
  garment), black for masks and pose images (black is "keep" and "background" there).

``check_aspect_ratios`` refuses a mask or pose image whose upright aspect ratio differs from its
person photo's by more than ``ASPECT_TOLERANCE``: resizing it would stretch it silently.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from leffa.errors import UserError

__all__ = [
    "ASPECT_TOLERANCE", "WHITE", "BLACK", "ORIENTATION_APPLIED", "SCALED_16BIT", "ALPHA_COMPOSITED",
    "normalize_image", "read_image", "image_size", "aspect_differs", "check_aspect_ratios",
]  # fmt: skip

# Largest relative difference of width/height between a person photo and its mask or pose image
# that is still resized to fit: 3% is a few pixels of rounding or cropping at phone sizes.
ASPECT_TOLERANCE = 0.03
WHITE, BLACK = (255, 255, 255), (0, 0, 0)
EXIF_ORIENTATION = 0x0112
SWAPS_SIDES = (5, 6, 7, 8)  # orientations that turn the stored image a quarter turn
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL opens 16-bit grey PNGs as I;16 (I before)
SHOWN_MISMATCHES = 3  # mismatched files named in the error; the rest are counted
# What normalize_image reports having done (data_prep counts them into the manifest)
ORIENTATION_APPLIED, SCALED_16BIT, ALPHA_COMPOSITED = "exif_orientation", "16bit_to_8bit", "alpha_composited"


def exif_orientation(image: Image.Image, header_only: bool = False) -> int:
    """The EXIF orientation 1..8 of an opened image (1: as stored; unknown values count as 1).

    PIL reads a PNG's eXIf chunk that follows the pixel data only by decoding them; with
    ``header_only`` such a PNG counts as unrotated instead (writers put eXIf first).
    """
    if header_only and image.format == "PNG" and "exif" not in image.info:
        return 1
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return orientation if orientation in range(1, 9) else 1


def normalize_image(
    image: Image.Image, mode: str, background: tuple[int, int, int] = WHITE
) -> tuple[Image.Image, list[str]]:
    """An opened image, upright and 8-bit, transparent pixels composited on ``background``, in ``mode``.

    Returns:
        The image and what was done to it: ``ORIENTATION_APPLIED``, ``SCALED_16BIT``,
        ``ALPHA_COMPOSITED`` (only when a pixel was not fully opaque).
    """
    done = []
    if exif_orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
        done.append(ORIENTATION_APPLIED)
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float32)
        grey = Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8), mode="L")
        transparent = image.info.get("transparency")  # a 16-bit PNG's one transparent grey value
        if isinstance(transparent, int):
            grey.putalpha(Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8), mode="L"))
        image = grey
        done.append(SCALED_16BIT)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba)
            done.append(ALPHA_COMPOSITED)
        else:
            image = rgba
    return image.convert(mode), done


def read_image(
    source: str | Path | bytes | BinaryIO,
    mode: str,
    draft_size: tuple[int, int] | None = None,
    background: tuple[int, int, int] = WHITE,
) -> tuple[Image.Image, tuple[int, int]]:
    """Fully decode a file (or its bytes) with ``normalize_image``; also return its upright native (W, H).

    Args:
        draft_size: (height, width) the image will be resized to: a JPEG is then decoded by
            libjpeg's DCT scaling at the smallest of 1/1, 1/2, 1/4, 1/8 that still covers it
            (upright), several times faster for 1024x768 -> 512x384.

    Raises:
        OSError, SyntaxError, ValueError, ...: what PIL raises for bytes that are no image or are
        truncated (callers name the file).
    """
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        if draft_size is None or image.format != "JPEG":
            normalized, _ = normalize_image(image, mode, background)  # decodes: truncated bytes raise here
            return normalized, normalized.size
        orientation = exif_orientation(image, header_only=True)  # a JPEG's EXIF precedes its pixels
        native = image.size[::-1] if orientation in SWAPS_SIDES else image.size
        height, width = draft_size
        image.draft(mode, (height, width) if orientation in SWAPS_SIDES else (width, height))
        normalized, _ = normalize_image(image, mode, background)
    return normalized, native


def image_size(path: str | Path) -> tuple[int, int]:
    """The upright (W, H) of an image file, from its header and EXIF (see ``exif_orientation``)."""
    with Image.open(path) as image:
        return image.size[::-1] if exif_orientation(image, header_only=True) in SWAPS_SIDES else image.size


def aspect_differs(size: tuple[int, int], other: tuple[int, int], tolerance: float = ASPECT_TOLERANCE) -> bool:
    """Whether the width/height ratios of two (W, H) sizes differ by more than ``tolerance`` (relative)."""
    ratio = (size[0] * other[1]) / (size[1] * other[0])
    return max(ratio, 1 / ratio) - 1 > tolerance


def check_aspect_ratios(groups: Iterable[tuple[Path, Iterable[Path]]], root: str | Path, size=image_size) -> None:
    """One UserError naming the (mask or pose, person) files whose upright aspect ratios differ.

    Args:
        groups: (person photo, its mask and pose images) per sample; each file is read once.
        size: (W, H) of a file; a file it cannot read is passed over (read later, and reported there).
    """
    sizes: dict[Path, tuple[int, int] | None] = {}

    def size_of(path: Path) -> tuple[int, int] | None:
        if path not in sizes:
            try:
                sizes[path] = size(path)
            except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
                sizes[path] = None
        return sizes[path]

    root = Path(root)
    mismatches: dict[tuple[Path, Path], None] = {}  # (mask or pose, person), in order, once
    for person, others in groups:
        for other in others:
            person_size, other_size = size_of(person), size_of(other)
            if person_size and other_size and aspect_differs(person_size, other_size):
                mismatches[other, person] = None
    if mismatches:

        def describe(path: Path) -> str:
            width, height = sizes[path]
            return f"{path.relative_to(root) if path.is_relative_to(root) else path} ({width}x{height})"

        shown = "; ".join(f"{describe(other)} vs {describe(person)}"
                          for other, person in list(mismatches)[:SHOWN_MISMATCHES])  # fmt: skip
        more = f" and {len(mismatches) - SHOWN_MISMATCHES} more" if len(mismatches) > SHOWN_MISMATCHES else ""
        raise UserError(
            f"{len(mismatches)} masks or pose images in {root} have another aspect ratio (W x H, EXIF "
            f"orientation applied) than their person photo, by more than {ASPECT_TOLERANCE:.0%}: {shown}{more}; "
            "resizing them would stretch them: crop or pad them to the photo's shape"
        )
