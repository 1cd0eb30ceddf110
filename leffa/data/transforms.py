"""Per-sample stages after decoding: resize every key to (height, width), flip.

Samples leave these stages as uint8 tensors in (H, W, C) layout (flow: float16, as stored):
the DataLoader moves a quarter of the bytes of float32 between processes, and
``batch.to_model_batch`` makes the float (B, C, H, W) contract on the device.

Resampling per key:
- ``tgt``, ``ref``: bilinear with antialiasing (PIL widens its filter support by the
  downscale factor, so a 2x reduction averages like an area filter instead of aliasing).
- ``mask``: nearest, then binarised at 128, so the edge of the region to generate stays a
  sharp 0/1 edge.
- ``densepose``: nearest. The rendering encodes discrete body-part indices (and UV inside a
  part); interpolating across a part boundary would invent colours of parts that are not
  there. Nearest keeps every pixel a valid rendering value.
- ``flow``: nearest, on the same pixel grid as ``mask``. Its values are normalised
  ``grid_sample`` coordinates into ``ref`` (align_corners=True), which do not change with
  resolution, and sharing the mask's grid keeps NaN (outside the mask) exactly where the
  resized mask is 0.
"""

import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from leffa.data.distributed import stream_seed
from leffa.errors import UserError

IMAGE_KEYS = ("tgt", "ref", "densepose")
# Pose images whose colours say which side of the body a pixel is on: DensePose renders (part
# labels, and U/V inside a part, left and right parts distinct) and keypoint renders (limbs and
# joints coloured by side). Mirroring the pixels would need those labels swapped and U/V mapped
# by DensePose's symmetry tables (or the keypoints redrawn), which the shards do not allow.
SIDED_POSE_SOURCES = ("densepose", "keypoints")


def sided_pose_refusal(pose_source: str, where: str) -> str:
    """The one-line refusal of ``data.hflip`` for ``where`` (a sample or a shard) whose pose image has sides."""
    return (
        f"data.hflip: {where} carries a {pose_source} pose image (json pose_source"
        f" '{pose_source}') whose left and right sides a mirror would not swap; set data.hflip: false"
    )


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output pixel for nearest resampling (pixel centres aligned)."""
    # floor((i + 0.5) * size_in / size_out), in integers
    return (2 * np.arange(size_out) + 1) * size_in // (2 * size_out)


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest resampling of an (H0, W0, ...) array to (height, width, ...)."""
    if array.shape[:2] == (height, width):
        return array
    rows = nearest_indices(array.shape[0], height)
    cols = nearest_indices(array.shape[1], width)
    return array.take(rows, axis=0).take(cols, axis=1)  # 4x faster than array[rows[:, None], cols]


def resize_sample(sample: dict, height: int, width: int) -> dict:
    """Resize every spatial key of a decoded sample to (height, width).

    Args:
        sample: output of ``decode.decode_sample``.

    Returns:
        The sample with ``tgt, ref, densepose``: uint8 tensors (H, W, 3); ``mask``: uint8
        (H, W) in {0, 1}; ``flow``: float16 (H, W, 2) (if present); other keys unchanged.
    """
    out = dict(sample)
    for key in ("tgt", "ref"):
        out[key] = _tensor(np.asarray(sample[key].resize((width, height), Image.BILINEAR)))
    out["mask"] = _tensor((resize_nearest(np.asarray(sample["mask"]), height, width) >= 128).astype(np.uint8))
    out["densepose"] = _tensor(resize_nearest(np.asarray(sample["densepose"]), height, width))
    if "flow" in sample:
        out["flow"] = _tensor(resize_nearest(sample["flow"], height, width))
    return out


def hflip_sample(sample: dict) -> dict:
    """Mirror one resized sample left-right, every spatial key together.

    Only valid for samples whose pose image has no sides: ``random_hflip`` refuses the others.

    The target and the reference are both mirrored. A target pixel that looked up reference
    coordinate (x, y) now sits at the mirrored column and must look up the mirrored reference
    point, which is (-x, y) in normalised coordinates (align_corners=True maps column j to
    W-1-j exactly as x -> -x). So the flow array is mirrored along W and its x channel negated;
    then ``grid_sample(flip(ref), flip(flow)) == flip(grid_sample(ref, flow))``.

    Args:
        sample: output of ``resize_sample``: tensors (H, W, ...), W on dim 1.
    """
    out = dict(sample)
    for key in ("tgt", "ref", "mask", "densepose"):
        out[key] = torch.flip(sample[key], dims=[1])  # (H, W, ...): mirror W
    if "flow" in sample:
        flow = torch.flip(sample["flow"], dims=[1])  # (H, W, 2): mirror W
        out["flow"] = torch.stack([-flow[..., 0], flow[..., 1]], dim=-1)
    return out


def random_hflip(
    samples: Iterable[dict], p: float, seed: int, rank: int, start_step: int = 0
) -> Iterator[dict]:
    """Pipeline stage: ``hflip_sample`` with probability ``p``, from a per-worker seeded RNG.

    Raises:
        UserError: a sample's json declares a pose image with sides (``SIDED_POSE_SOURCES``);
            ``LeffaDataModule.setup`` already refuses a source whose first sample does.
    """
    rng = random.Random(f"hflip-{stream_seed(seed, rank, start_step)}")
    for sample in samples:
        pose_source = sample.get("meta", {}).get("pose_source")
        if pose_source in SIDED_POSE_SOURCES:
            raise UserError(sided_pose_refusal(pose_source, f"sample '{sample.get('key')}'"))
        yield hflip_sample(sample) if rng.random() < p else sample


def _tensor(array: np.ndarray) -> torch.Tensor:
    """numpy -> tensor without a copy where numpy allows it (PIL hands out read-only arrays)."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())
