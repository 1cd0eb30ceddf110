"""VITON-HD (shadow2496/VITON-HD, `zalando-hd-resized`) -> try-on shards.

Layout (root = zalando-hd-resized/): `train_pairs.txt`, `test_pairs.txt` (two columns:
person image, garment image; `test_pairs_unpaired.txt` is accepted as the test file, as
CatVTON names it) and `train/`, `test/`, each with `image/<stem>.jpg`, `cloth/<stem>.jpg`,
`image-parse-v3/<stem>.png` (older name `image-parse/`), `openpose_json/<stem>_keypoints.json`
(older name `openpose-json/`), `image-densepose/<stem>.jpg` and, optionally,
`agnostic-mask/<stem>_mask.png` (the binary masks IDM-VTON, StableVITON and CatVTON read).

Pairs: train is paired (the person wears the garment; column 2 is ignored, as the VITON-HD
loaders do). Each test line gives a paired sample (column 1 as person and garment) and an
unpaired one (column 2 is the garment), in that order.

Mask (`--mask-source`): `file` reads `agnostic-mask/` (grey >= 128 -> 255); `rule` builds it
from the parse map and OpenPose keypoints (`agnostic_mask`); `auto` (default)
uses `file` for a split whose `agnostic-mask/` folder exists, else `rule`.
DensePose: `image-densepose/<stem>.jpg`, resized to the person image if its size differs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.load import load_binary_mask, load_labels, load_rgb, read_pair_lines
from data_prep.mask_geometry import dilate, drawing, present, to_uint8
from data_prep.openpose import read_openpose
from data_prep.sample import SampleError, build_sample
from leffa.schema import build_key

DATASET = "vitonhd"
SPLITS = ("train", "test")
SOURCE_OPTIONS = ("src",)  # the options that name folders of source files: --out must lie outside them
MASK_SOURCES = ("auto", "file", "rule")
PARSE_DIRS = ("image-parse-v3", "image-parse")
POSE_DIRS = ("openpose_json", "openpose-json")
PAIR_COLUMNS = ("person", "garment")
ROOT_HINT = (
    "a VITON-HD root (zalando-hd-resized/) must contain train_pairs.txt, test_pairs.txt and train/, test/ "
    "with image/, cloth/, image-parse-v3/, openpose_json/, image-densepose/ (optional agnostic-mask/)"
)


@dataclass(frozen=True)
class VitonHDSpec:
    """One sample to build: the person and garment file names of a pair line and where to look."""

    key: str
    source: str
    split: str
    pairing: str
    person: str  # file name in image/, e.g. 00006_00.jpg
    cloth: str  # file name in cloth/
    split_dir: Path
    mask_source: str  # "file" or "rule"
    parse_dir: Path | None
    pose_dir: Path | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", type=Path, required=True, help="raw dataset root folder")
    parser.add_argument(
        "--mask-source",
        choices=MASK_SOURCES,
        default="auto",
        help="agnostic-mask/ files, the parse+keypoint rule, or auto (files when the folder exists)",
    )


def _first_dir(split_dir: Path, names: tuple[str, ...]) -> Path | None:
    return next((split_dir / name for name in names if (split_dir / name).is_dir()), None)


def _pair_file(root: Path, split: str) -> Path:
    if split == "test" and not (root / "test_pairs.txt").is_file() and (root / "test_pairs_unpaired.txt").is_file():
        return root / "test_pairs_unpaired.txt"
    return root / f"{split}_pairs.txt"


def _pairs(rows: list[list[str]], split: str) -> list[tuple[str, str, str]]:
    """(pairing, person, garment): train lines are paired; each test line is paired, then unpaired."""
    if split == "train":
        return [("paired", person, person) for person, _ in rows]
    pairs = []
    for person, unpaired_cloth in rows:
        pairs += [("paired", person, person), ("unpaired", person, unpaired_cloth)]
    return pairs


def list_samples(args: argparse.Namespace, split: str) -> list[VitonHDSpec]:
    """Sample specs of one split, in pair-file order (cheap: reads only the pair file)."""
    root = Path(args.src)
    rows = [fields for _, fields in read_pair_lines(_pair_file(root, split), PAIR_COLUMNS, ROOT_HINT)]
    split_dir = root / split
    for needed in ("image", "cloth", "image-densepose"):
        if not (split_dir / needed).is_dir():
            raise FileNotFoundError(f"folder {split_dir / needed} not found; {ROOT_HINT}")
    mask_source = args.mask_source
    if mask_source == "auto":
        mask_source = "file" if (split_dir / "agnostic-mask").is_dir() else "rule"
    parse_dir, pose_dir = _first_dir(split_dir, PARSE_DIRS), _first_dir(split_dir, POSE_DIRS)
    if mask_source == "rule" and (parse_dir is None or pose_dir is None):
        raise FileNotFoundError(
            f"building masks needs {split_dir}/{PARSE_DIRS[0]}/ and {split_dir}/{POSE_DIRS[0]}/ "
            f"(or {split_dir}/agnostic-mask/ with --mask-source file); {ROOT_HINT}"
        )
    specs = []
    for pairing, person, cloth in _pairs(rows, split):
        tgt_id, ref_id = Path(person).stem, Path(cloth).stem
        specs.append(
            VitonHDSpec(
                key=build_key(DATASET, split, pairing, tgt_id, ref_id if pairing == "unpaired" else None),
                source=f"{split}/image/{person} + {split}/cloth/{cloth}",
                split=split, pairing=pairing, person=person, cloth=cloth, split_dir=split_dir,
                mask_source=mask_source, parse_dir=parse_dir, pose_dir=pose_dir,
            )
        )  # fmt: skip
    return specs


def no_samples_reason(args: argparse.Namespace) -> str:
    """Why a split lists no sample, in the user's terms."""
    return f"the pair files under --src {args.src} list none"


# The mask rule (labels: image-parse-v3, CIHP/LIP 20 classes; keypoints: OpenPose BODY_25)
GARMENT_LABELS = (5, 6, 7, 10, 14, 15)  # upper-clothes, dress, coat, neck, left arm, right arm
KEEP_LABELS = (4, 13, 9, 12, 16, 17, 18, 19)  # head: sunglasses, face; lower body: pants, skirt, legs, shoes
ARM_CHAINS = ((2, 3, 4), (5, 6, 7))  # BODY_25 shoulder-elbow-wrist, right and left
TORSO_JOINTS = (2, 5, 12, 9)  # BODY_25 right shoulder, left shoulder, left hip, right hip


def agnostic_mask(labels: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """VITON-HD try-on mask, after get_img_agnostic / get_parse_agnostic of shadow2496/VITON-HD.

    Region = parse labels {5, 6, 7} (upper clothes, dress, coat), {10} (neck), {14, 15} (arms)
    + lines of radius r along shoulder-elbow-wrist (BODY_25 2-3-4, 5-6-7) with discs at the joints
    + the torso polygon (2, 5, 12, 9); dilated by a square of side 2 * max(1, r // 2) + 1; minus
    head {4, 13} and lower body {9, 12, 16, 17, 18, 19}, which are never generated.
    r = 20 px at 1024 px height (VITON-HD's value), scaled with the height.
    """
    height = labels.shape[0]
    radius = max(1, round(20 * height / 1024))
    canvas, draw = drawing(labels.shape)
    for chain in ARM_CHAINS:
        joints = present(pose, chain)
        if len(joints) >= 2:
            draw.line(joints, fill=255, width=2 * radius)
        for x, y in joints:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    torso = present(pose, TORSO_JOINTS)
    if len(torso) == len(TORSO_JOINTS):
        draw.polygon(torso, fill=255)
    region = np.isin(labels, GARMENT_LABELS) | (np.asarray(canvas) > 0)
    region = dilate(region, 2 * max(1, radius // 2) + 1)
    return to_uint8(region & ~np.isin(labels, KEEP_LABELS))


def load_sample(spec: VitonHDSpec) -> dict:
    """Read, check and encode one sample (runs in a worker process)."""
    stem = Path(spec.person).stem
    tgt = load_rgb(spec.split_dir / "image" / spec.person)
    ref = load_rgb(spec.split_dir / "cloth" / spec.cloth)
    if spec.mask_source == "file":
        mask = load_binary_mask(spec.split_dir / "agnostic-mask" / f"{stem}_mask.png", tgt.size)
    else:
        labels = load_labels(spec.parse_dir / f"{stem}.png", tgt.size)
        mask = agnostic_mask(labels, read_openpose(spec.pose_dir / f"{stem}_keypoints.json"))
    if not mask.any():
        raise SampleError(f"empty agnostic mask for {spec.split}/{stem}")
    densepose = load_rgb(spec.split_dir / "image-densepose" / f"{stem}.jpg", tgt.size)
    meta = {
        "dataset": DATASET, "split": spec.split, "task": "tryon", "category": "upper_body",
        "pairing": spec.pairing, "tgt_id": stem, "ref_id": Path(spec.cloth).stem,
        "pose_source": "densepose", "mask_source": spec.mask_source,
    }  # fmt: skip
    return build_sample(spec.key, tgt, ref, mask, densepose, meta)
