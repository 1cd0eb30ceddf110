"""DeepFashion In-shop, pose-transfer split (PATN/GFLA/DPTN pairs, as used by PIDM, CFLD, Leffa) -> pose shards.

Layout (root = the `fashion/` folder of CFLD's README):
- `fasion-resize-pairs-{train,test}.csv` (upstream spelling; `fashion-...` also accepted):
  header `from,to`, flattened image names; `from` = appearance source -> `ref`, `to` -> `tgt`.
- `fasion-resize-annotation-{train,test}.csv`: `:`-separated `name:keypoints_y:keypoints_x`,
  y and x JSON lists of 18 OpenPose COCO-18 joints in the 256x176 (HxW) frame, -1 = missing.
- images, first found: `--images DIR`; `{split}_highres/` or `{split}/` (flat folders of
  flattened names); or the nested `img_highres/` or `img/` of `img_highres.zip`
  (`MEN|WOMEN/<Category>/id_XXXXXXXX/NN_V_view.jpg`), matched through the flattening rule of
  CFLD generate_fashion_datasets.py (`flatten_name`). A folder is nested when it holds MEN/ or WOMEN/.

Pose image: with `--densepose DIR`, the user's DensePose rendering `DIR/<flattened target
stem>.png` (e.g. `fashionWOMENDressesid0000262902_1front.png`), json pose_source "densepose";
without it, the 18 target keypoints drawn by `keypoints.draw_coco18`, pose_source "keypoints".
Mask: all 255 (the whole target is generated). Key: `deepfashion_<split>_paired_<to>__<from>`.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.keypoints import draw_coco18
from data_prep.load import load_rgb
from data_prep.sample import SampleError, build_sample
from leffa.errors import UserError
from leffa.images import BLACK
from leffa.pair_file import check_file_names, quote, read_text_lines
from leffa.schema import build_key

DATASET = "deepfashion"
SPLITS = ("train", "test")
SOURCE_OPTIONS = ("src", "images", "densepose")  # the options that name folders of source files: --out must lie outside them
KEYPOINT_FRAME = (176, 256)  # (W, H) of the annotation coordinates
ROOT_HINT = (
    "a DeepFashion pose-transfer root must contain fasion-resize-pairs-{train,test}.csv, "
    "fasion-resize-annotation-{train,test}.csv and train_highres/, test_highres/ (or the nested img_highres/)"
)
_NAME = re.compile(r"fashion(WOMEN|MEN)(.+?)id\d+")


@dataclass(frozen=True)
class DeepFashionSpec:
    """One pose-transfer pair with resolved image paths (None: not found) and the target keypoints."""

    key: str
    source: str
    split: str
    pairing: str
    tgt_name: str
    ref_name: str
    tgt_path: Path | None
    ref_path: Path | None
    keypoints: tuple[str, str] | None  # raw (y, x) JSON lists of the target
    densepose_path: Path | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", type=Path, required=True, help="raw dataset root folder")
    parser.add_argument(
        "--densepose",
        type=Path,
        default=None,
        help="folder of DensePose renderings named <flattened target stem>.png (default: draw keypoints)",
    )
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        help="image folder, flat (flattened names) or nested (MEN/, WOMEN/); default: found under --src",
    )


def flatten_name(relative: Path) -> str:
    """`WOMEN/Dresses/id_00002629/02_1_front.jpg` -> `fashionWOMENDressesid0000262902_1front.jpg`.

    CFLD generate_fashion_datasets.py: 'fashion' + gender + category + id without '_' + file
    name keeping only its first '_'.
    """
    gender, category, person, filename = relative.parts[-4:]
    head, _, tail = filename.partition("_")
    return f"fashion{gender}{category}{person.replace('_', '')}{head}_{tail.replace('_', '')}"


def category_of(name: str) -> str:
    """`fashionWOMENBlouses_Shirtsid...` -> `WOMEN_Blouses_Shirts` (`unknown` if the name is not flattened)."""
    match = _NAME.match(name)
    return f"{match.group(1)}_{match.group(2)}" if match else "unknown"


def _csv_file(root: Path, kind: str, split: str) -> Path:
    for spelling in ("fasion", "fashion"):
        path = root / f"{spelling}-resize-{kind}-{split}.csv"
        if path.is_file():
            return path
    raise FileNotFoundError(f"{root / f'fasion-resize-{kind}-{split}.csv'} not found; {ROOT_HINT}")


def _csv_rows(path: Path, delimiter: str, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, {column: stripped field}) of the rows after the header; blank lines ignored.

    The header must name the `required` columns; every row must have one field per header
    column and a value in each required one (these files have no quoted newlines, so a line is a row).
    """
    lines = read_text_lines(path)
    header = [name.strip() for name in next(csv.reader(lines[:1], delimiter=delimiter), [])]
    if not set(required) <= set(header):
        got = quote(lines[0] if lines else "")
        raise UserError(f"{path}:1: expected a header with the columns {delimiter.join(required)}, got {got}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = [field.strip() for field in next(csv.reader([line], delimiter=delimiter))]
        row = dict(zip(header, fields))
        if len(fields) != len(header) or not all(row[name] for name in required):
            raise UserError(
                f"{path}:{number}: expected {len(header)} columns ({delimiter.join(header)}), got {len(fields)}: "
                f"{quote(line)}"
            )
        rows.append((number, row))
    return rows


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(from, to) rows of a pairs CSV; each name must be a plain file name."""
    return [
        tuple(check_file_names(path, number, [row["from"], row["to"]]))
        for number, row in _csv_rows(path, ",", ("from", "to"))
    ]


def read_annotations(path: Path) -> dict[str, tuple[str, str]]:
    """name -> raw (keypoints_y, keypoints_x) strings of a `:`-separated annotation CSV."""
    rows = _csv_rows(path, ":", ("name", "keypoints_y", "keypoints_x"))
    return {row["name"]: (row["keypoints_y"], row["keypoints_x"]) for _, row in rows}


def _image_index(root: Path, split: str, images: Path | None) -> tuple[Path | None, dict[str, Path]]:
    """(flat folder, {}) or (None, {flattened name: path}) for a nested folder."""
    candidates = (
        [images]
        if images is not None
        else [root / f"{split}_highres", root / split, root / "img_highres", root / "img"]
    )
    for folder in candidates:
        if not folder.is_dir():
            continue
        if not ((folder / "MEN").is_dir() or (folder / "WOMEN").is_dir()):
            return folder, {}
        return None, {flatten_name(p.relative_to(folder)): p for p in sorted(folder.rglob("*.jpg"))
                      if len(p.relative_to(folder).parts) == 4}  # fmt: skip
    raise FileNotFoundError(f"no image folder among {', '.join(str(c) for c in candidates)}; {ROOT_HINT}")


def list_samples(args: argparse.Namespace, split: str) -> list[DeepFashionSpec]:
    """Sample specs of one split in pairs-file order (reads the two CSVs and, if nested, the file tree)."""
    root = Path(args.src)
    pairs = read_pairs(_csv_file(root, "pairs", split))
    annotations = read_annotations(_csv_file(root, "annotation", split)) if args.densepose is None else {}
    if args.densepose is not None and not args.densepose.is_dir():
        raise FileNotFoundError(
            f"DensePose folder {args.densepose} not found (expected <flattened target stem>.png files)"
        )
    flat, nested = _image_index(root, split, args.images)

    def path_of(name: str) -> Path | None:
        return flat / name if flat is not None else nested.get(name)

    specs = []
    for ref_name, tgt_name in pairs:
        tgt_stem, ref_stem = Path(tgt_name).stem, Path(ref_name).stem
        specs.append(DeepFashionSpec(
            key=build_key(DATASET, split, "paired", tgt_stem, ref_stem),
            source=f"{ref_name} -> {tgt_name}", split=split, pairing="paired",
            tgt_name=tgt_name, ref_name=ref_name, tgt_path=path_of(tgt_name), ref_path=path_of(ref_name),
            keypoints=annotations.get(tgt_name),
            densepose_path=None if args.densepose is None else args.densepose / f"{tgt_stem}.png",
        ))  # fmt: skip
    return specs


def no_samples_reason(args: argparse.Namespace) -> str:
    """Why a split lists no sample, in the user's terms."""
    return f"the pair files under --src {args.src} list none"


def _shortened(raw: tuple[str, str], limit: int = 200) -> str:
    """repr of the raw keypoint strings, cut to `limit` characters (a hostile field may be huge)."""
    text = repr(raw)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_keypoints(raw: tuple[str, str], size: tuple[int, int]) -> np.ndarray:
    """Raw (y, x) JSON lists in the 256x176 frame -> (18, 2) (x, y) scaled to `size` (W, H); NaN = missing."""
    try:
        ys, xs = (np.asarray(json.loads(text), dtype=np.float64) for text in raw)
    except (ValueError, TypeError, RecursionError) as err:  # RecursionError: JSON nested too deeply
        raise SampleError(f"unreadable keypoint lists {_shortened(raw)}: {err}") from err
    if ys.shape != (18,) or xs.shape != (18,):
        raise SampleError(f"expected 18 y and 18 x keypoints, got {ys.shape} and {xs.shape}")
    points = np.stack([xs * size[0] / KEYPOINT_FRAME[0], ys * size[1] / KEYPOINT_FRAME[1]], axis=1)
    points[(xs == -1) | (ys == -1)] = np.nan
    return points


def load_sample(spec: DeepFashionSpec) -> dict:
    """Read, check and encode one pair (runs in a worker process)."""
    for name, path in ((spec.tgt_name, spec.tgt_path), (spec.ref_name, spec.ref_path)):
        if path is None:
            raise SampleError(f"image {name} not found in the nested image folder")
    tgt, ref = load_rgb(spec.tgt_path), load_rgb(spec.ref_path)
    if spec.densepose_path is not None:
        pose, pose_source = load_rgb(spec.densepose_path, tgt.size, background=BLACK), "densepose"
    elif spec.keypoints is None:
        raise SampleError(f"no keypoints for {spec.tgt_name} in the annotation file")
    else:
        pose, pose_source = draw_coco18(parse_keypoints(spec.keypoints, tgt.size), tgt.size), "keypoints"
    mask = np.full((tgt.height, tgt.width), 255, dtype=np.uint8)
    meta = {
        "dataset": DATASET, "split": spec.split, "task": "pose", "category": category_of(spec.tgt_name),
        "pairing": spec.pairing, "tgt_id": Path(spec.tgt_name).stem, "ref_id": Path(spec.ref_name).stem,
        "pose_source": pose_source,
    }  # fmt: skip
    return build_sample(spec.key, tgt, ref, mask, pose, meta)
