"""`python -m data_prep folder`: shards from a plain folder of one's own photos, and the same
folder read by `--data.predict_folder`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from raw_datasets import (
    decode,
    mean_colour,
    read_manifest,
    read_split,
    save_jpeg,
    save_png,
    solid,
    truncate,
)

from data_prep.__main__ import main
from leffa.errors import UserError

REPO = Path(__file__).resolve().parents[1]
H, W = 40, 32
PERSONS = ("p1", "p2", "p3")
GARMENTS = ("g1", "g2", "p3")  # p3's own garment is named like the person (a paired test line)
TRAIN_PAIRS = (("p1", "g1"), ("p2", "g2"))
TEST_PAIRS = (("p3", "p3"), ("p3", "g1"))
MEMBERS = {"tgt.jpg", "ref.jpg", "mask.png", "densepose.png", "json"}


def garment_colour(stem: str) -> tuple[int, int, int]:
    return {"g1": (200, 30, 30), "g2": (30, 200, 30), "p3": (30, 30, 200)}[stem]


def make_folder(root: Path, garment_dir: str = "garment", pose: str = "densepose") -> Path:
    """The plain layout: person/ (jpg), garment/ (png), mask/ (png), densepose/ (jpeg) or keypoints/ (json)."""
    for person in PERSONS:
        save_jpeg(root / "person" / f"{person}.jpg", solid(H, W, (120, 110, 100)))
        mask = np.zeros((H, W), np.uint8)
        mask[10:30, 8:24] = 255
        save_png(root / "mask" / f"{person}.png", mask, mode="L")
        if pose == "densepose":
            save_jpeg(root / "densepose" / f"{person}.jpeg", solid(H, W, (30, 90, 200)))
        else:
            # OpenPose BODY_25: neck (1) to right shoulder (2) along row 10, confidence 1; others absent
            points = np.zeros((25, 3))
            points[1], points[2] = (16, 10, 1), (6, 10, 1)
            (root / "keypoints").mkdir(exist_ok=True)
            (root / "keypoints" / f"{person}.json").write_text(
                json.dumps({"people": [{"pose_keypoints_2d": points.ravel().tolist()}]})
            )
    for garment in GARMENTS:
        save_png(root / garment_dir / f"{garment}.png", solid(H, W, garment_colour(garment)))
    # ids with or without an image extension, as pair files of the datasets write them
    (root / "train_pairs.txt").write_text("p1.jpg g1.png\np2 g2\n")
    (root / "test_pairs.txt").write_text("".join(f"{a} {b}\n" for a, b in TEST_PAIRS))
    return root


def convert(src: Path, out: Path, *extra: str) -> dict:
    return main(["folder", "--src", str(src), "--out", str(out), "--shard-size", "1", *extra])


def test_counts_keys_schema_and_manifest(tmp_path):
    src, out = make_folder(tmp_path / "my_data"), tmp_path / "shards"
    manifest = convert(src, out)
    train, test = read_split(out, "train"), read_split(out, "test")
    assert [k for k, _ in train] == ["folder_train_paired_p1__g1", "folder_train_paired_p2__g2"]
    assert [k for k, _ in test] == ["folder_test_paired_p3", "folder_test_unpaired_p3__g1"]
    for key, sample in train + test:
        assert set(sample) == MEMBERS, key
        d = decode(sample)
        meta = d["meta"]
        assert {k: meta[k] for k in ("dataset", "task", "pose_source", "height", "width")} == {
            "dataset": "folder", "task": "tryon", "pose_source": "densepose", "height": H, "width": W}  # fmt: skip
        assert meta["split"] == key.split("_")[1] and meta["tgt_id"] == key.split("_")[3].split("__")[0]
        assert np.abs(mean_colour(d["ref"]) - garment_colour(meta["ref_id"])).max() < 4
        assert np.abs(mean_colour(d["densepose"]) - (30, 90, 200)).max() < 4
        assert d["mask"][20, 16] == 255 and d["mask"][0, 0] == 0 and set(np.unique(d["mask"])) == {0, 255}
    assert [decode(s)["meta"]["pairing"] for _, s in test] == ["paired", "unpaired"]
    assert manifest["dataset"] == "folder" and manifest["source"] == str(src.resolve())
    assert manifest["splits"]["train"]["pairings"] == ["paired"]
    assert manifest["splits"]["test"]["pairings"] == ["paired", "unpaired"]
    for split in ("train", "test"):
        entry = manifest["splits"][split]
        assert (entry["num_samples_in"], entry["num_written"], entry["num_skipped"]) == (2, 2, 0)
        assert [s["num_samples"] for s in entry["shards"]] == [1, 1]


def test_reference_folder_is_accepted_for_garment(tmp_path):
    src, out = make_folder(tmp_path / "my_data", garment_dir="reference"), tmp_path / "shards"
    convert(src, out, "--split", "train")
    assert [k for k, _ in read_split(out, "train")] == ["folder_train_paired_p1__g1", "folder_train_paired_p2__g2"]
    (src / "garment").mkdir()
    with pytest.raises(UserError, match="both garment/ and reference/"):
        convert(src, tmp_path / "other")


def test_keypoints_instead_of_densepose(tmp_path):
    src, out = make_folder(tmp_path / "my_data", pose="keypoints"), tmp_path / "shards"
    convert(src, out, "--split", "train", "--pose-source", "keypoints")
    for _, sample in read_split(out, "train"):
        d = decode(sample)
        assert d["meta"]["pose_source"] == "keypoints"
        # the neck-right shoulder limb (COCO-18 1-2, first colour) is drawn along row 10
        assert d["densepose"][10, 11].tolist() == [255, 0, 0] and d["densepose"][30, 16].tolist() == [0, 0, 0]
    with pytest.raises(FileNotFoundError, match="densepose"):  # without the flag DensePose is required
        convert(src, tmp_path / "other", "--split", "train")


@pytest.mark.slow  # over 10 s on 2 cores: make test runs it, make test-fast does not
def test_missing_masks_and_densepose_are_one_error_before_writing(tmp_path):
    src, out = make_folder(tmp_path / "my_data"), tmp_path / "shards"
    for name in ("mask/p1.png", "densepose/p1.jpeg", "person/p2.jpg", "mask/p2.png", "densepose/p2.jpeg"):
        (src / name).unlink()
    command = [sys.executable, "-m", "data_prep", "folder", "--src", str(src), "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "5 files missing" in lines[0] and "and 2 more" in lines[0]
    assert "mask/p1.*, densepose/p1.*, person/p2.*" in lines[0] and "train_pairs.txt" in lines[0]
    assert not out.exists()


def test_missing_test_split_and_path_like_names_are_one_line_errors(tmp_path):
    src = make_folder(tmp_path / "my_data")
    (src / "test_pairs.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"test_pairs.txt.*--split train"):
        convert(src, tmp_path / "out")
    (src / "train_pairs.txt").write_text("p1 g1\n../p2 g2\n")
    with pytest.raises(UserError, match=r"train_pairs.txt:2: '../p2' is not a plain file name"):
        convert(src, tmp_path / "out", "--split", "train")
    assert not (tmp_path / "out").exists()


def test_corrupt_image_is_skipped_and_reported(tmp_path):
    src, out = make_folder(tmp_path / "my_data"), tmp_path / "shards"
    truncate(src / "person" / "p2.jpg")
    manifest = convert(src, out, "--split", "train")
    entry = manifest["splits"]["train"]
    assert (entry["num_samples_in"], entry["num_written"], entry["num_skipped"]) == (2, 1, 1)
    (skipped,) = read_manifest(out)["skipped"]
    assert skipped["key"] == "folder_train_paired_p2__g2" and "p2.jpg" in skipped["reason"]


def test_the_same_folder_serves_prediction(tmp_path):
    from leffa.data import LeffaDataModule
    from leffa.data.batch import to_model_batch

    src = make_folder(tmp_path / "my_data")
    data = LeffaDataModule(predict_folder=str(src), height=32, width=24, val_batch_size=2, num_workers=0)
    data.setup("predict")
    (batch,) = [to_model_batch(b) for b in data.predict_dataloader()]
    assert batch["key"] == ["p3", "p3__g1"]  # test_pairs.txt, garments from garment/
    assert batch["tgt"].shape == (2, 3, 32, 24)
    (src / "reference").mkdir()
    with pytest.raises(UserError, match="both reference/ and garment/"):
        LeffaDataModule(predict_folder=str(src), height=32, width=24, num_workers=0).predict_dataloader()


def test_two_files_of_one_id_are_one_error_naming_both_in_the_converter_and_the_predict_folder(tmp_path):
    # One indexer (leffa.folder_index) for both readers; the predict folder used to take p3.png silently.
    from leffa.data.predict_folder import FolderPairs

    src = make_folder(tmp_path / "my_data")
    save_png(src / "mask" / "p3.png.jpg", np.zeros((H, W), np.uint8), mode="L")  # id p3.png: no clash
    save_png(src / "person" / "p3.png", solid(H, W, (1, 2, 3)))
    with pytest.raises(UserError, match=r"person/p3\.jpg and p3\.png have the same id; keep one of them"):
        convert(src, tmp_path / "shards")
    with pytest.raises(UserError, match=r"person/p3\.jpg and p3\.png have the same id; keep one of them"):
        FolderPairs(src, H, W)
    assert not (tmp_path / "shards").exists()


def test_pair_names_and_keys_are_read_alike_by_the_converter_and_the_predict_folder(tmp_path):
    # An id is the name without its image extension (`p.v2.jpg` and `p.v2` are the id `p.v2`), and a
    # key holds it as the converter's keys do (SampleKey: '.' -> '_').
    from leffa.data.predict_folder import FolderPairs

    src = make_folder(tmp_path / "my_data")
    for folder, name in (("person", "p3.jpg"), ("mask", "p3.png"), ("densepose", "p3.jpeg")):
        (src / folder / name).rename(src / folder / name.replace("p3", "p.v2"))
    (src / "test_pairs.txt").write_text("p.v2.jpg g1\np.v2 p3.png\n")
    manifest = convert(src, tmp_path / "shards", "--split", "test")
    assert manifest["splits"]["test"]["num_written"] == 2
    keys = [key for key, _ in read_split(tmp_path / "shards", "test")]
    assert keys == ["folder_test_unpaired_p_v2__g1", "folder_test_unpaired_p_v2__p3"]
    folder = FolderPairs(src, H, W)
    assert folder.pairs == [("p.v2", "g1"), ("p.v2", "p3")]
    assert [folder[i]["key"] for i in range(2)] == ["p_v2__g1", "p_v2__p3"]
    assert folder[0]["meta"] == {"tgt_id": "p.v2", "ref_id": "g1"}
