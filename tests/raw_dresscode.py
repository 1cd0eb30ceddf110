"""A tiny DressCode layout (three categories, label maps, keypoints, dense part maps, pair files) for tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from raw_datasets import save_jpeg, save_png, solid

H, W = 64, 48  # keypoints are stored in 384x512, i.e. 8x these pixels
IDS = {  # category -> (train ids, test ids)
    "upper_body": (("000001",), ("048392", "048393")),
    "lower_body": (("013001",), ("050001", "050002")),
    "dresses": (("022001",), ("052001", "052002")),
}
COCO18 = {0: (24, 9), 1: (24, 16), 2: (14, 18), 3: (10, 27), 4: (10, 35), 5: (34, 18), 6: (38, 27), 7: (38, 35),
          8: (18, 38), 9: (18, 48), 10: (18, 58), 11: (30, 38), 12: (30, 48), 13: (30, 58)}  # fmt: skip


def label_map(category: str) -> np.ndarray:
    """ATR labels: hair, head (face + neck), arms, the category's garment, legs or pants, shoes."""
    labels = np.zeros((H, W), dtype=np.uint8)
    labels[2:6, 18:31] = 2  # hair
    labels[6:17, 19:30] = 11  # head, down to the neck
    labels[17:36, 8:13] = 14
    labels[17:36, 36:41] = 15
    if category == "dresses":
        labels[17:51, 13:36] = 7
        labels[51:59, 14:35] = 12
    else:
        labels[17:38, 13:36] = 4  # upper clothes
        labels[38:59, 14:35] = 6  # pants
    labels[59:63, 14:23] = 9
    labels[59:63, 26:35] = 10
    return labels


def keypoints_json() -> dict:
    points = [[8 * COCO18[i][0], 8 * COCO18[i][1], 0.9, i] if i in COCO18 else [0.0, 0.0, 0.0, i] for i in range(18)]
    return {"keypoints": points}


def garment_colour(sample_id: str) -> tuple[int, int, int]:
    number = int(sample_id)
    return (30 + 40 * (number % 5), 220 - 35 * (number % 4), 50 + 60 * (number % 3))


def make_dresscode(root: Path) -> Path:
    for category, (train, test) in IDS.items():
        folder = root / category
        for seed, sample_id in enumerate(train + test):
            save_jpeg(folder / "images" / f"{sample_id}_0.jpg", solid(H, W, (120, 110, 100), seed))
            save_jpeg(folder / "images" / f"{sample_id}_1.jpg", solid(H, W, garment_colour(sample_id), seed))
            save_png(folder / "label_maps" / f"{sample_id}_4.png", label_map(category), mode="L")
            (folder / "keypoints").mkdir(exist_ok=True)
            (folder / "keypoints" / f"{sample_id}_2.json").write_text(json.dumps(keypoints_json()))
            parts = np.zeros((H, W), dtype=np.uint8)
            parts[17:38, 13:36] = 2  # torso part index
            save_png(folder / "dense" / f"{sample_id}_5.png", parts, mode="L")
        (folder / "train_pairs.txt").write_text("".join(f"{i}_0.jpg {i}_1.jpg\n" for i in train))
        (folder / "test_pairs_paired.txt").write_text("".join(f"{i}_0.jpg {i}_1.jpg\n" for i in test))
        swapped = (test[1], test[0])
        (folder / "test_pairs_unpaired.txt").write_text(
            "".join(f"{i}_0.jpg {j}_1.jpg\n" for i, j in zip(test, swapped))
        )
    return root
