"""Cached VAE latents (``leffa cache-latents``, ``data.latents: true``): the members they add to a
shard, the manifest record that says what made them, and their reading side.

A cache folder holds shards with every member of its source shards (the images too: the Leffa loss
warps the reference image against the target image) plus, per image that a training step encodes
(``leffa.conditioning.encoded_images``: ``tgt``, ``ref``, ``masked`` for the layouts with a masked
image, ``densepose`` for the ``pose`` layout), the VAE posterior's moments at the stage's size::

    latent.<image>.mean.npy   float32 (C, H/f, W/f): the posterior mean (= its mode), unscaled
    latent.<image>.std.npy    float32 (C, H/f, W/f): the posterior standard deviation

(read with ``numpy.load(allow_pickle=False)``; the module multiplies by the VAE's scaling factor).
Its ``manifest.json`` carries a ``latents`` record (:data:`MANIFEST_KEY`): the VAE's fingerprint
(:func:`vae_fingerprint`) and scaling factor, the size (height, width), the latent shape, the
conditioning layout, the cached images and their members. The source shards are under each split.

With ``data.latents: true`` the data module reads the moments of the training and validation
shards into ``batch["moments"]`` (``{image: (mean, std)}``, float32 (B, C, h, w)); it refuses, in
one line, sources without the record, records that disagree, a record of another size and
``data.hflip`` (a mirrored image has other latents). The module refuses another VAE or a
conditioning whose images the cache lacks (:func:`check_cache_fits`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import torch

from leffa.conditioning import encoded_images
from leffa.data.decode import CorruptSample, decode_sample
from leffa.data.tar_samples import first_sample, is_local
from leffa.errors import UserError
from leffa.schema import MANIFEST_NAME

__all__ = ["MANIFEST_KEY", "MEMBER_PREFIX", "MOMENTS", "moment_member", "vae_fingerprint", "cache_record",
           "check_cache_fits", "decode_with_moments", "npy_bytes"]

MANIFEST_KEY = "latents"
MEMBER_PREFIX = "latent."
MOMENTS = ("mean", "std")
# the record's fields that must agree between the folders of one run (train and validation)
_IDENTITY = ("vae", "height", "width", "latent_shape", "conditioning", "images")


def moment_member(image: str, moment: str) -> str:
    """The member name of one moment of one image: ``latent.<image>.<mean|std>.npy``."""
    return f"{MEMBER_PREFIX}{image}.{moment}.npy"


def npy_bytes(array: np.ndarray) -> bytes:
    """A float32 ``.npy`` file's bytes (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """``sha256:<hex>`` of a diffusers VAE: its config (public keys, so not where it was loaded from)
    and every tensor of its state dict (name, shape, float32 values). Two VAEs with one fingerprint
    encode every image alike; SD's VAE hashes in about a second."""
    digest = hashlib.sha256()
    config = {k: v for k, v in dict(getattr(vae, "config", {})).items() if not str(k).startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        values = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(values.shape)};".encode())
        digest.update(values.numpy().reshape(-1).view(np.uint8))
    return "sha256:" + digest.hexdigest()


def _read_record(folder: str, name: str) -> dict:
    """The ``latents`` record of the manifest in ``folder`` (with ``folder`` added), or one error line."""
    path = os.path.join(folder or ".", MANIFEST_NAME)
    hint = (f"write them with `leffa cache-latents --config <this config> --out DIR` and point data.{name}_shards "
            f"there, or set data.latents: false")
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        raise UserError(f"data.latents: the shards of data.{name}_shards in {folder or '.'} have no {MANIFEST_NAME}, "
                        f"so no cached latents; {hint}") from None
    except (OSError, ValueError, RecursionError) as error:
        raise UserError(f"data.latents: cannot read {path}: {error}") from error
    record = manifest.get(MANIFEST_KEY) if isinstance(manifest, dict) else None
    if record is None:
        raise UserError(f"data.latents: {path} (data.{name}_shards) has no cached latents (no '{MANIFEST_KEY}' "
                        f"record); {hint}")
    try:
        vae, images, shape = record["vae"], list(record["images"]), [int(v) for v in record["latent_shape"]]
        ok = (isinstance(vae, dict) and isinstance(vae.get("fingerprint"), str) and len(shape) == 3
              and isinstance(record["height"], int) and isinstance(record["width"], int)
              and isinstance(record["conditioning"], str) and all(isinstance(i, str) for i in images))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"data.latents: {path} has a malformed '{MANIFEST_KEY}' record; write the cache again with "
                        f"leffa cache-latents")
    return {**record, "folder": folder or "."}


def cache_record(sources: dict[str, list[list[str]]], height: int, width: int, hflip: bool) -> dict:
    """The one ``latents`` record of the shard sources of ``sources`` (``{"train": [[shard, ...],
    ...], "val": ...}``), checked against the data settings; every refusal is one line: streamed
    shards, a folder without the record, folders with different records, another size, a source
    whose first sample lacks a moment member, ``hflip``."""
    if hflip:
        raise UserError("data.hflip with data.latents: the cached latents are those of the unmirrored images (a "
                        "VAE latent cannot be mirrored exactly); set data.hflip: false or data.latents: false")
    records: dict[str, tuple[str, dict]] = {}
    for name, shard_lists in sources.items():
        for shards in shard_lists:
            for shard in shards:
                if not is_local(shard):
                    raise UserError(f"data.latents: data.{name}_shards streams {shard}; cached latents are read from "
                                    f"local shard folders with their manifest")
                folder = os.path.dirname(shard)
                if folder not in records:
                    records[folder] = (name, _read_record(folder, name))
    if not records:
        raise UserError("data.latents: true, but no data.train_shards or data.val_shards to read them from")
    (first_name, first), *others = records.values()
    for name, record in others:
        differ = [k for k in _IDENTITY if record.get(k) != first.get(k)]
        if differ:
            raise UserError(f"data.latents: the cached latents in {first['folder']} (data.{first_name}_shards) and "
                            f"{record['folder']} (data.{name}_shards) differ in {', '.join(differ)}; cache both with "
                            f"the same config")
    if (first["height"], first["width"]) != (height, width):
        raise UserError(f"data.latents: the latents in {first['folder']} were cached at {first['height']}x"
                        f"{first['width']} (height x width), this config reads {height}x{width} (data.height, "
                        f"data.width); cache them again at this size with leffa cache-latents, or set data.height: "
                        f"{first['height']} and data.width: {first['width']}")
    members = [moment_member(i, m) for i in first["images"] for m in MOMENTS]
    for name, shard_lists in sources.items():
        for shards in shard_lists:
            raw = next((r for s in shards if (r := first_sample(s)) is not None), None)
            missing = [] if raw is None else [m for m in members if m not in raw]
            if missing:
                raise UserError(f"data.latents: sample '{raw['__key__']}' of data.{name}_shards has no "
                                f"{', '.join(missing)} although its manifest lists them; write the cache again")
    return first


def check_cache_fits(record: dict, fingerprint: str, conditioning: str) -> None:
    """One error line when the cache ``record`` was made by a VAE of another ``fingerprint``, or lacks
    an image that layout ``conditioning`` encodes (``leffa.conditioning.encoded_images``)."""
    folder = record.get("folder", "the cache")
    theirs = record["vae"]["fingerprint"]
    if theirs != fingerprint:
        made = record["vae"].get("source")
        made = f" (made from {made})" if made else ""
        raise UserError(f"data.latents: the latents in {folder} were cached by another VAE{made}: fingerprint "
                        f"{theirs[:19]}..., this model's VAE {fingerprint[:19]}...; cache them again with this "
                        f"config (leffa cache-latents), or set data.latents: false")
    missing = [i for i in encoded_images(conditioning) if i not in record["images"]]
    if missing:
        raise UserError(f"data.latents: the latents in {folder} were cached for model.conditioning "
                        f"{record['conditioning']} ({', '.join(record['images'])}); {conditioning} also encodes "
                        f"{', '.join(missing)}: cache them again with this config, or set data.latents: false")


def read_moments(raw: dict, images: tuple[str, ...], shape: tuple[int, ...]) -> dict:
    """``{image: (mean, std)}`` float32 tensors of ``shape`` from a raw sample; a missing or
    ill-shaped member is a :class:`CorruptSample` (skipped and counted like a bad image)."""
    key = raw.get("__key__")
    moments = {}
    for image in images:
        pair = []
        for moment in MOMENTS:
            member = moment_member(image, moment)
            if member not in raw:
                raise CorruptSample(f"sample '{key}' lacks {member}")
            array = np.load(io.BytesIO(raw[member]), allow_pickle=False)
            if array.dtype != np.float32 or array.shape != tuple(shape):
                raise CorruptSample(f"sample '{key}': {member} is {array.dtype} {array.shape}, expected float32 "
                                    f"{tuple(shape)}")
            pair.append(torch.from_numpy(array))
        moments[image] = tuple(pair)
    return moments


def decode_with_moments(raw: dict, draft_size: tuple[int, int] | None, images: tuple[str, ...],
                        shape: tuple[int, ...]) -> dict:
    """``decode.decode_sample`` plus ``moments`` (:func:`read_moments`)."""
    sample = decode_sample(raw, draft_size)
    sample["moments"] = read_moments(raw, images, shape)
    return sample
