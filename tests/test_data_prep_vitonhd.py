"""VITON-HD converter on a tiny raw folder in the dataset's own layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from raw_datasets import (
    TEST_VITONHD as TEST,
)
from raw_datasets import (
    TRAIN_VITONHD as TRAIN,
)
from raw_datasets import (
    VITONHD_SIZE,
    cloth_colour,
    decode,
    make_vitonhd,
    mean_colour,
    parse_map,
    read_manifest,
    read_split,
    save_png,
    save_png_bomb,
    truncate,
)

from data_prep.__main__ import main
from data_prep.vitonhd import agnostic_mask

H, W = VITONHD_SIZE


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return make_vitonhd(tmp_path / "zalando-hd-resized")


def convert(raw: Path, out: Path, *extra: str) -> dict:
    return main(["vitonhd", "--src", str(raw), "--out", str(out), "--shard-size", "2", *extra])


def test_keys_pairing_and_metadata(raw, tmp_path):
    out = tmp_path / "shards"
    manifest = convert(raw, out)
    train, test = read_split(out, "train"), read_split(out, "test")
    assert [k for k, _ in train] == [f"vitonhd_train_paired_{s}" for s in TRAIN]
    assert [k for k, _ in test] == [
        "vitonhd_test_paired_00010_00", "vitonhd_test_unpaired_00010_00__00011_00",
        "vitonhd_test_paired_00011_00", "vitonhd_test_unpaired_00011_00__00010_00",
    ]  # fmt: skip
    assert manifest["splits"]["test"]["pairings"] == ["paired", "unpaired"]
    assert [s["num_samples"] for s in manifest["splits"]["test"]["shards"]] == [2, 2]
    for key, sample in train + test:
        d = decode(sample)
        meta = d["meta"]
        expected_ref = meta["tgt_id"] if meta["pairing"] == "paired" else dict(TEST)[meta["tgt_id"]]
        assert meta["ref_id"] == expected_ref
        assert {k: meta[k] for k in ("dataset", "task", "category", "pose_source", "height", "width")} == {
            "dataset": "vitonhd", "task": "tryon", "category": "upper_body", "pose_source": "densepose",
            "height": H, "width": W}  # fmt: skip
        assert meta["split"] == key.split("_")[1]
        # the stored reference is the garment the pair line names (each garment has its own colour)
        assert np.abs(mean_colour(d["ref"]) - cloth_colour(expected_ref)).max() < 4
        assert np.abs(mean_colour(d["densepose"]) - (30, 90, 200)).max() < 4
        assert d["tgt"].shape == (H, W, 3) and d["mask_image"].mode == "L"


def test_rule_mask_covers_garment_not_head_or_legs(raw, tmp_path):
    out = tmp_path / "shards"
    convert(raw, out, "--split", "train")
    labels = parse_map()
    for _, sample in read_split(out, "train"):
        d = decode(sample)
        mask = d["mask"]
        assert d["meta"]["mask_source"] == "rule"
        assert set(np.unique(mask)) == {0, 255}
        for garment in (5, 10, 14, 15):  # upper clothes, neck, arms
            assert (mask[labels == garment] == 255).all(), garment
        for kept in (13, 9, 18, 19):  # face, pants, shoes
            assert (mask[labels == kept] == 0).all(), kept
        assert mask[0, 0] == 0 and mask[H - 1, W - 1] == 0


def test_agnostic_mask_files_take_priority(raw, tmp_path):
    stored = np.full((H, W), 100, dtype=np.uint8)
    stored[20:40, 10:30] = 200  # >= 128 -> 255
    for person, _ in TEST:
        save_png(raw / "test" / "agnostic-mask" / f"{person}_mask.png", stored, mode="L")
    out = tmp_path / "shards"
    convert(raw, out)
    for _, sample in read_split(out, "test"):
        d = decode(sample)
        assert d["meta"]["mask_source"] == "file"
        assert np.array_equal(d["mask"], np.where(stored >= 128, 255, 0))
    assert all(decode(s)["meta"]["mask_source"] == "rule" for _, s in read_split(out, "train"))


def test_truncated_image_is_skipped_and_reported(raw, tmp_path, caplog):
    truncate(raw / "train" / "image" / "00002_00.jpg")
    out = tmp_path / "shards"
    manifest = convert(raw, out, "--split", "train")
    assert [k for k, _ in read_split(out, "train")] == [
        "vitonhd_train_paired_00001_00",
        "vitonhd_train_paired_00003_00",
    ]
    entry = manifest["splits"]["train"]
    assert (entry["num_samples_in"], entry["num_written"], entry["num_skipped"]) == (3, 2, 1)
    assert sum(s["num_samples"] for s in entry["shards"]) == 2
    (skipped,) = read_manifest(out)["skipped"]
    assert skipped["key"] == "vitonhd_train_paired_00002_00" and skipped["split"] == "train"
    assert "00002_00.jpg" in skipped["reason"]
    assert "vitonhd_train_paired_00002_00" in caplog.text


@pytest.mark.parametrize(
    "size, workers",
    [((20000, 20000), 2), ((10000, 9000), 0)],  # over twice PIL's pixel limit (an error), just over it (a warning)
)
def test_image_over_the_pixel_limit_is_skipped_like_a_corrupt_file(raw, tmp_path, size, workers):
    bomb = raw / "train" / "cloth" / "00002_00.jpg"
    save_png_bomb(bomb, *size)
    assert bomb.stat().st_size < 100_000 and size[0] * size[1] > Image.MAX_IMAGE_PIXELS
    out = tmp_path / "shards"
    manifest = convert(raw, out, "--split", "train", "--workers", str(workers))
    assert [k for k, _ in read_split(out, "train")] == [
        "vitonhd_train_paired_00001_00",
        "vitonhd_train_paired_00003_00",
    ]
    entry = manifest["splits"]["train"]
    assert (entry["num_samples_in"], entry["num_written"], entry["num_skipped"]) == (3, 2, 1)
    (skipped,) = read_manifest(out)["skipped"]
    assert skipped["key"] == "vitonhd_train_paired_00002_00"
    assert str(bomb) in skipped["reason"] and f"{size[0] * size[1]} pixels" in skipped["reason"]


def test_repeated_pair_line_is_skipped_as_duplicate(raw, tmp_path):
    with open(raw / "train_pairs.txt", "a") as handle:
        handle.write("00001_00.jpg 00001_00.jpg\n")
    manifest = convert(raw, tmp_path / "shards", "--split", "train")
    entry = manifest["splits"]["train"]
    assert (entry["num_samples_in"], entry["num_written"], entry["num_skipped"]) == (4, 3, 1)
    assert manifest["skipped"][0]["key"] == "vitonhd_train_paired_00001_00"
    assert "duplicate" in manifest["skipped"][0]["reason"]


def test_missing_pair_file_names_it(raw, tmp_path):
    (raw / "test_pairs.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"test_pairs\.txt.*VITON-HD root"):
        convert(raw, tmp_path / "shards", "--split", "test")


def test_rule_without_keypoints_still_masks_garment_labels():
    labels = parse_map()
    mask = agnostic_mask(labels, np.full((25, 2), np.nan))
    assert (mask[labels == 5] == 255).all() and (mask[labels == 13] == 0).all() and (mask[labels == 9] == 0).all()
