"""``data.hflip`` and pose images with sides: DensePose renders (part labels, U/V) and keypoint
renders (coloured by side) cannot be mirrored by mirroring pixels, so hflip refuses them with one
line; shipped configs do not turn it on."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from data_prep.__main__ import main as data_prep_main
from data_prep.encode import json_bytes, png_bytes
from data_prep.keypoints import draw_coco18
from data_prep.synthetic_shards import synthetic_sample, write_samples
from leffa.data import LeffaDataModule
from leffa.data.decode import decode_sample
from leffa.data.transforms import hflip_sample, random_hflip, resize_sample
from leffa.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    data_prep_main(["synthetic", "--out", str(out), "--count", "4", "--split", "train", "--shard-size", "4",
                    "--height", "32", "--width", "24"])
    return str(out)


def _keypoint_shards(folder):
    """Synthetic samples whose pose image is a COCO-18 keypoint render: right arm red-orange, left arm green."""
    points = np.full((18, 2), np.nan)
    points[[1, 2, 3, 4, 5, 6, 7]] = [[12, 8], [8, 8], [5, 14], [4, 20], [16, 8], [19, 14], [20, 20]]
    pose = np.asarray(draw_coco18(points, (24, 32)))
    samples = []
    for i in range(2):
        sample = synthetic_sample(i, 32, 24)
        sample["densepose.png"] = png_bytes(Image.fromarray(pose))
        sample["json"] = json_bytes({**json.loads(sample["json"]), "pose_source": "keypoints"})
        samples.append(sample)
    write_samples(folder, "train", samples, shard_size=2)
    return pose


def test_synthetic_densepose_shards_refuse_hflip_in_one_line(synthetic_shards):
    dm = LeffaDataModule(train_shards=synthetic_shards, height=16, width=12, num_workers=0, hflip=True)
    with pytest.raises(UserError, match=r"^data\.hflip: .*train-000000\.tar.*pose_source 'densepose'.*data\.hflip: false$"):
        dm.setup("fit")
    LeffaDataModule(train_shards=synthetic_shards, height=16, width=12, num_workers=0).setup("fit")  # no flip: fine


def test_keypoint_render_refuses_hflip_because_mirroring_keeps_side_colours(tmp_path):
    pose = _keypoint_shards(tmp_path)
    # What a mirror would do: the right arm's colour (limb 2, (255, 170, 0)) lands on the image's
    # right half, where the left arm is drawn: the render would say "right arm" for a left arm.
    right_arm = (pose == (255, 170, 0)).all(axis=-1)
    assert right_arm[:, :12].any() and not right_arm[:, 12:].any()
    assert (np.flip(pose, axis=1) == (255, 170, 0)).all(axis=-1)[:, 12:].any()
    dm = LeffaDataModule(train_shards=str(tmp_path), height=16, width=12, num_workers=0, hflip=True)
    with pytest.raises(UserError, match=r"pose_source 'keypoints'"):
        dm.setup("fit")


def test_hflip_stage_refuses_a_sided_sample_met_later_in_the_stream(synthetic_shards):
    import webdataset as wds

    raw = next(iter(wds.DataPipeline(wds.SimpleShardList([f"{synthetic_shards}/train-000000.tar"]),
                                     wds.tarfile_to_samples())))
    sample = resize_sample(decode_sample(raw), 16, 12)
    with pytest.raises(UserError, match=r"data\.hflip: .*sample 'synthetic_train_\w+'"):
        list(random_hflip([sample], p=1.0, seed=0, rank=0))
    # a sample that declares no pose source is still mirrored, every key together
    plain = dict(sample, meta={})
    flipped = next(random_hflip([plain], p=1.0, seed=0, rank=0))
    torch.testing.assert_close(flipped["densepose"], hflip_sample(plain)["densepose"])


def _data_hflip(config: Path):
    data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    return data.get("hflip")


def test_no_shipped_config_turns_hflip_on():
    """Every shipped stage reads shards written by data_prep, whose pose images have sides."""
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    assert configs
    assert [str(c.relative_to(ROOT)) for c in configs if _data_hflip(c)] == []
