"""DressCode converter on a tiny raw folder: per-category and root-level pair files, category masks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from raw_datasets import decode, mean_colour, read_split, save_jpeg, save_png, solid
from raw_dresscode import IDS, H, W, garment_colour, label_map, make_dresscode

from data_prep.__main__ import main
from leffa.errors import UserError


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
