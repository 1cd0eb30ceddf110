"""`leffa eval` pairs predictions with ground truth by the target id of their key (real converter keys).

Predictions are named `<key>.png` as `leffa predict` writes them; ground-truth folders hold the
dataset's own names. Keys come from the converters run on the tiny raw datasets of the data_prep tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from raw_datasets import make_vitonhd
from raw_deepfashion import make_deepfashion
from raw_dresscode import make_dresscode

from data_prep.__main__ import build_parser
from data_prep.registry import get_converter
from leffa import evaluate as ev
from leffa.errors import UserError

REPO = Path(__file__).resolve().parents[1]
H, W = 64, 48


class MeanColour(torch.nn.Module):
    """Stand-in for Inception: (B, 3, 299, 299) -> the (B, 2) mean of two channels."""

    def forward(self, x):
        return x.mean((2, 3))[:, :2]


def converter_keys(dataset: str, src: Path | None, tmp_path: Path, split: str = "test") -> list:
    """(spec, key) of every sample of `split` as the converter lists it (reads pair files only)."""
    argv = [dataset, "--out", str(tmp_path / "unused")] + ([] if src is None else ["--src", str(src)])
    args = build_parser().parse_args(argv + (["--count", "3"] if dataset == "synthetic" else []))
    return [(spec, spec.key) for spec in get_converter(dataset).list_samples(args, split)]


def picture(seed: int) -> np.ndarray:
    """A smooth random RGB image, different for every seed."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 3, 3), dtype=np.uint8))
    return np.asarray(coarse.resize((W, H), Image.BICUBIC))


def save(folder: Path, name: str, image: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{name}.png")


def run(pred: Path, gt: Path, **kwargs) -> dict:
    torch.manual_seed(0)  # the random LPIPS trunk
    return ev.evaluate(pred, gt, inception=MeanColour(), lpips_backbone="random", batch_size=4, **kwargs)


def test_pose_transfer_prediction_is_scored_against_its_target_not_its_reference(tmp_path):
    keys = converter_keys("deepfashion", make_deepfashion(tmp_path / "fashion"), tmp_path, "train")
    names = sorted({Path(s.tgt_name).stem for s, _ in keys} | {Path(s.ref_name).stem for s, _ in keys})
    images = {name: picture(i) for i, name in enumerate(names)}
    for name, image in images.items():
        save(tmp_path / "gt", name, image)
    for spec, key in keys:  # a perfect prediction of every target
        save(tmp_path / "pred", key, images[Path(spec.tgt_name).stem])
    result = run(tmp_path / "pred", tmp_path / "gt", fid_ref=tmp_path / "gt")
    assert result["protocol"] == "pose_transfer" and result["num_images"]["pairs"] == len(keys) == 3
    assert result["metrics"]["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert result["metrics"]["lpips"] == pytest.approx(0.0, abs=1e-6)


def vitonhd_test_folders(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """gt/<person id>.png; pred/<key>.png for every test key: a person's unpaired garment id
    (00011_00) is also a person id, so the garment's owner has a ground-truth image."""
    keys = converter_keys("vitonhd", make_vitonhd(tmp_path / "VITON-HD"), tmp_path)
    people = sorted({Path(spec.person).stem for spec, _ in keys})
    assert {Path(spec.cloth).stem for spec, _ in keys} <= set(people)
    for i, person in enumerate(people):
        save(tmp_path / "gt", person, picture(i))
    for spec, key in keys:
        save(tmp_path / "pred", key, picture(people.index(Path(spec.person).stem)))
    return tmp_path / "pred", tmp_path / "gt", [key for _, key in keys]


def test_paired_refuses_unpaired_keys_naming_one_and_the_count(tmp_path):
    pred, gt, keys = vitonhd_test_folders(tmp_path)
    assert "vitonhd_test_unpaired_00010_00__00011_00" in keys
    refusal = r"2 of 4 predictions .*unpaired.*vitonhd_test_unpaired_00010_00__00011_00\.png"
    with pytest.raises(UserError, match=refusal):
        run(pred, gt, paired=True)
    for key in keys:  # the unpaired set alone, as --paired would get it by mistake
        if "_paired_" in key:
            (pred / f"{key}.png").unlink()
    with pytest.raises(UserError, match=r"2 of 2 predictions .*unpaired"):
        run(pred, gt, paired=True)
    # unpaired protocol: FID/KID of the whole prediction folder, no pairs needed
    assert run(pred, gt)["num_images"] == {"pred": 2, "gt": 2, "fid_ref": 2, "pairs": 0}


def test_paired_keys_of_every_try_on_converter_pair_with_the_dataset_names(tmp_path):
    cases = {
        "vitonhd": converter_keys("vitonhd", make_vitonhd(tmp_path / "VITON-HD"), tmp_path),
        "dresscode": converter_keys("dresscode", make_dresscode(tmp_path / "DressCode"), tmp_path),
        "synthetic": converter_keys("synthetic", None, tmp_path),
    }
    for dataset, keys in cases.items():
        paired = [(spec, key) for spec, key in keys if spec.pairing == "paired"]
        for i, (spec, key) in enumerate(paired):
            own_name = f"{spec.index:06d}" if dataset == "synthetic" else Path(spec.person).stem
            save(tmp_path / dataset / "gt", own_name, picture(i))
            save(tmp_path / dataset / "pred", key, picture(i))
        result = run(tmp_path / dataset / "pred", tmp_path / dataset / "gt", paired=True)
        assert result["num_images"]["pairs"] == len(paired) >= 2, dataset
        assert result["metrics"]["ssim"] == pytest.approx(1.0, abs=1e-5), dataset


def test_plain_stems_and_folder_keys(tmp_path):
    """Predictions named like their ground truth; `<person>__<reference>` from a predict folder."""
    for i, name in enumerate(["p_1", "p_2", "r_9"]):
        save(tmp_path / "gt", name, picture(i))
    save(tmp_path / "plain", "p_1", picture(0))
    save(tmp_path / "plain", "p_2", picture(1))
    save(tmp_path / "plain", "r_9", picture(2))
    assert run(tmp_path / "plain", tmp_path / "gt", paired=True)["metrics"]["ssim"] == pytest.approx(1.0, abs=1e-5)
    save(tmp_path / "folder", "p_1__r_9", picture(0))  # pose transfer from a folder: scored against p_1
    save(tmp_path / "folder", "p_2__p_1", picture(1))
    result = run(tmp_path / "folder", tmp_path / "gt", fid_ref=tmp_path / "gt")
    assert result["num_images"]["pairs"] == 2 and result["metrics"]["ssim"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UserError, match=r"2 of 2 predictions .*unpaired.*p_1__r_9\.png"):
        run(tmp_path / "folder", tmp_path / "gt", paired=True)


def test_ill_formed_prediction_name_is_one_error_naming_it(tmp_path):
    save(tmp_path / "gt", "00010_00", picture(0))
    save(tmp_path / "pred", "vitonhd_test_paired_00010_00___x", picture(0))
    with pytest.raises(UserError, match=r"vitonhd_test_paired_00010_00___x\.png"):
        run(tmp_path / "pred", tmp_path / "gt", paired=True)


def leffa_eval(*args: str) -> subprocess.CompletedProcess:
    """`leffa eval ...` as a user runs it (the console script of this interpreter's environment)."""
    script = Path(sys.executable).with_name("leffa")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("LEFFA_DEBUG", None)
    return subprocess.run([str(script), "eval", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_cli_empty_folder_and_non_image_png_are_one_line(tmp_path):
    save(tmp_path / "gt", "00010_00", picture(0))
    (tmp_path / "empty").mkdir()
    done = leffa_eval("--pred", str(tmp_path / "empty"), "--gt", str(tmp_path / "gt"), "--device", "cpu")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(tmp_path / "empty") in last

    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "vitonhd_test_paired_00010_00.png").write_text("not an image\n")
    for pred, gt, bad in (("pred", "gt", "pred"), ("gt", "pred", "pred")):  # in either folder
        done = leffa_eval("--pred", str(tmp_path / pred), "--gt", str(tmp_path / gt), "--device", "cpu")
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and str(tmp_path / bad / "vitonhd_test_paired_00010_00.png") in last


def test_truncated_image_is_one_error_naming_it(tmp_path):
    """The header reads (so the size check passes); the body fails only when decoded."""
    for i, name in enumerate(["00010_00", "00011_00"]):
        save(tmp_path / "gt", name, picture(i))
        save(tmp_path / "pred", f"vitonhd_test_paired_{name}", picture(i))
    broken = tmp_path / "pred" / "vitonhd_test_paired_00011_00.png"
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(UserError, match=f"{broken}.* not a readable image"):
        run(tmp_path / "pred", tmp_path / "gt", paired=True)


def test_masks_from_converter_shards_by_key_and_by_target_id(tmp_path):
    """--masks-from-shards SHARDS@test on the VITON-HD converter's shards: each prediction's mask is the
    mask.png of its key's sample, or (a prediction named like its ground truth) of its target id's."""
    import io
    import tarfile

    from data_prep.__main__ import main as data_prep_main
    from leffa.data.shards import resolve_shards

    data_prep_main(["vitonhd", "--src", str(make_vitonhd(tmp_path / "VITON-HD")), "--out", str(tmp_path / "shards")])
    samples = {}  # paired key -> {"tgt.jpg": bytes, "mask.png": bytes}
    for shard in resolve_shards(f"{tmp_path / 'shards'}@test", ("test",)):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, suffix = member.name.partition(".")
                if "_paired_" in key and suffix in ("tgt.jpg", "mask.png"):
                    samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    assert len(samples) == 2
    (tmp_path / "masks").mkdir()
    for i, (key, sample) in enumerate(sorted(samples.items())):
        target = key.split("_paired_")[1]
        person = np.asarray(Image.open(io.BytesIO(sample["tgt.jpg"])).convert("RGB"))
        save(tmp_path / "gt", target, person)
        prediction = person.copy()
        prediction[:, : 10 + 5 * i] = 0  # errors inside and outside the mask
        save(tmp_path / "pred", key if i == 0 else target, prediction)  # by key; by the ground truth's name
        (tmp_path / "masks" / f"{target}.png").write_bytes(sample["mask.png"])
    from_shards = run(tmp_path / "pred", tmp_path / "gt", paired=True, masks_from_shards=f"{tmp_path / 'shards'}@test")
    from_folder = run(tmp_path / "pred", tmp_path / "gt", paired=True, masks=tmp_path / "masks")
    assert from_shards["counts"]["evaluated"]["masked_pairs"] == 2
    for name in ("psnr_mask", "ssim_mask", "lpips_mask"):
        assert from_shards["metrics"][name] == pytest.approx(from_folder["metrics"][name], rel=1e-12)
    assert from_shards["metrics"]["psnr_mask"] != pytest.approx(from_shards["metrics"]["psnr"], rel=1e-3)
