"""Helpers shared by the data_prep tests (no tests here): tiny raw files and reading shards back."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def solid(height: int, width: int, colour: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A (H, W, 3) uint8 image of one colour with mild noise (so JPEG has something to code)."""
    noise = np.random.default_rng(seed).integers(-6, 7, size=(height, width, 3))
    return np.clip(np.asarray(colour)[None, None] + noise, 0, 255).astype(np.uint8)


def save_jpeg(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95)


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array.astype(np.uint8), mode=mode) if mode != "P" else _palette(array)
    image.save(path)


def _palette(labels: np.ndarray) -> Image.Image:
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette([(i * 37) % 256 for i in range(256 * 3)])  # display colours only
    return image


def truncate(path: Path) -> None:
    """Cut a file to half its size, like an interrupted download."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def read_split(out: Path, split: str) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of every sample of a split, in shard and member order, via tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(Path(out).glob(f"{split}-*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = archive.extractfile(member).read()
    return list(samples.items())


def decode(sample: dict[str, bytes]) -> dict:
    """Decoded fields: tgt/ref/densepose (H, W, 3) uint8, mask (H, W) uint8, meta dict, flow if any."""
    out = {
        "tgt": np.asarray(Image.open(io.BytesIO(sample["tgt.jpg"]))),
        "ref": np.asarray(Image.open(io.BytesIO(sample["ref.jpg"]))),
        "densepose": np.asarray(Image.open(io.BytesIO(sample["densepose.png"]))),
        "mask_image": Image.open(io.BytesIO(sample["mask.png"])),
        "meta": json.loads(sample["json"]),
    }
    out["mask"] = np.asarray(out["mask_image"])
    if "flow.npy" in sample:
        out["flow"] = np.load(io.BytesIO(sample["flow.npy"]), allow_pickle=False)
    return out


def mean_colour(image: np.ndarray) -> np.ndarray:
    return image.reshape(-1, 3).mean(axis=0)


def read_manifest(out: Path) -> dict:
    return json.loads((Path(out) / "manifest.json").read_text())
