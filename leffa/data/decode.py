"""Decode stage: a raw webdataset sample (bytes per key) -> PIL images, metadata and flow.

Only the members of the shard schema (``leffa.schema``; docs/design.md, "Shard schema") are decoded, each by the one
decoder it needs: JPEG/PNG with ``leffa.images.read_image`` (PIL; upright, 8-bit, opaque), ``json``
with the json module, ``flow.npy`` with ``numpy.load(allow_pickle=False)``. Nothing is ever
unpickled; other keys are ignored.
"""

import io
import json

import numpy as np

from leffa.images import BLACK, read_image
from leffa.schema import COMMON_MEMBERS, FLOW_MEMBER, REQUIRED_MEMBERS


class CorruptSample(ValueError):
    """A sample whose content does not follow the shard schema."""


def decode_sample(raw: dict, draft_size: tuple[int, int] | None = None) -> dict:
    """Decode one raw sample.

    Args:
        raw: ``{"__key__": str, "tgt.jpg": bytes, ..., "flow.npy": bytes (optional)}``.
        draft_size: (height, width) the images will be resized to; ``tgt`` and ``ref`` JPEGs are
            then decoded at a reduced scale that still covers it (``leffa.images.read_image``).

    Returns:
        ``{"key": str, "meta": dict, "tgt": RGB image, "ref": RGB image, "mask": L image,
        "densepose": RGB image, "flow": float16 (H0, W0, 2) array (only if present)}``;
        ``tgt`` may come out smaller than native after drafting, the other spatial keys are
        native size (H0, W0).

    Raises:
        CorruptSample, OSError, SyntaxError, ...: bad bytes; ``skips.skip_corrupt`` counts them.
    """
    key = raw.get("__key__")
    missing = [k for k in COMMON_MEMBERS if k not in raw]
    if missing:
        raise CorruptSample(f"sample '{key}' lacks {missing}")

    meta = json.loads(raw["json"])
    if not isinstance(meta, dict):
        raise CorruptSample(f"sample '{key}': json is a {type(meta).__name__}, not an object")
    # a sample that names its task (folder samples do not) also holds that task's own members
    missing = [k for k in REQUIRED_MEMBERS.get(meta.get("task"), ()) if k not in raw]
    if missing:
        raise CorruptSample(f"sample '{key}' of task {meta['task']!r} lacks {missing}")

    tgt, tgt_size = read_image(raw["tgt.jpg"], "RGB", draft_size)
    ref, _ = read_image(raw["ref.jpg"], "RGB", draft_size)
    mask, mask_size = read_image(raw["mask.png"], "L", background=BLACK)
    densepose, densepose_size = read_image(raw["densepose.png"], "RGB", background=BLACK)
    # tgt, mask, densepose (and flow) are pixel-aligned; ref may have any size.
    if not tgt_size == mask_size == densepose_size:
        raise CorruptSample(
            f"sample '{key}': tgt {tgt_size}, mask {mask_size}, densepose {densepose_size} (W, H) differ"
        )
    out = {"key": key, "meta": meta, "tgt": tgt, "ref": ref, "mask": mask, "densepose": densepose}

    if FLOW_MEMBER in raw:
        flow = np.load(io.BytesIO(raw[FLOW_MEMBER]), allow_pickle=False)
        width, height = tgt_size
        if flow.shape != (height, width, 2):
            raise CorruptSample(f"sample '{key}': flow shape {flow.shape}, expected {(height, width, 2)}")
        out["flow"] = flow.astype(np.float16, copy=False)  # the schema's dtype; float32 on the device
    return out
