"""VITON-HD converter on a tiny raw folder in the dataset's own layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.__main__ import main
from data_prep.masks import vitonhd_agnostic_mask
from raw_datasets import decode, mean_colour, read_manifest, read_split, save_jpeg, save_png, solid, truncate

H, W = 64, 48
TRAIN = ("00001_00", "00002_00", "00003_00")
TEST = (("00010_00", "00011_00"), ("00011_00", "00010_00"))  # person, unpaired garment


def cloth_colour(stem: str) -> tuple[int, int, int]:
    number = int(stem[:5])
    return (40 + 50 * (number % 4), 200 - 30 * (number % 5), 60 + 45 * (number % 3))


def parse_map() -> np.ndarray:
    """CIHP/LIP labels of a standing person: hair, face, neck, upper clothes, arms, pants, shoes."""
    labels = np.zeros((H, W), dtype=np.uint8)
    labels[2:6, 18:31] = 2  # hair
    labels[6:14, 19:30] = 13  # face
    labels[14:17, 21:28] = 10  # neck
    labels[17:38, 13:36] = 5  # upper clothes
    labels[17:36, 8:13] = 14  # left arm
    labels[17:36, 36:41] = 15  # right arm
    labels[38:59, 14:35] = 9  # pants
    labels[59:63, 14:23] = 18
    labels[59:63, 26:35] = 19
    return labels


BODY_25 = {1: (24, 16), 2: (14, 18), 3: (10, 27), 4: (10, 35), 5: (34, 18), 6: (38, 27), 7: (38, 35),
           8: (24, 38), 9: (18, 38), 12: (30, 38)}  # fmt: skip


def openpose_json() -> dict:
    flat = []
    for index in range(25):
        x, y = BODY_25.get(index, (0, 0))
        flat += [x, y, 0.9 if index in BODY_25 else 0.0]
    return {"version": 1.3, "people": [{"person_id": [-1], "pose_keypoints_2d": flat}]}


def make_vitonhd(root: Path) -> Path:
    (root).mkdir(parents=True, exist_ok=True)
    (root / "train_pairs.txt").write_text("".join(f"{s}.jpg {s}.jpg\n" for s in TRAIN))
    (root / "test_pairs.txt").write_text("".join(f"{p}.jpg {c}.jpg\n" for p, c in TEST))
    for split, stems in (("train", TRAIN), ("test", [p for p, _ in TEST])):
        for seed, stem in enumerate(stems):
            folder = root / split
            save_jpeg(folder / "image" / f"{stem}.jpg", solid(H, W, (120, 110, 100), seed))
            save_jpeg(folder / "cloth" / f"{stem}.jpg", solid(H, W, cloth_colour(stem), seed))
            save_png(folder / "image-parse-v3" / f"{stem}.png", parse_map(), mode="P")
            (folder / "openpose_json").mkdir(exist_ok=True)
            (folder / "openpose_json" / f"{stem}_keypoints.json").write_text(json.dumps(openpose_json()))
            save_jpeg(folder / "image-densepose" / f"{stem}.jpg", solid(H, W, (30, 90, 200), seed))
    return root


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
    mask = vitonhd_agnostic_mask(labels, np.full((25, 2), np.nan))
    assert (mask[labels == 5] == 255).all() and (mask[labels == 13] == 0).all() and (mask[labels == 9] == 0).all()
