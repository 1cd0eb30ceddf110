"""leffa.testing and data_prep.synthetic_shards: the shards tests and benchmarks use come from data_prep's one synthetic generator,
whose flow carries the reference onto the target (what a Leffa loss is checked against)."""

import json

import torch
import torch.nn.functional as F

from data_prep.synthetic_shards import synthetic_sample, synthetic_shards
from leffa.data import LeffaDataModule, to_model_batch
from leffa.testing import make_batch


def test_synthetic_shards_are_data_prep_shards_whose_flow_warps_ref_onto_tgt(tmp_path):
    paths = synthetic_shards(tmp_path, 4, 32, 24, split="all", shard_size=2)
    assert [p.name for p in paths] == ["test-000000.tar", "test-000001.tar", "train-000000.tar", "train-000001.tar"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["dataset"] == "synthetic" and manifest["splits"]["train"]["num_written"] == 4
    dm = LeffaDataModule(val_shards=str(tmp_path), height=32, width=24, val_batch_size=4, num_workers=0)
    dm.setup("validate")
    batch = to_model_batch(next(iter(dm.val_dataloader())))
    assert batch["key"] == [f"synthetic_test_paired_{i:06d}" for i in range(4)]
    inside = batch["mask"][:, 0] > 0
    assert inside.any(dim=(1, 2)).all()
    warped = F.grid_sample(batch["ref"], torch.nan_to_num(batch["flow"]), align_corners=True)
    error = (warped - batch["tgt"]).abs().mean(1)[inside]
    assert error.mean() < 0.1  # JPEG rounding (~0.03 here); a ref of another sample is off by ~0.5


def test_synthetic_sample_is_deterministic_and_keyed_like_data_prep():
    a, b = synthetic_sample(3, 16, 12, split="test"), synthetic_sample(3, 16, 12, split="test")
    assert a == b and a["__key__"] == "synthetic_test_paired_000003"
    assert synthetic_sample(3, 16, 12, texture="ramp")["tgt.jpg"] != synthetic_sample(3, 16, 12)["tgt.jpg"]


def test_make_batch_follows_the_batch_contract():
    batch = make_batch(batch_size=3, height=16, width=8, seed=1)
    for key in ("tgt", "ref", "densepose"):
        assert batch[key].shape == (3, 3, 16, 8) and -1 <= batch[key].min() and batch[key].max() <= 1
    assert batch["mask"].shape == (3, 1, 16, 8) and set(batch["mask"].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(make_batch(seed=1)["tgt"], make_batch(seed=1)["tgt"])
