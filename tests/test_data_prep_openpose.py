"""data_prep.openpose: the one OpenPose JSON reader (VITON-HD's openpose_json/, a folder's keypoints/)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep.openpose import BODY25_TO_COCO18, read_coco18, read_openpose
from data_prep.sample import SampleError


def write(path, joints: int, absent=(), people=True):
    points = np.array([[10 + i, 20 + i, 0.9] for i in range(joints)])
    points[list(absent), 2] = 0
    data = {"people": [{"pose_keypoints_2d": points.ravel().tolist()}] if people else []}
    path.write_text(json.dumps(data))
    return path


def test_body25_read_and_mapped_to_coco18(tmp_path):
    path = write(tmp_path / "a.json", 25, absent=(3,))
    points = read_openpose(path)
    assert points.shape == (25, 2) and np.isnan(points[3]).all() and tuple(points[8]) == (18, 28)
    coco = read_coco18(path)
    assert coco.shape == (18, 2) and np.isnan(coco[3]).all()
    assert tuple(coco[8]) == (19, 29) == tuple(points[BODY25_TO_COCO18[8]])  # r-hip: BODY_25 9 (8 is mid-hip)


def test_coco18_is_kept_and_other_counts_are_a_sample_error(tmp_path):
    np.testing.assert_array_equal(read_coco18(write(tmp_path / "c.json", 18)), read_openpose(tmp_path / "c.json"))
    with pytest.raises(SampleError, match="15 keypoints; expected OpenPose BODY_25"):
        read_coco18(write(tmp_path / "b.json", 15))
    with pytest.raises(SampleError, match="no usable people"):
        read_openpose(write(tmp_path / "n.json", 25, people=False))
