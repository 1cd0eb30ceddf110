"""Prediction inputs from a plain folder."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from leffa.data import LeffaDataModule
from leffa.data.batch import to_model_batch
from leffa.errors import UserError


def write_folder(root, ids, pairs=None):
    rng = np.random.default_rng(0)
    for folder in ("person", "reference", "mask", "densepose"):
        (root / folder).mkdir(parents=True)
    for stem in ids:
        for folder in ("person", "reference", "densepose"):
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(root / folder / f"{stem}.png")
        mask = np.zeros((40, 30), np.uint8)
        mask[10:30, 5:25] = 255
        Image.fromarray(mask).save(root / "mask" / f"{stem}.png")
    if pairs:
        (root / "pairs.txt").write_text("".join(f"{a}.jpg {b}.jpg\n" for a, b in pairs))


def batches(root, batch_size=2):
    data = LeffaDataModule(predict_folder=str(root), height=32, width=24, val_batch_size=batch_size, num_workers=0)
    data.setup("predict")
    return [to_model_batch(b) for b in data.predict_dataloader()]


def test_folder_gives_contract_batches_paired_by_default(tmp_path):
    write_folder(tmp_path, ["a", "b", "c"])
    out = batches(tmp_path)
    assert [k for b in out for k in b["key"]] == ["a", "b", "c"]
    first = out[0]
    assert first["tgt"].shape == (2, 3, 32, 24) and first["mask"].shape == (2, 1, 32, 24)
    assert set(first["mask"].unique().tolist()) == {0.0, 1.0}
    assert first["tgt"].min() >= -1 and first["tgt"].max() <= 1


def test_pairs_file_makes_unpaired_samples(tmp_path):
    write_folder(tmp_path, ["a", "b"], pairs=[("a", "b"), ("b", "a")])
    out = batches(tmp_path)
    assert out[0]["key"] == ["a__b", "b__a"]
    # the reference of a__b is b's reference image
    single = LeffaDataModule(predict_folder=str(tmp_path), height=32, width=24, val_batch_size=1, num_workers=0)
    single.setup("predict")
    first = to_model_batch(next(iter(single.predict_dataloader())))
    ref_b = torch.from_numpy(np.asarray(Image.open(tmp_path / "reference" / "b.png").resize((24, 32), Image.BILINEAR)))
    assert (first["ref"][0].permute(1, 2, 0).add(1).mul(127.5) - ref_b.float()).abs().mean() < 8


def test_a_missing_file_names_it(tmp_path):
    write_folder(tmp_path, ["a"])
    (tmp_path / "densepose" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match="no densepose image for 'a'"):
        batches(tmp_path)


def test_malformed_pairs_file_names_file_and_line(tmp_path):
    write_folder(tmp_path, ["a", "b"])
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("a.jpg b.jpg\n\nb.jpg\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(pairs))}:3: expected 2 columns \(person reference\)"):
        batches(tmp_path)
    pairs.write_bytes(b"a.jpg b.jpg\n\xff\xfe b.jpg\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(pairs))}:2: not UTF-8 text"):
        batches(tmp_path)


def test_pairs_file_with_blank_lines_crlf_and_byte_order_mark(tmp_path):
    write_folder(tmp_path, ["a", "b"])
    (tmp_path / "pairs.txt").write_bytes("\ufeffa.jpg b.jpg\r\n\r\nb.jpg a.jpg\r\n".encode())
    assert batches(tmp_path)[0]["key"] == ["a__b", "b__a"]
