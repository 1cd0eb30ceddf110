"""Synthetic samples in the shard schema, for tests and benchmarks (noise + gradient content).

``write_split`` writes shards with ``webdataset.ShardWriter`` and adds the split to the
folder's ``manifest.json`` (schema_version 1), as data_prep does for real datasets.
"""

import io
import json
import os
from collections.abc import Iterable

import numpy as np
import webdataset as wds
from PIL import Image

from leffa.data.shards import MANIFEST_NAME, SCHEMA_VERSION


def encode_sample(
    key: str,
    tgt: np.ndarray,
    ref: np.ndarray,
    mask: np.ndarray,
    densepose: np.ndarray,
    meta: dict,
    flow: np.ndarray | None = None,
    quality: int = 90,
) -> dict:
    """Arrays -> ``{"__key__", "tgt.jpg", "ref.jpg", "mask.png", "densepose.png", "json", "flow.npy"?}`` bytes.

    Args:
        tgt, ref, densepose: uint8 (H, W, 3) (ref may have another size); mask: uint8 (H, W);
        flow: (H, W, 2), stored as float16.
    """
    sample = {
        "__key__": key,
        "tgt.jpg": _encode(tgt, "JPEG", quality=quality),
        "ref.jpg": _encode(ref, "JPEG", quality=quality),
        "mask.png": _encode(mask, "PNG"),
        "densepose.png": _encode(densepose, "PNG"),
        "json": json.dumps(meta).encode(),
    }
    if flow is not None:
        buf = io.BytesIO()
        np.save(buf, flow.astype(np.float16), allow_pickle=False)
        sample["flow.npy"] = buf.getvalue()
    return sample


def random_arrays(
    height: int, width: int, rng: np.random.Generator, with_flow: bool = True, noise: float = 12.0
) -> dict:
    """Arrays of one synthetic sample: a rectangle to generate, a flow that is a shifted identity in it.

    Returns:
        ``{"tgt", "ref", "densepose"}``: uint8 (H, W, 3); ``"mask"``: uint8 (H, W) in {0, 255};
        ``"flow"``: float32 (H, W, 2) or None.
    """

    def image() -> np.ndarray:
        yy, xx = np.mgrid[0:height, 0:width]
        colour = rng.uniform(0, 255, size=(2, 3))
        t = ((xx / max(width - 1, 1) + yy / max(height - 1, 1)) / 2)[..., None]
        img = (1 - t) * colour[0] + t * colour[1] + rng.normal(0, noise, size=(height, width, 3))
        return np.clip(img, 0, 255).astype(np.uint8)

    mask = np.zeros((height, width), np.uint8)
    top, left = height // 4, width // 4
    mask[top : height - top, left : width - left] = 255
    # DensePose-like rendering inside the mask: a part index per block, U and V ramps in a part.
    yy, xx = np.mgrid[0:height, 0:width]
    part_rows, part_cols = yy * 4 // height, xx * 3 // width
    densepose = np.stack(
        [10 * (1 + part_rows * 3 + part_cols), (xx * 3 * 255 // width) % 256, (yy * 4 * 255 // height) % 256], axis=-1
    ).astype(np.uint8)
    densepose[mask == 0] = 0
    flow = None
    if with_flow:
        ys, xs = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
        flow = np.stack([np.clip(xs + 0.1, -1, 1), ys], axis=-1).astype(np.float32)
        flow[mask == 0] = np.nan
    return {"tgt": image(), "ref": image(), "mask": mask, "densepose": densepose, "flow": flow}


def random_sample(
    key: str,
    height: int,
    width: int,
    rng: np.random.Generator,
    with_flow: bool = True,
    quality: int = 90,
    noise: float = 12.0,
) -> dict:
    """One encoded synthetic sample of native size (height, width); ``key`` is ``<dataset>_<split>_<id>``."""
    arrays = random_arrays(height, width, rng, with_flow, noise)
    dataset, split, sample_id = key.split("_", 2)
    meta = {
        "dataset": dataset, "split": split, "task": "tryon", "category": "upper_body", "pairing": "paired",
        "tgt_id": sample_id, "ref_id": sample_id, "height": height, "width": width,
    }  # fmt: skip
    return encode_sample(key, meta=meta, quality=quality, **arrays)


def write_split(
    folder: str, split: str, samples: Iterable[dict], per_shard: int, dataset: str = "synthetic"
) -> list[str]:
    """Write encoded ``samples`` as ``<split>-NNNNNN.tar`` shards and record them in the manifest.

    Returns:
        The shard paths, in order.
    """
    os.makedirs(folder, exist_ok=True)
    written: list[str] = []
    counts: list[int] = []
    pattern = os.path.join(folder, f"{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, post=written.append, verbose=0) as sink:
        for n, sample in enumerate(samples):
            if n % per_shard == 0:
                counts.append(0)
            sink.write(sample)
            counts[-1] += 1
    manifest_path = os.path.join(folder, MANIFEST_NAME)
    manifest = {"schema_version": SCHEMA_VERSION, "dataset": dataset, "splits": {}}
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
    manifest["splits"][split] = {
        "shards": [
            {"name": os.path.basename(p), "size_bytes": os.path.getsize(p), "num_samples": c}
            for p, c in zip(written, counts)
        ],
        "num_written": sum(counts),
    }
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    return written


def _encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()
