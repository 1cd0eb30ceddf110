"""A tiny DeepFashion In-shop layout (pairs and annotation CSVs, flat or nested images) for tests."""

from __future__ import annotations

import json
from pathlib import Path

from raw_datasets import save_jpeg, solid

H, W = 64, 44  # the 256x176 annotation frame / 4
NESTED = {  # flattened name -> nested path under img_highres/
    "fashionWOMENDressesid0000000101_1front.jpg": "WOMEN/Dresses/id_00000001/01_1_front.jpg",
    "fashionWOMENDressesid0000000102_2side.jpg": "WOMEN/Dresses/id_00000001/02_2_side.jpg",
    "fashionMENTees_Tanksid0000000201_1front.jpg": "MEN/Tees_Tanks/id_00000002/01_1_front.jpg",
    "fashionMENTees_Tanksid0000000202_4full.jpg": "MEN/Tees_Tanks/id_00000002/02_4_full.jpg",
}
NAMES = list(NESTED)
COLOURS = {name: (40 + 50 * i, 200 - 40 * i, 90 + 30 * i) for i, name in enumerate(NAMES)}
TRAIN_PAIRS = [(NAMES[0], NAMES[1]), (NAMES[1], NAMES[0]), (NAMES[2], NAMES[3])]  # (from, to)
TEST_PAIRS = [(NAMES[3], NAMES[2])]
# 18 joints in the 256x176 frame: a vertical stick figure; -1 marks missing joints
KEYPOINTS_Y = [40, 60, 62, 100, 140, 62, 100, 140, 130, 180, 230, 130, 180, 230, 35, 35, -1, -1]
KEYPOINTS_X = [88, 88, 60, 50, 45, 116, 126, 131, 70, 70, 70, 106, 106, 106, 80, 96, -1, -1]


def make_deepfashion(root: Path, nested: bool = False, annotate: tuple[str, ...] = tuple(NAMES)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, pairs in (("train", TRAIN_PAIRS), ("test", TEST_PAIRS)):
        rows = "".join(f"{a},{b}\n" for a, b in pairs)
        (root / f"fasion-resize-pairs-{split}.csv").write_text("from,to\n" + rows)
        names = sorted({n for pair in pairs for n in pair} & set(annotate))
        lines = "".join(f"{n}: {json.dumps(KEYPOINTS_Y)}: {json.dumps(KEYPOINTS_X)}\n" for n in names)
        (root / f"fasion-resize-annotation-{split}.csv").write_text("name:keypoints_y:keypoints_x\n" + lines)
        for seed, name in enumerate(sorted({n for pair in pairs for n in pair})):
            path = root / "img_highres" / NESTED[name] if nested else root / f"{split}_highres" / name
            save_jpeg(path, solid(H, W, COLOURS[name], seed))
    return root
