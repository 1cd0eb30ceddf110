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


# A tiny VITON-HD root (zalando-hd-resized/ layout) with parse maps and OpenPose keypoints.
VITONHD_SIZE = H, W = 64, 48
TRAIN_VITONHD = ("00001_00", "00002_00", "00003_00")
TEST_VITONHD = (("00010_00", "00011_00"), ("00011_00", "00010_00"))  # person, unpaired garment


def cloth_colour(stem: str) -> tuple[int, int, int]:
    number = int(stem[:5])
    return (40 + 50 * (number % 4), 200 - 30 * (number % 5), 60 + 45 * (number % 3))


def parse_map() -> np.ndarray:
    """CIHP/LIP labels of a standing person: hair, face, neck, upper clothes, arms, pants, shoes."""
    labels = np.zeros((H, W), dtype=np.uint8)
    labels[2:6, 18:31] = 2  # hair
    labels[6:14, 19:30] = 13  # face
    labels[14:17, 21:28] = 10  # neck
    labels[17:38, 13:36] = 5  # upper clothes
    labels[17:36, 8:13] = 14  # left arm
    labels[17:36, 36:41] = 15  # right arm
    labels[38:59, 14:35] = 9  # pants
    labels[59:63, 14:23] = 18
    labels[59:63, 26:35] = 19
    return labels


BODY_25 = {1: (24, 16), 2: (14, 18), 3: (10, 27), 4: (10, 35), 5: (34, 18), 6: (38, 27), 7: (38, 35),
           8: (24, 38), 9: (18, 38), 12: (30, 38)}  # fmt: skip


def openpose_json() -> dict:
    flat = []
    for index in range(25):
        x, y = BODY_25.get(index, (0, 0))
        flat += [x, y, 0.9 if index in BODY_25 else 0.0]
    return {"version": 1.3, "people": [{"person_id": [-1], "pose_keypoints_2d": flat}]}


def make_vitonhd(root: Path) -> Path:
    (root).mkdir(parents=True, exist_ok=True)
    (root / "train_pairs.txt").write_text("".join(f"{s}.jpg {s}.jpg\n" for s in TRAIN_VITONHD))
    (root / "test_pairs.txt").write_text("".join(f"{p}.jpg {c}.jpg\n" for p, c in TEST_VITONHD))
    for split, stems in (("train", TRAIN_VITONHD), ("test", [p for p, _ in TEST_VITONHD])):
        for seed, stem in enumerate(stems):
            folder = root / split
            save_jpeg(folder / "image" / f"{stem}.jpg", solid(H, W, (120, 110, 100), seed))
            save_jpeg(folder / "cloth" / f"{stem}.jpg", solid(H, W, cloth_colour(stem), seed))
            save_png(folder / "image-parse-v3" / f"{stem}.png", parse_map(), mode="P")
            (folder / "openpose_json").mkdir(exist_ok=True)
            (folder / "openpose_json" / f"{stem}_keypoints.json").write_text(json.dumps(openpose_json()))
            save_jpeg(folder / "image-densepose" / f"{stem}.jpg", solid(H, W, (30, 90, 200), seed))
    return root


def save_png_bomb(path: Path, width: int, height: int) -> None:
    """A valid all-black 1-bit PNG of `width` x `height` pixels: a few kB on disk, far more in memory."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter type 0, then the packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
