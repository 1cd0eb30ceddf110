"""DressCode (aimagelab/dress-code) -> try-on shards for upper_body, lower_body and dresses.

Layout (root = DressCode/): `upper_body/`, `lower_body/`, `dresses/`, each with
`images/<id>_0.jpg` (person) and `<id>_1.jpg` (garment), `label_maps/<id>_4.png` (ATR labels),
`keypoints/<id>_2.json` ({"keypoints": [[x, y, conf, idx] x 18]}, OpenPose COCO-18 in a
384x512 frame) and `dense/<id>_5.png` (DensePose part index 0..24); optional additions
`image-densepose/<id>_0.jpg` (IDM-VTON's DensePose renders) and `agnostic_masks/<id>_0.png`
(CatVTON's masks). `masks/<id>_1.png` (ladi-vton) are garment masks, not person masks: unused.

Pair files: the root-level `train_pairs.txt`, `test_pairs_paired.txt`, `test_pairs_unpaired.txt`
(three columns: person, garment, category index 0 upper_body / 1 lower_body / 2 dresses) are
used when present; otherwise each category folder's own files of the same names (two columns).

Mask (`--mask-source`): `rule` = the official category rule (`agnostic_mask`)
on the label map and keypoints (scaled from 384x512 to the image size); `file` =
`agnostic_masks/` (grey >= 128 -> 255); `auto` (default) = `file` for a category whose
`agnostic_masks/` folder exists, else `rule`.
DensePose: `image-densepose/` when the category has that folder, else `dense/<id>_5.png`
rendered as part index * `--dense-index-scale` (default 10) in all three channels. Leffa's
DressCode model conditions on the DensePose part index repeated to three channels; use
`--dense-index-scale 1` to store exactly those values.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.load import load_binary_mask, load_json, load_labels, load_rgb, read_pair_lines
from data_prep.mask_geometry import dilate, drawing, present, to_uint8
from data_prep.sample import SampleError, build_sample
from leffa.errors import UserError
from leffa.schema import KEY_CATEGORIES, build_key

DATASET = "dresscode"
SPLITS = ("train", "test")
SOURCE_OPTIONS = ("src",)  # the options that name folders of source files: --out must lie outside them
CATEGORIES = KEY_CATEGORIES[DATASET]  # upper_body, lower_body, dresses: index 0, 1, 2 of the pair files
MASK_SOURCES = ("auto", "file", "rule")
PAIR_FILES = {"train": (("paired", "train_pairs.txt"),),
              "test": (("paired", "test_pairs_paired.txt"), ("unpaired", "test_pairs_unpaired.txt"))}  # fmt: skip
PAIR_COLUMNS = ("person", "garment")  # a category folder's pair files
ROOT_PAIR_COLUMNS = ("person", "garment", "category")  # the root-level ones; category index 0, 1 or 2
KEYPOINT_FRAME = (384, 512)  # (W, H) of the keypoint coordinates (aimagelab/dress-code#4)
ROOT_HINT = (
    "a DressCode root must contain upper_body/, lower_body/, dresses/ (each with images/, label_maps/, "
    "keypoints/, dense/) and train_pairs.txt, test_pairs_paired.txt, test_pairs_unpaired.txt at the root "
    "or in each category folder"
)


@dataclass(frozen=True)
class DressCodeSpec:
    """One sample to build: a pair line, its category folder and the chosen mask/DensePose sources."""

    key: str
    source: str
    split: str
    pairing: str
    category: str
    person: str  # file name in images/, e.g. 048392_0.jpg
    cloth: str  # file name in images/, e.g. 048392_1.jpg
    category_dir: Path
    mask_source: str  # "file" or "rule"
    densepose_dir: str  # "image-densepose" or "dense"
    dense_index_scale: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", type=Path, required=True, help="raw dataset root folder")
    parser.add_argument(
        "--categories",
        default="all",
        help=f"comma-separated subset of {','.join(CATEGORIES)} (default: all present)",
    )
    parser.add_argument(
        "--mask-source",
        choices=MASK_SOURCES,
        default="auto",
        help="agnostic_masks/ files, the official label-map rule, or auto (files when the folder exists)",
    )
    parser.add_argument(
        "--dense-index-scale",
        type=int,
        default=10,
        help="multiplier of the DensePose part index (0..24) when rendering dense/*_5.png: 1 to 10, "
        "so that 24 x scale stays within 1..255",
    )


def _categories(root: Path, requested: str) -> list[str]:
    if requested == "all":
        found = [c for c in CATEGORIES if (root / c).is_dir()]
        if not found:
            raise FileNotFoundError(f"no category folder in {root}; {ROOT_HINT}")
        return found
    chosen = [c.strip() for c in requested.split(",") if c.strip()]
    for category in chosen:
        if category not in CATEGORIES:
            raise ValueError(f"unknown DressCode category {category!r}; valid: {', '.join(CATEGORIES)}, all")
        if not (root / category).is_dir():
            raise FileNotFoundError(f"category folder {root / category} not found; {ROOT_HINT}")
    return [c for c in CATEGORIES if c in chosen]


def _pair_rows(root: Path, split: str, categories: list[str]) -> list[tuple[str, str, str, str]]:
    """(pairing, category, person, cloth) in file order: root-level files, else per-category files."""
    rows = []
    if all((root / name).is_file() for _, name in PAIR_FILES[split]):
        for pairing, name in PAIR_FILES[split]:
            for number, (person, cloth, index) in read_pair_lines(root / name, ROOT_PAIR_COLUMNS, ROOT_HINT):
                if index not in ("0", "1", "2"):
                    raise UserError(f"{root / name}:{number}: category index {index!r}; valid: 0, 1, 2")
                category = CATEGORIES[int(index)]
                if category in categories:
                    rows.append((pairing, category, person, cloth))
        return rows
    for category in categories:
        for pairing, name in PAIR_FILES[split]:
            lines = read_pair_lines(root / category / name, PAIR_COLUMNS, ROOT_HINT)
            rows += [(pairing, category, person, cloth) for _, (person, cloth) in lines]
    return rows


def _category_sources(category_dir: Path, mask_source: str) -> tuple[str, str]:
    if mask_source == "auto":
        mask_source = "file" if (category_dir / "agnostic_masks").is_dir() else "rule"
    needed = ["images"] + (["agnostic_masks"] if mask_source == "file" else ["label_maps", "keypoints"])
    densepose_dir = "image-densepose" if (category_dir / "image-densepose").is_dir() else "dense"
    for name in needed + [densepose_dir]:
        if not (category_dir / name).is_dir():
            raise FileNotFoundError(f"folder {category_dir / name} not found; {ROOT_HINT}")
    return mask_source, densepose_dir


def list_samples(args: argparse.Namespace, split: str) -> list[DressCodeSpec]:
    """Sample specs of one split (cheap: reads only pair files and folder names)."""
    if not 1 <= 24 * args.dense_index_scale <= 255:  # 0 or less: all black; over 10: parts clipped to 255
        raise UserError(
            f"--dense-index-scale {args.dense_index_scale}: the part index 0..24 times the scale must stay "
            "within 1..255; give 1 to 10"
        )
    root = Path(args.src)
    categories = _categories(root, args.categories)
    sources = {c: _category_sources(root / c, args.mask_source) for c in categories}
    specs = []
    for pairing, category, person, cloth in _pair_rows(root, split, categories):
        tgt_id, ref_id = Path(person).stem, Path(cloth).stem
        mask_source, densepose_dir = sources[category]
        key_ref = ref_id if pairing == "unpaired" else None
        specs.append(
            DressCodeSpec(
                key=build_key(DATASET, split, pairing, tgt_id, key_ref, category=category),
                source=f"{category}/images/{person} + {cloth}",
                split=split, pairing=pairing, category=category, person=person, cloth=cloth,
                category_dir=root / category, mask_source=mask_source, densepose_dir=densepose_dir,
                dense_index_scale=args.dense_index_scale,
            )
        )  # fmt: skip
    return specs


def no_samples_reason(args: argparse.Namespace) -> str:
    """Why a split lists no sample, in the user's terms."""
    chosen = f" for --categories {args.categories}" if args.categories != "all" else ""
    return f"the pair files under --src {args.src} list none{chosen}"


def read_keypoints(path: Path, size: tuple[int, int]) -> np.ndarray:
    """keypoints/<id>_2.json -> (18, 2) (x, y) scaled from 384x512 to `size` (W, H); NaN = missing."""
    data = load_json(path)
    try:
        keypoints = np.asarray(data["keypoints"], dtype=np.float64)[:, :2]
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise SampleError(f"{path}: no usable 'keypoints' list ({err!r})") from err
    points = keypoints * (size[0] / KEYPOINT_FRAME[0], size[1] / KEYPOINT_FRAME[1])
    points[(keypoints[:, 0] <= 1) & (keypoints[:, 1] <= 1)] = np.nan  # the loaders' "absent" convention
    return points


def render_part_index(path: Path, size: tuple[int, int], scale: int) -> Image.Image:
    """dense/<id>_5.png part index (0..24) -> RGB image of index * scale in every channel."""
    index = load_labels(path, size)
    value = np.clip(index * scale, 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(value[:, :, None], 3, axis=2), mode="RGB")


# The mask rule (labels: label_maps/*_4.png, ATR 18 classes; keypoints: OpenPose COCO-18)
ALWAYS_KEEP_LABELS = (1, 2, 3, 9, 10, 16, 17)  # hat, hair, sunglasses, shoes, bag, scarf
HEAD_LABELS = (1, 2, 3, 11)  # hat, hair, sunglasses, head
ARM_LABELS = (14, 15)
CATEGORY_RULES = {  # category -> (labels to repaint, extra labels to keep)
    "upper_body": ((4,), (5, 6)),  # upper clothes; keep skirt, pants
    "lower_body": ((6, 12, 13), (4, 14, 15)),  # pants, legs; keep upper clothes, arms
    "dresses": ((7, 12, 13), ()),  # dress, legs
}
ARM_CHAIN = (7, 6, 5, 2, 3, 4)  # COCO-18 l-wrist, l-elbow, l-shoulder, r-shoulder, r-elbow, r-wrist


def _region_dilation(height: int) -> int:
    # dress-code data/dataset.py: 20x20 (H > 512), 10x10 (H > 256) or 5x5 kernel, 5 iterations.
    kernel = 20 if height > 512 else 10 if height > 256 else 5
    return 5 * (kernel - 1) + 1


def agnostic_mask(labels: np.ndarray, pose: np.ndarray, category: str) -> np.ndarray:
    """DressCode try-on mask: the rule of aimagelab/dress-code data/dataset.py (also used by
    IDM-VTON inference_dc.py, ladi-vton and Leffa's demo get_agnostic_mask_dc).

    1. keep = hat, hair, sunglasses, shoes, bag, scarf + the category's extra kept labels;
       region = the category's repaint labels (table CATEGORY_RULES).
    2. upper_body, dresses: a poly-line of width 30 px (at 512 px height) through wrist-elbow-
       shoulder-shoulder-elbow-wrist, missing joints left out, dilated by a 46 px square when
       H > 512; it joins the region, and arm pixels outside it (hands) are kept.
    3. upper_body, dresses (neck): head pixels lower than the shoulder line minus 20 px (at 512)
       join the region, head pixels above it are kept; lower_body keeps the whole head.
    4. region dilated by a square of side 96 / 46 / 21 px (H > 512 / H > 256 / else); mask =
       dilated region minus kept pixels.
    """
    if category not in CATEGORY_RULES:
        raise ValueError(f"unknown DressCode category {category!r}; valid: {', '.join(CATEGORIES)}")
    repaint, extra_keep = CATEGORY_RULES[category]
    height, width = labels.shape
    scale = height / 512.0
    keep = np.isin(labels, ALWAYS_KEEP_LABELS + extra_keep)
    region = np.isin(labels, repaint)
    head = np.isin(labels, HEAD_LABELS)
    if category in ("upper_body", "dresses"):
        canvas, draw = drawing(labels.shape)
        chain = present(pose, ARM_CHAIN)
        if len(chain) >= 2:
            draw.line(chain, fill=255, width=max(1, round(30 * scale)), joint="curve")
        arm_line = np.asarray(canvas) > 0
        if height > 512:
            arm_line = dilate(arm_line, 5 * (10 - 1) + 1)
        keep |= np.isin(labels, ARM_LABELS) & ~arm_line
        region |= arm_line
        shoulders = present(pose, (2, 5))
        if len(shoulders) == 2:
            (x0, y0), (x1, y1) = shoulders
            slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0.0
            columns = np.arange(width)
            line_y = y0 + slope * (columns - x0) - 20 * scale  # (W,)
            below = np.arange(height)[:, None] >= np.maximum(np.floor(line_y), 0)[None, :]  # (H, W)
            region |= head & below
            keep |= head & ~below
        else:
            keep |= head
    else:
        keep |= head
    region = dilate(region, _region_dilation(height))
    return to_uint8(region & ~keep)


def load_sample(spec: DressCodeSpec) -> dict:
    """Read, check and encode one sample (runs in a worker process)."""
    stem = Path(spec.person).stem  # <id>_0
    sample_id = stem.rsplit("_", 1)[0]
    tgt = load_rgb(spec.category_dir / "images" / spec.person)
    ref = load_rgb(spec.category_dir / "images" / spec.cloth)
    if spec.mask_source == "file":
        mask = load_binary_mask(spec.category_dir / "agnostic_masks" / f"{stem}.png", tgt.size)
    else:
        labels = load_labels(spec.category_dir / "label_maps" / f"{sample_id}_4.png", tgt.size)
        pose = read_keypoints(spec.category_dir / "keypoints" / f"{sample_id}_2.json", tgt.size)
        mask = agnostic_mask(labels, pose, spec.category)
    if not mask.any():
        raise SampleError(f"empty agnostic mask for {spec.category}/{stem}")
    if spec.densepose_dir == "image-densepose":
        densepose = load_rgb(spec.category_dir / "image-densepose" / f"{stem}.jpg", tgt.size)
    else:
        densepose = render_part_index(
            spec.category_dir / "dense" / f"{sample_id}_5.png", tgt.size, spec.dense_index_scale
        )
    meta = {
        "dataset": DATASET, "split": spec.split, "task": "tryon", "category": spec.category,
        "pairing": spec.pairing, "tgt_id": stem, "ref_id": Path(spec.cloth).stem,
        "pose_source": "densepose", "mask_source": spec.mask_source,
    }  # fmt: skip
    return build_sample(spec.key, tgt, ref, mask, densepose, meta)
