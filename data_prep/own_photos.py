"""Your own photos (a plain folder) -> try-on shards; the same folder `--data.predict_folder` reads.

Layout (root = the folder given as --src), files named by id, each .jpg, .jpeg or .png (indexed by
`leffa.folder_index`, as `--data.predict_folder` does: two files of one id are an error naming both):
- `person/<person id>.*`: the person photo (the target).
- `garment/<garment id>.*`: the in-shop garment (the reference); `reference/` is accepted instead
  (the prediction folder's name), not both.
- `mask/<person id>.*`: the region to generate, white (grey >= 128) on black (transparent: black).
- `densepose/<person id>.*`: the DensePose rendering of the person, resized to the photo if its
  size differs (mask too; their aspect ratio must be the photo's, see below); or, with
  `--pose-source keypoints`, `keypoints/<person id>.json`: OpenPose JSON
  (`people[0].pose_keypoints_2d`, BODY_25 or COCO-18, pixels of the photo; `openpose.read_coco18`),
  drawn as a COCO-18 skeleton (`keypoints.draw_coco18`).
- `train_pairs.txt`, `test_pairs.txt`: one `<person id> <garment id>` per line (an id may carry its
  image extension, e.g. `alice.jpg shirt.png`).

Pairs: every train line is paired (the person wears that garment: the photo is the ground truth).
A test line is paired when its two ids are the same, unpaired otherwise; so give a garment the id
of the person who wears it to evaluate paired try-on. Keys: `folder_<split>_<pairing>_<person id>`,
followed by `__<garment id>` when the ids differ.

Before anything is written, every file a listed pair needs must exist: the missing ones are one
error that names a few and counts them all; so is every mask or DensePose image whose aspect ratio
differs from its photo's by more than `leffa.images.ASPECT_TOLERANCE` (3%; resizing it would
stretch it). A file that exists but cannot be read (truncated, corrupt) or a mask with no white
pixel is skipped and reported in the manifest, as for the datasets. Images are read upright (EXIF
orientation), 16-bit ones scaled to 8 bits, transparent pixels composited on white (photos) or
black (masks, DensePose); the manifest counts those conversions (`image_conversions`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from data_prep.keypoints import draw_coco18
from data_prep.load import load_binary_mask, load_rgb, read_pair_lines
from data_prep.openpose import read_coco18
from data_prep.sample import SampleError, build_sample
from leffa.images import BLACK, check_aspect_ratios
from leffa.errors import UserError
from leffa.folder_index import IMAGE_EXTENSIONS, id_of, index_folder
from leffa.schema import build_key

DATASET = "folder"
SPLITS = ("train", "test")
SOURCE_OPTIONS = ("src",)  # the options that name folders of source files: --out must lie outside them
POSE_FILES = {"densepose": ("densepose", IMAGE_EXTENSIONS), "keypoints": ("keypoints", (".json",))}  # folder, suffixes
GARMENT_DIRS = ("garment", "reference")
PAIR_COLUMNS = ("person", "garment")
SHOWN_MISSING = 3  # missing files named in the error; the rest are counted
ROOT_HINT = (
    "a folder of your own data must contain person/, garment/ (or reference/), mask/, densepose/ "
    "(or keypoints/ with --pose-source keypoints) named by id, and train_pairs.txt, test_pairs.txt"
)


@dataclass(frozen=True)
class FolderSpec:
    """One sample to build: the resolved files of one pair line."""

    key: str
    source: str
    split: str
    pairing: str
    category: str
    person_id: str
    garment_id: str
    person: Path
    garment: Path
    mask: Path
    pose: Path  # a DensePose image or an OpenPose JSON file
    pose_source: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", type=Path, required=True, help="raw dataset root folder")
    parser.add_argument(
        "--pose-source",
        choices=tuple(POSE_FILES),
        default="densepose",
        help="densepose/ renderings (default) or keypoints/ OpenPose JSON drawn as a skeleton",
    )
    parser.add_argument(
        "--category",
        default="upper_body",
        help="category stored in each sample's metadata (default: upper_body)",
    )


def _garment_dir(root: Path) -> Path:
    present = [name for name in GARMENT_DIRS if (root / name).is_dir()]
    if len(present) == 2:
        raise UserError(f"{root} holds both garment/ and reference/; keep one of them (they name the same images)")
    if not present:
        raise FileNotFoundError(f"folder {root / GARMENT_DIRS[0]} not found; {ROOT_HINT}")
    return root / present[0]


def _index(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """{id: file} of `folder` (`leffa.folder_index`: two files of one id are an error naming both)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} not found; {ROOT_HINT}")
    return index_folder(folder, suffixes)


def list_samples(args: argparse.Namespace, split: str) -> list[FolderSpec]:
    """Sample specs of one split in pair-file order; every file they need must exist (one UserError)."""
    root = Path(args.src)
    pair_file = root / f"{split}_pairs.txt"
    if not pair_file.is_file():
        raise FileNotFoundError(f"pair file {pair_file} not found; add it, or convert only the other split "
                                f"(--split {'train' if split == 'test' else 'test'})")  # fmt: skip
    lines = read_pair_lines(pair_file, PAIR_COLUMNS, ROOT_HINT)  # plain file names only
    rows = [(id_of(person), id_of(garment)) for _, (person, garment) in lines]
    pose_folder, pose_suffixes = POSE_FILES[args.pose_source]
    names = {"person": "person", "garment": _garment_dir(root).name, "mask": "mask", "pose": pose_folder}
    folders = {role: _index(root / name, pose_suffixes if role == "pose" else IMAGE_EXTENSIONS)
               for role, name in names.items()}  # fmt: skip
    missing = []
    for person, garment in rows:
        for folder, stem in (("person", person), ("garment", garment), ("mask", person), ("pose", person)):
            if stem not in folders[folder] and f"{names[folder]}/{stem}.*" not in missing:
                missing.append(f"{names[folder]}/{stem}.*")
    if missing:
        shown = ", ".join(missing[:SHOWN_MISSING])
        more = f" and {len(missing) - SHOWN_MISSING} more" if len(missing) > SHOWN_MISSING else ""
        raise UserError(f"{len(missing)} files missing in {root} for the pairs of {pair_file.name}: {shown}{more}; "
                        "add them (see docs/data.md on masks and DensePose) or remove those pair lines")  # fmt: skip
    aligned = ("mask", "pose") if args.pose_source == "densepose" else ("mask",)  # keypoints: no image
    people = dict.fromkeys(person for person, _ in rows)
    check_aspect_ratios(((folders["person"][p], [folders[role][p] for role in aligned]) for p in people), root)
    specs = []
    for person, garment in rows:
        pairing = "paired" if split == "train" or person == garment else "unpaired"
        specs.append(FolderSpec(
            key=build_key(DATASET, split, pairing, person, garment if garment != person else None),
            source=f"{split}_pairs.txt: {person} {garment}", split=split, pairing=pairing, category=args.category,
            person_id=person, garment_id=garment, person=folders["person"][person],
            garment=folders["garment"][garment], mask=folders["mask"][person], pose=folders["pose"][person],
            pose_source=args.pose_source,
        ))  # fmt: skip
    return specs


def no_samples_reason(args: argparse.Namespace) -> str:
    """Why a split lists no sample, in the user's terms."""
    return f"the pair files under --src {args.src} list none"


def load_sample(spec: FolderSpec) -> dict:
    """Read, check and encode one sample (runs in a worker process)."""
    tgt = load_rgb(spec.person)
    ref = load_rgb(spec.garment)
    mask = load_binary_mask(spec.mask, tgt.size)
    if not mask.any():
        raise SampleError(f"empty mask {spec.mask} (no pixel >= 128)")
    if spec.pose_source == "densepose":
        pose = load_rgb(spec.pose, tgt.size, background=BLACK)
    else:
        pose = draw_coco18(read_coco18(spec.pose), tgt.size)
    meta = {
        "dataset": DATASET, "split": spec.split, "task": "tryon", "category": spec.category,
        "pairing": spec.pairing, "tgt_id": spec.person_id, "ref_id": spec.garment_id,
        "pose_source": spec.pose_source, "mask_source": "file",
    }  # fmt: skip
    return build_sample(spec.key, tgt, ref, mask, pose, meta)
