"""Per-sample stages: decode, resize per key, flip, to batch, to the model's batch (leffa/data/*.py)."""

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_prep.encode import png_bytes
from data_prep.sample import build_sample
from data_prep.synthetic_shards import synthetic_sample
from leffa.data.batch import Collate, to_model_batch
from leffa.data.decode import CorruptSample, decode_sample
from leffa.data.skips import DATA_ERRORS, SkipCounter
from leffa.data.transforms import hflip_sample, resize_sample

H0, W0 = 40, 30


def _resized(index=0, height=H0, width=W0, with_flow=True):
    raw = synthetic_sample(index, H0, W0)
    if not with_flow:
        del raw["flow.npy"]
    return resize_sample(decode_sample(raw), height, width)


def _model_batch(*samples):
    return to_model_batch(Collate(SkipCounter())(list(samples)))


# Decode


def test_decode_gives_images_meta_and_flow():
    raw = synthetic_sample(7, H0, W0)
    raw["extra.pyd"] = b"\x80\x04not-to-be-unpickled"  # unknown keys are ignored, never decoded
    out = decode_sample(raw)
    assert out["key"] == "synthetic_train_paired_000007"
    assert out["meta"]["tgt_id"] == "000007"
    assert (out["tgt"].mode, out["ref"].mode, out["mask"].mode, out["densepose"].mode) == ("RGB", "RGB", "L", "RGB")
    assert out["tgt"].size == (W0, H0)
    assert out["flow"].dtype == np.float16 and out["flow"].shape == (H0, W0, 2)  # as stored
    assert "extra.pyd" not in out


def test_decode_draft_shrinks_large_jpeg_but_keeps_at_least_target_size():
    raw = synthetic_sample(0, 256, 192)
    out = decode_sample(raw, draft_size=(64, 48))
    assert out["tgt"].size == (48, 64)  # 1/4 scale DCT decode: exactly the target
    out = decode_sample(raw, draft_size=(100, 70))
    assert out["tgt"].size == (96, 128)  # 1/2 scale: the smallest that is >= (70, 100)
    assert out["mask"].size == (192, 256)  # PNGs stay native


def _corrupt(how):
    raw = synthetic_sample(1, H0, W0)
    if how == "truncated_jpeg":
        raw["tgt.jpg"] = raw["tgt.jpg"][: len(raw["tgt.jpg"]) // 2]
    elif how == "missing_key":
        del raw["mask.png"]
    elif how == "bad_json":
        raw["json"] = b"{not json"
    elif how == "json_not_object":
        raw["json"] = b"[1, 2]"
    elif how == "flow_shape":
        buf = io.BytesIO()
        np.save(buf, np.zeros((H0, W0 + 1, 2), np.float16))
        raw["flow.npy"] = buf.getvalue()
    elif how == "pickled_flow":
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        raw["flow.npy"] = buf.getvalue()
    elif how == "size_mismatch":
        raw["mask.png"] = synthetic_sample(2, H0 + 2, W0)["mask.png"]
    return raw


@pytest.mark.parametrize(
    "how",
    ["truncated_jpeg", "missing_key", "bad_json", "json_not_object", "flow_shape", "pickled_flow", "size_mismatch"],
)
def test_decode_rejects_corrupt_samples_with_data_errors(how):
    with pytest.raises(DATA_ERRORS):
        decode_sample(_corrupt(how))


def test_decode_missing_key_names_it():
    with pytest.raises(CorruptSample, match="mask.png"):
        decode_sample(_corrupt("missing_key"))


# Resize per key


def _sample_from_arrays(tgt, mask, densepose=None, flow=None):
    if densepose is None:
        densepose = np.zeros(tgt.shape, np.uint8)
    meta = {"dataset": "syn", "task": "tryon", "pairing": "paired"}
    image, pose = Image.fromarray(tgt), Image.fromarray(densepose)
    raw = build_sample("syn_train_0000", image, image, np.where(mask >= 128, 255, 0).astype(np.uint8), pose, meta, flow)
    raw["mask.png"] = png_bytes(Image.fromarray(mask, mode="L"))  # as given: data_prep writes only 0 and 255
    return decode_sample(raw)


def test_resize_gives_wire_tensors_and_the_model_batch_meets_the_contract():
    out = _resized(0, height=32, width=24)
    for key in ("tgt", "ref", "densepose"):
        assert out[key].shape == (32, 24, 3) and out[key].dtype == torch.uint8
    assert out["mask"].shape == (32, 24) and out["mask"].dtype == torch.uint8
    assert out["flow"].shape == (32, 24, 2) and out["flow"].dtype == torch.float16
    batch = _model_batch(out)
    for key in ("tgt", "ref", "densepose"):
        assert batch[key].shape == (1, 3, 32, 24) and batch[key].dtype == torch.float32
        assert batch[key].is_contiguous()
        assert batch[key].min() >= -1 and batch[key].max() <= 1
        torch.testing.assert_close(batch[key][0], out[key].permute(2, 0, 1).float() / 127.5 - 1)
    assert batch["mask"].shape == (1, 1, 32, 24) and batch["mask"].dtype == torch.float32
    assert set(batch["mask"].unique().tolist()) == {0.0, 1.0}
    assert batch["flow"].shape == (1, 32, 24, 2) and batch["flow"].dtype == torch.float32
    assert to_model_batch(batch)["tgt"] is batch["tgt"]  # applying it twice changes nothing


def test_mask_nearest_keeps_a_sharp_edge_and_binarises():
    tgt = np.zeros((H0, W0, 3), np.uint8)
    mask = np.zeros((H0, W0), np.uint8)
    mask[:, :12] = 255  # sharp vertical edge after column 11
    mask[:, 12] = 200  # an anti-aliased edge pixel above the 128 threshold
    mask[:, 13] = 100  # and one below it
    out = resize_sample(_sample_from_arrays(tgt, mask), 80, 60)  # exactly 2x up
    expected = np.repeat(np.repeat(mask >= 128, 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(out["mask"], expected.astype(np.uint8))
    down = resize_sample(_sample_from_arrays(tgt, mask), 20, 15)  # exactly 2x down: odd pixels
    np.testing.assert_array_equal(down["mask"], (mask[1::2, 1::2] >= 128).astype(np.uint8))


def test_densepose_nearest_invents_no_colours():
    densepose = np.zeros((H0, W0, 3), np.uint8)
    densepose[:, 10:] = (200, 10, 40)
    densepose[20:, :] = (5, 250, 90)
    sample = _sample_from_arrays(np.zeros((H0, W0, 3), np.uint8), np.zeros((H0, W0), np.uint8), densepose)
    for size in ((32, 24), (57, 41)):
        out = resize_sample(sample, *size)["densepose"].numpy()
        colours = {tuple(c) for c in out.reshape(-1, 3).tolist()}
        assert colours == {(0, 0, 0), (200, 10, 40), (5, 250, 90)}


def test_images_are_antialiased_when_downscaled():
    stripes = np.zeros((H0, W0, 3), np.uint8)
    stripes[:, ::2] = 255  # 1-pixel stripes alias badly without a low-pass filter
    out = resize_sample(_sample_from_arrays(stripes, np.zeros((H0, W0), np.uint8)), 16, 12)["tgt"].float()
    assert abs(out.mean() - 127.5) < 10 and out.std() < 20


def test_flow_nan_pattern_follows_the_resized_mask():
    sample = decode_sample(synthetic_sample(0, H0, W0))  # NaN flow outside the garment region
    for size in ((32, 24), (64, 48), (17, 13)):
        out = resize_sample(sample, *size)
        assert torch.equal(torch.isnan(out["flow"][..., 0]), out["mask"] == 0)
        inside = out["flow"][out["mask"] == 1]
        assert torch.isfinite(inside).all() and inside.min() >= -1 and inside.max() <= 1  # not rescaled


# Flip


def _warp(ref, flow):
    """grid_sample ref (B, 3, H, W) at flow (B, H, W, 2); NaN coordinates read as 0."""
    return F.grid_sample(ref, torch.nan_to_num(flow), align_corners=True)


def _flow_sample(seed=0, height=32, width=24):
    """A resized sample with an arbitrary flow field and a target the flow explains."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=g)
    mask = (torch.rand(height, width, generator=g) > 0.3).to(torch.uint8)
    flow = (torch.rand(height, width, 2, generator=g) * 2 - 1).half()
    flow[mask == 0] = float("nan")
    ref_f = ref.permute(2, 0, 1)[None].float() / 127.5 - 1
    warped = _warp(ref_f, flow[None].float())[0] * mask  # (3, H, W) in [-1, 1]
    tgt = ((warped + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    return {"key": "syn_train_0000", "tgt": tgt, "ref": ref, "mask": mask, "densepose": ref.clone(), "flow": flow}


def test_hflip_mirrors_every_key_and_negates_flow_x():
    sample = _flow_sample()
    flipped = hflip_sample(sample)
    for key in ("tgt", "ref", "mask", "densepose"):
        assert torch.equal(flipped[key], sample[key].flip(1))
    torch.testing.assert_close(flipped["flow"][..., 0], -sample["flow"].flip(1)[..., 0], equal_nan=True)
    torch.testing.assert_close(flipped["flow"][..., 1], sample["flow"].flip(1)[..., 1], equal_nan=True)
    torch.testing.assert_close(hflip_sample(flipped)["flow"], sample["flow"], equal_nan=True)


def test_flipped_flow_warps_flipped_ref_onto_flipped_target():
    sample = _flow_sample()
    plain, flipped = _model_batch(sample), _model_batch(hflip_sample(sample))
    # warp(flip(ref), flip(flow)) == flip(warp(ref, flow)), up to float rounding
    torch.testing.assert_close(
        _warp(flipped["ref"], flipped["flow"]), _warp(plain["ref"], plain["flow"]).flip(-1), atol=1e-5, rtol=0
    )
    # so the flipped flow carries the flipped reference onto the flipped target (uint8 rounding)
    warped = _warp(flipped["ref"], flipped["flow"]) * flipped["mask"]
    torch.testing.assert_close(warped, flipped["tgt"] * flipped["mask"], atol=1.01 / 127.5, rtol=0)
    # and the wrong rule (mirror the array but keep x) does not:
    wrong = flipped["flow"].clone()
    wrong[..., 0] = -wrong[..., 0]
    assert ((_warp(flipped["ref"], wrong) - flipped["tgt"]) * flipped["mask"]).abs().max() > 0.5


# To batch


def test_collate_stacks_and_drops_flow_unless_every_sample_has_it():
    counter = SkipCounter()
    with_flow = [_resized(i, 16, 12, with_flow=True) for i in range(3)]
    counter.skip("test", ValueError("x"))
    batch = Collate(counter)(with_flow)
    assert batch["tgt"].shape == (3, 16, 12, 3) and batch["tgt"].dtype == torch.uint8  # wire format
    assert batch["mask"].shape == (3, 16, 12)
    assert batch["flow"].shape == (3, 16, 12, 2)
    assert batch["key"] == [f"synthetic_train_paired_{i:06d}" for i in range(3)]
    assert batch["skipped"].dtype == torch.long and batch["skipped"].item() == 1
    mixed = Collate(counter)(with_flow[:2] + [_resized(3, 16, 12, with_flow=False)])
    assert "flow" not in mixed and "flow" not in to_model_batch(mixed)
    assert mixed["skipped"].item() == 0  # the count resets after each batch


def test_json_meta_is_plain_json():
    raw = synthetic_sample(3, H0, W0, split="test")
    meta = json.loads(raw["json"])
    assert set(meta) >= {"dataset", "split", "task", "category", "pairing", "tgt_id", "ref_id", "height", "width"}
    assert Image.open(io.BytesIO(raw["mask.png"])).mode == "L"
