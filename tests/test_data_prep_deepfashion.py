"""DeepFashion pose-transfer converter: flat and nested image folders, keypoint or DensePose pose images."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from raw_datasets import decode, mean_colour, read_split, save_png
from raw_deepfashion import COLOURS, NAMES, TRAIN_PAIRS, H, W, make_deepfashion

from data_prep.__main__ import main
from data_prep.deepfashion import category_of, flatten_name
from leffa.errors import UserError


def convert(raw: Path, out: Path, *extra: str) -> dict:
    return main(["deepfashion", "--src", str(raw), "--out", str(out), *extra])


def test_pairs_keys_masks_and_keypoint_pose(tmp_path):
    raw = make_deepfashion(tmp_path / "fashion")
    out = tmp_path / "shards"
    manifest = convert(raw, out)
    train = read_split(out, "train")
    assert [k for k, _ in train] == [
        "deepfashion_train_paired_fashionWOMENDressesid0000000102_2side__fashionWOMENDressesid0000000101_1front",
        "deepfashion_train_paired_fashionWOMENDressesid0000000101_1front__fashionWOMENDressesid0000000102_2side",
        "deepfashion_train_paired_fashionMENTees_Tanksid0000000202_4full__fashionMENTees_Tanksid0000000201_1front",
    ]  # fmt: skip
    assert manifest["splits"]["test"]["num_written"] == 1
    for (source, target), (_, sample) in zip(TRAIN_PAIRS, train):
        d = decode(sample)
        meta = d["meta"]
        assert (meta["tgt_id"], meta["ref_id"]) == (Path(target).stem, Path(source).stem)
        assert meta["task"] == "pose" and meta["pairing"] == "paired" and meta["pose_source"] == "keypoints"
        assert np.abs(mean_colour(d["tgt"]) - COLOURS[target]).max() < 4
        assert np.abs(mean_colour(d["ref"]) - COLOURS[source]).max() < 4
        assert (d["mask"] == 255).all() and d["mask"].shape == (H, W)
        # keypoints scaled from 256x176 to 64x44: the nose (y 40, x 88) is drawn at (10, 22), a corner stays black
        assert d["densepose"][10, 22].max() > 200 and d["densepose"][0, 0].max() == 0
    assert decode(train[0][1])["meta"]["category"] == "WOMEN_Dresses"
    assert decode(train[2][1])["meta"]["category"] == "MEN_Tees_Tanks"


def test_densepose_folder_replaces_keypoints(tmp_path):
    raw = make_deepfashion(tmp_path / "fashion")
    densepose = tmp_path / "densepose"
    rendering = np.random.default_rng(0).integers(0, 255, size=(H, W, 3)).astype(np.uint8)
    for name in NAMES:
        save_png(densepose / f"{Path(name).stem}.png", rendering, mode="RGB")
    out = tmp_path / "shards"
    convert(raw, out, "--densepose", str(densepose), "--split", "train")
    for _, sample in read_split(out, "train"):
        d = decode(sample)
        assert d["meta"]["pose_source"] == "densepose" and np.array_equal(d["densepose"], rendering)


def test_missing_keypoints_skip_the_pair(tmp_path):
    raw = make_deepfashion(tmp_path / "fashion", annotate=(NAMES[0], NAMES[2], NAMES[3]))
    manifest = convert(raw, tmp_path / "shards", "--split", "train")
    entry = manifest["splits"]["train"]
    assert (entry["num_samples_in"], entry["num_written"], entry["num_skipped"]) == (3, 2, 1)
    (skipped,) = manifest["skipped"]
    assert NAMES[1] in skipped["reason"] and skipped["key"].startswith(
        "deepfashion_train_paired_fashionWOMENDressesid0000000102"
    )


def test_nested_layout_gives_the_same_samples(tmp_path):
    flat_out, nested_out = tmp_path / "flat", tmp_path / "nested"
    convert(make_deepfashion(tmp_path / "flat_raw"), flat_out)
    convert(make_deepfashion(tmp_path / "nested_raw", nested=True), nested_out)
    for split in ("train", "test"):
        flat, nested = read_split(flat_out, split), read_split(nested_out, split)
        assert [k for k, _ in flat] == [k for k, _ in nested] and len(flat) > 0
        assert flat == nested  # same images found through the flattening rule -> same bytes


def test_flattening_rule_and_category():
    assert (
        flatten_name(Path("WOMEN/Dresses/id_00002629/02_1_front.jpg")) == "fashionWOMENDressesid0000262902_1front.jpg"
    )
    assert (
        flatten_name(Path("MEN/Tees_Tanks/id_00000080/07_7_additional.jpg"))
        == "fashionMENTees_Tanksid0000008007_7additional.jpg"
    )
    assert category_of("fashionWOMENBlouses_Shirtsid0000262902_1front") == "WOMEN_Blouses_Shirts"


def test_missing_pairs_file_names_it(tmp_path):
    (tmp_path / "fashion").mkdir()
    with pytest.raises(FileNotFoundError, match="fasion-resize-pairs-train.csv"):
        convert(tmp_path / "fashion", tmp_path / "shards")


def test_malformed_csv_rows_name_file_and_line(tmp_path):
    raw = make_deepfashion(tmp_path / "fashion")
    out = tmp_path / "shards"
    pairs = raw / "fasion-resize-pairs-train.csv"
    rows = pairs.read_text().splitlines()
    pairs.write_text("\n".join(rows[:2] + [NAMES[0]] + rows[2:]) + "\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(pairs))}:3: expected 2 columns \(from,to\), got 1"):
        convert(raw, out)
    pairs.write_bytes(("\n".join(rows) + "\n").encode() + b"caf\xe9.jpg,x.jpg\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(pairs))}:5: not UTF-8 text"):
        convert(raw, out)
    pairs.write_text("\n".join(rows) + "\n")
    annotations = raw / "fasion-resize-annotation-test.csv"
    annotations.write_text(annotations.read_text() + "broken line without colons\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(annotations))}:\d+: expected 3 columns"):
        convert(raw, out)
    assert not out.exists()
