"""DressCode converter on a tiny raw folder: per-category and root-level pair files, category masks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from data_prep.__main__ import main
from leffa.errors import UserError
from raw_datasets import decode, mean_colour, read_split, save_jpeg, save_png, solid

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


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return make_dresscode(tmp_path / "DressCode")


def convert(raw: Path, out: Path, *extra: str) -> dict:
    return main(["dresscode", "--src", str(raw), "--out", str(out), "--shard-size", "5", *extra])


def test_per_category_pairs_keys_and_references(raw, tmp_path):
    out = tmp_path / "shards"
    manifest = convert(raw, out)
    assert [k for k, _ in read_split(out, "train")] == [
        "dresscode_train_paired_upper_body_000001_0", "dresscode_train_paired_lower_body_013001_0",
        "dresscode_train_paired_dresses_022001_0"]  # fmt: skip
    test = read_split(out, "test")
    assert [k for k, _ in test][:4] == [
        "dresscode_test_paired_upper_body_048392_0", "dresscode_test_paired_upper_body_048393_0",
        "dresscode_test_unpaired_upper_body_048392_0__048393_1",
        "dresscode_test_unpaired_upper_body_048393_0__048392_1",
    ]  # fmt: skip
    assert manifest["splits"]["test"]["num_written"] == 12
    for key, sample in test:
        d = decode(sample)
        meta = d["meta"]
        assert meta["category"] in key and meta["dataset"] == "dresscode" and meta["task"] == "tryon"
        tgt_id, ref_id = meta["tgt_id"][:6], meta["ref_id"][:6]
        assert (tgt_id == ref_id) == (meta["pairing"] == "paired")
        assert np.abs(mean_colour(d["ref"]) - garment_colour(ref_id)).max() < 4
        # dense/<id>_5.png part index 2 rendered as 2 * 10 in all channels, exactly (PNG)
        expected = np.zeros((H, W), dtype=np.uint8)
        expected[17:38, 13:36] = 20
        assert np.array_equal(d["densepose"], np.repeat(expected[..., None], 3, axis=2))


def test_category_masks_follow_the_official_rule(raw, tmp_path):
    out = tmp_path / "shards"
    convert(raw, out, "--split", "train")
    masks = {decode(s)["meta"]["category"]: decode(s)["mask"] for _, s in read_split(out, "train")}
    upper, lower, dress = label_map("upper_body"), label_map("lower_body"), label_map("dresses")
    assert (masks["upper_body"][upper == 4] == 255).all()
    assert (masks["upper_body"][upper == 6] == 0).all()  # pants are kept for an upper garment
    assert (masks["lower_body"][lower == 6] == 255).all()
    for kept in (4, 14, 15):  # upper clothes and arms are kept for a lower garment
        assert (masks["lower_body"][lower == kept] == 0).all(), kept
    assert (masks["dresses"][dress == 7] == 255).all() and (masks["dresses"][dress == 12] == 255).all()
    for category, labels in (("upper_body", upper), ("lower_body", lower), ("dresses", dress)):
        mask = masks[category]
        assert (mask[labels == 2] == 0).all() and (mask[np.isin(labels, (9, 10))] == 0).all()  # hair, shoes
        assert (mask[6:14][labels[6:14] == 11] == 0).all()  # the face, above the shoulder line
    # neck: head pixels below shoulder line (y = 18) minus 20 * 64 / 512 = 15.5 px are repainted
    assert (masks["upper_body"][15:17, 21:28] == 255).all()
    assert (masks["lower_body"][15:17, 21:28] == 0).all()


def test_root_level_pair_files_are_preferred(raw, tmp_path):
    # three columns: person, garment, category index; only upper_body and dresses listed
    (raw / "train_pairs.txt").write_text("000001_0.jpg\t000001_1.jpg\t0\n022001_0.jpg\t022001_1.jpg\t2\n")
    (raw / "test_pairs_paired.txt").write_text("048393_0.jpg\t048393_1.jpg\t0\n")
    (raw / "test_pairs_unpaired.txt").write_text("052001_0.jpg\t052002_1.jpg\t2\n")
    out = tmp_path / "shards"
    convert(raw, out)
    assert [k for k, _ in read_split(out, "train")] == [
        "dresscode_train_paired_upper_body_000001_0", "dresscode_train_paired_dresses_022001_0"]  # fmt: skip
    test = read_split(out, "test")
    assert [k for k, _ in test] == [
        "dresscode_test_paired_upper_body_048393_0", "dresscode_test_unpaired_dresses_052001_0__052002_1"]  # fmt: skip
    assert decode(test[1][1])["meta"]["category"] == "dresses"


def test_category_selection_and_unknown_category(raw, tmp_path):
    out = tmp_path / "shards"
    convert(raw, out, "--categories", "lower_body", "--split", "test")
    assert {decode(s)["meta"]["category"] for _, s in read_split(out, "test")} == {"lower_body"}
    with pytest.raises(ValueError, match="valid: upper_body, lower_body, dresses"):
        convert(raw, out, "--categories", "shoes")


def test_optional_masks_and_densepose_folders(raw, tmp_path):
    stored = np.zeros((H, W), dtype=np.uint8)
    stored[10:30, 5:25] = 255
    for sample_id in IDS["upper_body"][1]:
        save_png(raw / "upper_body" / "agnostic_masks" / f"{sample_id}_0.png", stored, mode="L")
        save_jpeg(raw / "upper_body" / "image-densepose" / f"{sample_id}_0.jpg", solid(H, W, (200, 40, 90)))
    out = tmp_path / "shards"
    convert(raw, out, "--split", "test", "--categories", "upper_body,lower_body")
    for _, sample in read_split(out, "test"):
        d = decode(sample)
        if d["meta"]["category"] == "upper_body":
            assert d["meta"]["mask_source"] == "file" and np.array_equal(d["mask"], stored)
            assert np.abs(mean_colour(d["densepose"]) - (200, 40, 90)).max() < 4
        else:
            assert d["meta"]["mask_source"] == "rule" and d["densepose"].max() == 20


def test_missing_label_map_skips_only_that_sample(raw, tmp_path):
    (raw / "dresses" / "label_maps" / "052002_4.png").unlink()
    out = tmp_path / "shards"
    manifest = convert(raw, out, "--split", "test")
    entry = manifest["splits"]["test"]
    assert (entry["num_samples_in"], entry["num_written"], entry["num_skipped"]) == (12, 10, 2)
    reasons = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {
        "dresscode_test_paired_dresses_052002_0",
        "dresscode_test_unpaired_dresses_052002_0__052001_1",
    }
    assert all("052002_4.png" in r for r in reasons.values())


def test_malformed_root_level_pair_lines_name_file_and_line(raw, tmp_path):
    out = tmp_path / "shards"
    (raw / "test_pairs_paired.txt").write_text("048393_0.jpg\t048393_1.jpg\t0\n")
    (raw / "test_pairs_unpaired.txt").write_text("052001_0.jpg\t052002_1.jpg\t2\n")
    path = raw / "train_pairs.txt"
    path.write_text("000001_0.jpg\t000001_1.jpg\t0\n\n022001_0.jpg\t022001_1.jpg\t7\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:3: category index '7'; valid: 0, 1, 2"):
        convert(raw, out)
    path.write_text("000001_0.jpg\t000001_1.jpg\t0\n022001_0.jpg\t022001_1.jpg\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:2: expected 3 columns \(person garment category\)"):
        convert(raw, out)
    assert not out.exists()
