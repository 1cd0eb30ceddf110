"""A synthetic try-on set with exact ground-truth flow (no download), for tests and the CPU demo.

Each sample (deterministic in --seed, split and index): `ref` is a texture of the family
`--texture` (`synthetic_textures.TEXTURES`: `periodic`, the default, `ramp`, `smooth`, `prints`,
`mixed`; for a given seed, split and index every family shares the region, the map and the
background, only the reference's content differs); `tgt` is a background with a blob-shaped garment
region into which `ref` is carried by a known smooth map, target pixel -> reference coordinate:

    q(p) = R(theta) diag(s / a, s / b) (p - c) + t + (alpha_x sin(2 pi f_x y + phi_x),
                                                      alpha_y sin(2 pi f_y x + phi_y))

with p = (x, y) and q in grid_sample coordinates (x, y in [-1, 1], align_corners=True), c and
(a, b) the blob's centre and semi-axes. The region is shrunk to the pixels whose q (rounded to
float16, as stored) lies in [-1, 1]^2; there `tgt = grid_sample(ref, q, bilinear,
align_corners=True)` (`grid_sample_bilinear`, the same arithmetic in numpy), so `flow.npy` is
the exact correspondence. `mask.png` is that region; `densepose.png` colours it like an IUV image:
R = U = (q_x + 1) / 2, G = V = (q_y + 1) / 2, B = part = reference quadrant (1..4) * 60, black outside.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data_prep.sample import build_sample
from data_prep.synthetic_textures import TEXTURES, background, garment_region, reference_texture
from leffa.schema import build_key

DATASET = "synthetic"
SPLITS = ("train", "test")
SOURCE_OPTIONS = ()  # generated: no source folder (--src is accepted and ignored)


@dataclass(frozen=True)
class SyntheticSpec:
    """One generated sample: everything is derived from (seed, split, index)."""

    key: str
    source: str
    split: str
    pairing: str
    index: int
    seed: int
    height: int
    width: int
    texture: str = "periodic"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", nargs="?", default=None, help="ignored: the set is generated (make shards passes one)")
    parser.add_argument("--seed", type=int, default=0, help="base random seed")
    parser.add_argument("--count", type=int, default=64, help="samples per split")
    parser.add_argument("--height", type=int, default=128, help="image height in pixels")
    parser.add_argument("--width", type=int, default=96, help="image width in pixels")
    parser.add_argument("--texture", choices=list(TEXTURES), default="periodic",
                        help="reference texture family (see data_prep/synthetic_textures.py; default periodic)")


def list_samples(args: argparse.Namespace, split: str) -> list[SyntheticSpec]:
    """`--count` specs for the split."""
    if args.count < 0 or args.height < 8 or args.width < 8:
        raise ValueError(f"need --count >= 0 and --height, --width >= 8, got {args.count}, {args.height}, {args.width}")
    return [
        SyntheticSpec(build_key(DATASET, split, "paired", f"{index:06d}"), f"seed {args.seed} {split} #{index}",
                      split, "paired", index, args.seed, args.height, args.width, args.texture)
        for index in range(args.count)
    ]  # fmt: skip


def no_samples_reason(args: argparse.Namespace) -> str:
    """Why a split lists no sample, in the user's terms."""
    return f"--count {args.count}"


def grid_sample_bilinear(image: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """torch.nn.functional.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=True) in numpy.

    Args:
        image: (H_in, W_in, C) values.
        grid: (H, W, 2) sampling positions (x, y), -1 and +1 at the centres of the border pixels.
    Returns:
        (H, W, C) samples; corners outside the image count as 0.
    """
    height_in, width_in, _ = image.shape
    ix = (grid[..., 0] + 1) / 2 * (width_in - 1)
    iy = (grid[..., 1] + 1) / 2 * (height_in - 1)
    x0, y0 = np.floor(ix).astype(np.int64), np.floor(iy).astype(np.int64)
    wx, wy = (ix - x0)[..., None], (iy - y0)[..., None]
    out = np.zeros(grid.shape[:2] + image.shape[2:], dtype=np.float64)
    for dy, dx, weight in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx), (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):
        xs, ys = x0 + dx, y0 + dy
        inside = (xs >= 0) & (xs < width_in) & (ys >= 0) & (ys < height_in)
        corner = image[np.clip(ys, 0, height_in - 1), np.clip(xs, 0, width_in - 1)]
        out += np.where(inside[..., None], weight * corner, 0.0)
    return out


def warp_field(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, shape: dict) -> np.ndarray:
    """q(p) of the module docstring: (H, W, 2) reference coordinates for normalised target coords."""
    theta, scale = rng.uniform(-0.4, 0.4), rng.uniform(0.75, 1.0)
    shift = rng.uniform(-0.08, 0.08, size=2)
    sx, sy = scale / shape["a"] * (x - shape["cx"]), scale / shape["b"] * (y - shape["cy"])
    qx = np.cos(theta) * sx - np.sin(theta) * sy + shift[0]
    qy = np.sin(theta) * sx + np.cos(theta) * sy + shift[1]
    amplitude, frequency, phase = rng.uniform(0.03, 0.08, 2), rng.uniform(0.3, 0.8, 2), rng.uniform(0, 2 * np.pi, 2)
    qx += amplitude[0] * np.sin(2 * np.pi * frequency[0] * y + phase[0])
    qy += amplitude[1] * np.sin(2 * np.pi * frequency[1] * x + phase[1])
    return np.stack([qx, qy], axis=-1)


def densepose_like(flow: np.ndarray, region: np.ndarray) -> Image.Image:
    """IUV-style colouring of the region by its reference coordinates; black outside."""
    q = np.nan_to_num(flow.astype(np.float64))
    part = 1 + (q[..., 0] > 0) + 2 * (q[..., 1] > 0)  # reference quadrant 1..4
    iuv = np.stack([(q[..., 0] + 1) / 2 * 255, (q[..., 1] + 1) / 2 * 255, part * 60], axis=-1)
    return Image.fromarray(np.where(region[..., None], np.round(iuv), 0).astype(np.uint8), mode="RGB")


def _to_image(array: np.ndarray) -> Image.Image:
    """(H, W, 3) floats in [0, 1] -> 8-bit RGB image."""
    return Image.fromarray(np.round(array * 255).astype(np.uint8), mode="RGB")


def load_sample(spec: SyntheticSpec) -> dict:
    """Generate and encode one sample."""
    rng = np.random.default_rng([spec.seed, SPLITS.index(spec.split), spec.index])
    height, width = spec.height, spec.width
    # the periodic texture is always drawn from the sample's stream, so that every family shares the
    # region, map and background that follow; another family draws from a stream of its own
    texture = reference_texture(rng, height, width)
    if spec.texture != "periodic":
        texture_rng = np.random.default_rng([spec.seed, SPLITS.index(spec.split), spec.index, 1])
        texture = TEXTURES[spec.texture](texture_rng, height, width)
    ref = np.round(texture * 255) / 255  # the 8-bit reference that is stored
    x, y = np.meshgrid(np.linspace(-1, 1, width), np.linspace(-1, 1, height))  # align_corners=True pixel centres
    region, shape = garment_region(rng, x, y)
    flow = warp_field(rng, x, y, shape).astype(np.float16)  # stored precision, also used for rendering
    region &= (np.abs(flow.astype(np.float64)) <= 1).all(axis=-1)
    flow[~region] = np.nan
    warped = grid_sample_bilinear(ref, np.nan_to_num(flow.astype(np.float64)))
    tgt = np.where(region[..., None], warped, background(rng, height, width))
    meta = {
        "dataset": DATASET, "split": spec.split, "task": "tryon", "category": "synthetic", "pairing": "paired",
        "tgt_id": f"{spec.index:06d}", "ref_id": f"{spec.index:06d}", "pose_source": "densepose", "texture": spec.texture,
    }  # fmt: skip
    mask = np.where(region, 255, 0).astype(np.uint8)
    return build_sample(spec.key, _to_image(tgt), _to_image(ref), mask, densepose_like(flow, region), meta, flow=flow)
