"""DeepFashion pose-transfer converter: flat and nested image folders, keypoint or DensePose pose images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from data_prep.__main__ import main
from leffa.errors import UserError
from data_prep.deepfashion import category_of, flatten_name
from raw_datasets import decode, mean_colour, read_split, save_jpeg, save_png, solid

H, W = 64, 44  # the 256x176 annotation frame / 4
NESTED = {  # flattened name -> nested path under img_highres/
    "fashionWOMENDressesid0000000101_1front.jpg": "WOMEN/Dresses/id_00000001/01_1_front.jpg",
    "fashionWOMENDressesid0000000102_2side.jpg": "WOMEN/Dresses/id_00000001/02_2_side.jpg",
    "fashionMENTees_Tanksid0000000201_1front.jpg": "MEN/Tees_Tanks/id_00000002/01_1_front.jpg",
    "fashionMENTees_Tanksid0000000202_4full.jpg": "MEN/Tees_Tanks/id_00000002/02_4_full.jpg",
}
NAMES = list(NESTED)
COLOURS = {name: (40 + 50 * i, 200 - 40 * i, 90 + 30 * i) for i, name in enumerate(NAMES)}
TRAIN_PAIRS = [(NAMES[0], NAMES[1]), (NAMES[1], NAMES[0]), (NAMES[2], NAMES[3])]  # (from, to)
TEST_PAIRS = [(NAMES[3], NAMES[2])]
# 18 joints in the 256x176 frame: a vertical stick figure; -1 marks missing joints
KEYPOINTS_Y = [40, 60, 62, 100, 140, 62, 100, 140, 130, 180, 230, 130, 180, 230, 35, 35, -1, -1]
KEYPOINTS_X = [88, 88, 60, 50, 45, 116, 126, 131, 70, 70, 70, 106, 106, 106, 80, 96, -1, -1]


def make_deepfashion(root: Path, nested: bool = False, annotate: tuple[str, ...] = tuple(NAMES)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, pairs in (("train", TRAIN_PAIRS), ("test", TEST_PAIRS)):
        rows = "".join(f"{a},{b}\n" for a, b in pairs)
        (root / f"fasion-resize-pairs-{split}.csv").write_text("from,to\n" + rows)
        names = sorted({n for pair in pairs for n in pair} & set(annotate))
        lines = "".join(f"{n}: {json.dumps(KEYPOINTS_Y)}: {json.dumps(KEYPOINTS_X)}\n" for n in names)
        (root / f"fasion-resize-annotation-{split}.csv").write_text("name:keypoints_y:keypoints_x\n" + lines)
        for seed, name in enumerate(sorted({n for pair in pairs for n in pair})):
            path = root / "img_highres" / NESTED[name] if nested else root / f"{split}_highres" / name
            save_jpeg(path, solid(H, W, COLOURS[name], seed))
    return root


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
    with pytest.raises(FileNotFoundError, match="fasion-resize-pairs-train.csv"):
        convert(tmp_path, tmp_path / "shards")


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
