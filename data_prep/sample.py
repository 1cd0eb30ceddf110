"""One encoded shard sample, checked against the schema of ``leffa.schema`` (docs/design.md, "Shard schema")."""

from __future__ import annotations

import numpy as np
from PIL import Image

from data_prep.encode import jpeg_bytes, json_bytes, npy_bytes, png_bytes
from leffa.schema import OPTIONAL_MEMBERS, PAIRINGS, REQUIRED_MEMBERS, TASKS


class SampleError(Exception):
    """A sample cannot be built from its source files (missing or corrupt); it is skipped."""


def build_sample(
    key: str,
    tgt: Image.Image,
    ref: Image.Image,
    mask: np.ndarray,
    densepose: Image.Image,
    meta: dict,
    flow: np.ndarray | None = None,
) -> dict[str, str | bytes]:
    """Check one sample against the schema and encode it into the bytes stored in a shard.

    Args:
        key: sample key from `leffa.schema.build_key`.
        tgt: target person, RGB.
        ref: reference (garment or another photo of the person), RGB, any size.
        mask: (H, W) uint8, 255 = region to generate, 0 elsewhere, same size as `tgt`.
        densepose: RGB pose image of the target, same size as `tgt`.
        meta: dataset, split, task, category, pairing, tgt_id, ref_id (+ pose_source, ...);
            height and width are filled in from `tgt`.
        flow: optional (H, W, 2) grid_sample coordinates (x, y) into `ref`, NaN outside the mask.
    """
    if "." in key:
        raise ValueError(f"sample key {key!r} contains a dot; webdataset would split it there")
    width, height = tgt.size
    if mask.shape != (height, width) or mask.dtype != np.uint8:
        raise ValueError(f"{key}: mask must be uint8 of shape {(height, width)}, got {mask.dtype} {mask.shape}")
    if not np.isin(mask, (0, 255)).all():
        raise ValueError(f"{key}: mask values must be 0 or 255")
    if densepose.size != tgt.size:
        raise ValueError(f"{key}: densepose size {densepose.size} differs from target size {tgt.size}")
    if meta.get("task") not in TASKS or meta.get("pairing") not in PAIRINGS:
        raise ValueError(f"{key}: task must be one of {TASKS} and pairing one of {PAIRINGS}, got {meta}")
    meta = {**meta, "height": height, "width": width}
    sample = {
        "__key__": key,
        "tgt.jpg": jpeg_bytes(tgt),
        "ref.jpg": jpeg_bytes(ref),
        "mask.png": png_bytes(Image.fromarray(mask, mode="L")),
        "densepose.png": png_bytes(densepose.convert("RGB")),
        "json": json_bytes(meta),
    }
    if flow is not None:
        if flow.shape != (height, width, 2):
            raise ValueError(f"{key}: flow must have shape {(height, width, 2)}, got {flow.shape}")
        sample["flow.npy"] = npy_bytes(flow.astype(np.float16))
    task = meta["task"]
    members = set(sample) - {"__key__"}
    if not set(REQUIRED_MEMBERS[task]) <= members <= set(REQUIRED_MEMBERS[task]) | set(OPTIONAL_MEMBERS[task]):
        raise ValueError(f"{key}: members {sorted(members)} do not follow the schema of task {task!r} (leffa.schema)")
    return sample
