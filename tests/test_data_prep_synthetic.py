"""Synthetic set: the stored flow warps ref onto tgt inside the mask; generation is deterministic."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from raw_datasets import decode, read_split

from data_prep.__main__ import main
from data_prep.synthetic import grid_sample_bilinear


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.astype(np.float32) / 255).permute(2, 0, 1)[None]  # (1, 3, H, W)


def warp_error(d: dict, grid: np.ndarray) -> float:
    """Mean |grid_sample(ref, grid) - tgt| over the mask, in [0, 1] pixel units."""
    warped = F.grid_sample(to_tensor(d["ref"]), torch.from_numpy(grid.astype(np.float32))[None],
                           mode="bilinear", align_corners=True)  # fmt: skip
    diff = (warped - to_tensor(d["tgt"])).abs()[0].permute(1, 2, 0).numpy()  # (H, W, 3)
    return float(diff[d["mask"] == 255].mean())


def test_flow_warps_reference_onto_target(tmp_path):
    out = tmp_path / "shards"
    main(["synthetic", "--out", str(out), "--count", "12", "--split", "train", "--height", "128", "--width", "96"])
    samples = read_split(out, "train")
    assert len(samples) == 12
    height, width = 128, 96
    y, x = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    identity = np.stack([x, y], axis=-1)
    for key, sample in samples:
        d = decode(sample)
        flow, mask = d["flow"], d["mask"]
        assert flow.dtype == np.float16 and flow.shape == (height, width, 2)
        assert np.array_equal(mask == 255, ~np.isnan(flow).any(axis=-1))  # NaN exactly outside the mask
        assert 0.1 < (mask == 255).mean() < 0.9
        assert np.abs(flow[mask == 255]).max() <= 1
        assert (d["densepose"][mask == 0] == 0).all() and d["densepose"][mask == 255].any()
        grid = np.nan_to_num(flow.astype(np.float64))
        assert warp_error(d, grid) < 0.02, key
        assert warp_error(d, identity) > 0.03, key  # the check can tell a wrong flow apart
        assert d["meta"] == {"dataset": "synthetic", "split": "train", "task": "tryon", "category": "synthetic",
                             "pairing": "paired", "tgt_id": key[-6:], "ref_id": key[-6:], "height": height,
                             "width": width, "pose_source": "densepose", "texture": "periodic"}  # fmt: skip


def test_seed_determines_the_samples(tmp_path):
    def run(name: str, seed: int) -> list:
        out = tmp_path / name
        main(["synthetic", "--out", str(out), "--count", "3", "--split", "test", "--seed", str(seed),
              "--height", "48", "--width", "32"])  # fmt: skip
        return read_split(out, "test")

    first, again, other = run("a", 7), run("b", 7), run("c", 8)
    assert first == again
    assert [k for k, _ in first] == [k for k, _ in other] == [f"synthetic_test_paired_{i:06d}" for i in range(3)]
    assert all(a["tgt.jpg"] != b["tgt.jpg"] for (_, a), (_, b) in zip(first, other))


def test_numpy_bilinear_matches_torch_grid_sample():
    rng = np.random.default_rng(0)
    image = rng.uniform(size=(7, 5, 3))
    grid = rng.uniform(-1.2, 1.2, size=(9, 6, 2))  # some positions fall outside: zero padding
    expected = F.grid_sample(torch.from_numpy(image).permute(2, 0, 1)[None], torch.from_numpy(grid)[None],
                             mode="bilinear", padding_mode="zeros", align_corners=True)  # fmt: skip
    np.testing.assert_allclose(grid_sample_bilinear(image, grid), expected[0].permute(1, 2, 0).numpy(), atol=1e-12)
