"""OpenPose JSON keypoint files (`people[0].pose_keypoints_2d`, x y confidence per joint, pixels):
the one reader of the converters that take OpenPose output (VITON-HD's `openpose_json/`, the
`keypoints/` of a folder of your own data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.load import load_json
from data_prep.sample import SampleError

# OpenPose BODY_25 index of each COCO-18 joint (BODY_25 adds mid-hip 8 and the feet 19..24)
BODY25_TO_COCO18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)


def read_openpose(path: Path) -> np.ndarray:
    """OpenPose JSON -> (N, 2) pixel (x, y) of the first person (N = 25 for BODY_25), NaN where
    the confidence is 0 or the point is (0, 0)."""
    data = load_json(path)
    try:
        flat = data["people"][0]["pose_keypoints_2d"]
        keypoints = np.asarray(flat, dtype=np.float64).reshape(-1, 3)
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise SampleError(f"{path}: no usable people[0].pose_keypoints_2d ({err!r})") from err
    points = keypoints[:, :2].copy()
    missing = (keypoints[:, 2] <= 0) | ((points[:, 0] == 0) & (points[:, 1] == 0))
    points[missing] = np.nan
    return points


def read_coco18(path: Path) -> np.ndarray:
    """OpenPose JSON (BODY_25 or COCO-18) -> (18, 2) COCO-18 pixel (x, y), NaN where absent."""
    points = read_openpose(path)
    if len(points) == 25:
        return points[list(BODY25_TO_COCO18)]
    if len(points) == 18:
        return points
    raise SampleError(f"{path}: {len(points)} keypoints; expected OpenPose BODY_25 (25) or COCO-18 (18)")
