"""`leffa eval` beyond the paper's four numbers: PSNR, the paired metrics inside a mask, DressCode per
category and pooled, --exclude, and the protocol the results file records.

Each number is checked against a computation written out here: PSNR from the MSE by hand, SSIM from
a hand-written Gaussian SSIM map (numpy), LPIPS' spatial map assembled from the network's layers,
per-category FID against a run on that category's files alone. A 2-number stand-in replaces
Inception, LPIPS has a random trunk; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import tarfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from leffa import evaluate as ev
from leffa import metrics
from leffa.errors import UserError

W, H = 64, 48


class MeanColour(torch.nn.Module):
    """Stand-in for Inception: (B, 3, 299, 299) -> the (B, 2) mean of two channels."""

    def forward(self, x):
        return x.mean((2, 3))[:, :2]


@pytest.fixture(autouse=True)
def no_weights_from_anywhere(monkeypatch):
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    monkeypatch.delenv(metrics.LPIPS_ENV, raising=False)


@pytest.fixture
def lpips_model(monkeypatch):
    """One LPIPS alex on a random trunk, the one evaluate uses (so the test can take it apart)."""
    torch.manual_seed(0)
    model = metrics.load_lpips("alex", "random")
    monkeypatch.setattr(metrics, "load_lpips", lambda net, backbone, device: model)
    return model


def picture(seed: int, size=(W, H)) -> np.ndarray:
    """A smooth random RGB image with some fine texture, different for every seed."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    base = np.asarray(coarse.resize(size, Image.BICUBIC), dtype=np.float64)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def worse(image: np.ndarray, seed: int) -> np.ndarray:
    """The image shifted by 2 pixels with noise: a prediction with errors everywhere."""
    rng = np.random.default_rng(1000 + seed)
    return np.clip(np.roll(image, 2, axis=1) + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)


def save(folder: Path, name: str, image: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{name}.png")
    return folder / f"{name}.png"


def run(pred: Path, gt: Path, **kwargs) -> dict:
    kwargs.setdefault("paired", True)
    return ev.evaluate(pred, gt, inception=MeanColour(), lpips_backbone="random", batch_size=3, **kwargs)


# ------------------------------------------------------------------ references, written out


def as_float(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0


def psnr(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> float:
    """10 log10(1 / MSE) of [0, 1] images (H, W, 3); with a 0/1 (H, W) mask, the MSE over its pixels."""
    mask = np.ones(x.shape[:2]) if mask is None else mask
    mse = (((x - y) ** 2) * mask[..., None]).sum() / (3 * mask.sum())
    return float(10 * np.log10(1 / mse))


def ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The SSIM map (H, W, 3) of Wang et al. (2004): Gaussian window 11x11, sigma 1.5, K1 0.01,
    K2 0.03, data range 1, each image reflect-padded by 5 pixels (numpy 'reflect': edge not repeated)."""
    offsets = np.arange(11) - 5
    g = np.exp(-(offsets**2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()

    def blur(a):  # (H, W, 3) -> local Gaussian mean, same size
        padded = np.pad(a, ((5, 5), (5, 5), (0, 0)), mode="reflect")
        return np.einsum("hwcij,ij->hwc", sliding_window_view(padded, (11, 11), axis=(0, 1)), window)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def lpips_map(model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """LPIPS v0.1's spatial map (H, W) assembled from the network's parts: per tapped layer the
    squared difference of channel-normalised features weighted by the linear layer, upsampled
    bilinearly (align_corners False) to the image size, summed over the layers."""
    tensors = [torch.tensor(a, dtype=torch.float32).permute(2, 0, 1)[None] for a in (x, y)]
    with torch.no_grad():
        fx, fy = (model.net(model.scaling_layer(2 * t - 1)) for t in tensors)
        total = torch.zeros(1, 1, *x.shape[:2])
        for layer, (a, b) in enumerate(zip(fx, fy)):
            na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            conv = [m for m in model.lins[layer].model if isinstance(m, torch.nn.Conv2d)][0]
            distance = ((na - nb) ** 2 * conv.weight).sum(1, keepdim=True)
            total += F.interpolate(distance, size=x.shape[:2], mode="bilinear", align_corners=False)
    return total[0, 0].double().numpy()


def masked_mean(values: np.ndarray, mask: np.ndarray) -> float:
    """Mean of an (H, W) or (H, W, C) map over the mask's pixels (and channels)."""
    values = values if values.ndim == 3 else values[..., None]
    return float((values * mask[..., None]).sum() / (mask.sum() * values.shape[2]))


# ------------------------------------------------------------------------------ masks

IDS = [f"{i:05d}_00" for i in range(4)]
KEYS = [f"vitonhd_test_paired_{i}" for i in IDS]


def blob(i: int) -> np.ndarray:
    """A 0/1 (H, W) mask per image: a rectangle and a disc, different for each image."""
    rows, cols = np.mgrid[:H, :W]
    mask = (rows >= 6 + 3 * i) & (rows < 40) & (cols >= 10) & (cols < 30 + 5 * i)
    mask |= (rows - 20) ** 2 + (cols - 48 + 4 * i) ** 2 < 60
    return mask.astype(np.float64)


@pytest.fixture
def masked_folders(tmp_path):
    """gt/<id>.png, pred/<key>.png (worse copies), masks/ at the predictions' size (half named by
    key, half by id) and masks2x/ at twice the size, as 8-bit grey 0/255."""
    for i, (key, gt_id) in enumerate(zip(KEYS, IDS)):
        save(tmp_path / "gt", gt_id, picture(i))
        save(tmp_path / "pred", key, worse(picture(i), i))
        grey = (255 * blob(i)).astype(np.uint8)
        save(tmp_path / "masks", (key, gt_id)[i % 2], grey)
        save(tmp_path / "masks2x", gt_id, np.kron(grey, np.ones((2, 2), dtype=np.uint8)))
    return tmp_path


def test_masked_psnr_ssim_lpips_equal_the_written_out_computations(masked_folders, lpips_model):
    result = run(masked_folders / "pred", masked_folders / "gt", masks=masked_folders / "masks")
    m = result["metrics"]
    assert list(m) == ["fid", "kid_x1000", "psnr", "ssim", "lpips", "psnr_mask", "ssim_mask", "lpips_mask"]
    reference = {name: [] for name in ("psnr", "ssim", "psnr_mask", "ssim_mask", "lpips_mask")}
    for i, (key, gt_id) in enumerate(zip(KEYS, IDS)):
        x, y = as_float(masked_folders / "pred" / f"{key}.png"), as_float(masked_folders / "gt" / f"{gt_id}.png")
        mask, s = blob(i), ssim_map(x, y)
        reference["psnr"].append(psnr(x, y))
        reference["ssim"].append(s.mean())
        reference["psnr_mask"].append(psnr(x, y, mask))
        reference["ssim_mask"].append(masked_mean(s, mask))
        reference["lpips_mask"].append(masked_mean(lpips_map(lpips_model, x, y), mask))
    for name, values in reference.items():
        # SSIM: torchmetrics computes in float32 (its variances E[x^2] - mu^2 lose ~1e-5), the reference in float64
        tolerance = dict(abs=5e-5) if name.startswith("ssim") else dict(rel=1e-6)
        assert m[name] == pytest.approx(np.mean(values), **tolerance), name
    # the masks differ from the whole image: inside them the numbers are not the whole-image ones
    assert abs(m["psnr_mask"] - m["psnr"]) > 0.01 and abs(m["ssim_mask"] - m["ssim"]) > 1e-3
    assert result["counts"]["evaluated"]["masked_pairs"] == 4 and result["counts"]["empty_masks"] == 0

    # masks at twice the size are resized (nearest) onto the same pixels
    twice = run(masked_folders / "pred", masked_folders / "gt", masks=masked_folders / "masks2x")["metrics"]
    for name in ("psnr_mask", "ssim_mask", "lpips_mask"):
        assert twice[name] == pytest.approx(m[name], rel=1e-9)
    assert result["settings"]["native_sizes_wh"]["masks"] == {f"{W}x{H}": 4}


def test_all_white_masks_give_the_whole_image_psnr_and_ssim_and_empty_ones_are_left_out(
        masked_folders, lpips_model, capsys):
    white = masked_folders / "white"
    for i, gt_id in enumerate(IDS):
        save(white, gt_id, np.full((H, W), 0 if i == 2 else 255, dtype=np.uint8))  # #2 is empty
    result = run(masked_folders / "pred", masked_folders / "gt", masks=white)
    m = result["metrics"]
    x, y = (as_float(masked_folders / folder / f"{name}.png") for folder, name in (("pred", KEYS[2]), ("gt", IDS[2])))
    # the mean over the three non-empty masks = (4 * whole mean - pair 2) / 3
    assert m["psnr_mask"] == pytest.approx((4 * m["psnr"] - psnr(x, y)) / 3, rel=1e-6)
    assert m["ssim_mask"] == pytest.approx((4 * m["ssim"] - ssim_map(x, y).mean()) / 3, rel=1e-5)
    assert result["counts"]["empty_masks"] == 1 and result["counts"]["evaluated"]["masked_pairs"] == 3
    assert "1 of 4 masks are empty" in capsys.readouterr().err


def test_masks_from_shards_equal_masks_from_a_folder(masked_folders, lpips_model):
    shards = masked_folders / "shards"
    shards.mkdir()
    with tarfile.open(shards / "test-000000.tar", "w") as tar:
        for i, key in enumerate(KEYS):
            mask = (masked_folders / "masks2x" / f"{IDS[i]}.png").read_bytes()  # native size, as shards hold them
            for suffix, payload in (("json", b"{}"), ("mask.png", mask)):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    from_shards = run(masked_folders / "pred", masked_folders / "gt", masks_from_shards=str(shards / "*.tar"))
    from_folder = run(masked_folders / "pred", masked_folders / "gt", masks=masked_folders / "masks")
    for name in ("psnr_mask", "ssim_mask", "lpips_mask"):
        assert from_shards["metrics"][name] == pytest.approx(from_folder["metrics"][name], rel=1e-9)
    assert from_shards["settings"]["masks"] == f"shards {shards / '*.tar'}"


def test_mask_refusals_are_one_line(masked_folders):
    (masked_folders / "masks" / f"{KEYS[0]}.png").unlink()
    with pytest.raises(UserError, match=rf"--masks .*1 of 4 predictions have no mask.*{KEYS[0]}"):
        run(masked_folders / "pred", masked_folders / "gt", masks=masked_folders / "masks")
    square = masked_folders / "square"
    for gt_id in IDS:
        save(square, gt_id, np.full((H, H), 255, dtype=np.uint8))
    with pytest.raises(UserError, match=rf"4 of 4 masks have another aspect ratio.*{H}x{H}.*--allow-aspect-change"):
        run(masked_folders / "pred", masked_folders / "gt", masks=square)
    with pytest.raises(UserError, match="add --paired"):
        run(masked_folders / "pred", masked_folders / "gt", paired=False, masks=square)


# ------------------------------------------------------------------------- DressCode


DRESSCODE = {"upper_body": "0000", "lower_body": "0135", "dresses": "0200"}


def dresscode_folders(root: Path, pairing: str = "paired", per_category: int = 4) -> tuple[Path, Path]:
    """gt/<id>.png and pred/<DressCode key>.png, `per_category` samples of each category; the
    categories differ in colour statistics so that their FIDs differ."""
    for c, (category, prefix) in enumerate(DRESSCODE.items()):
        for i in range(per_category):
            target = f"{prefix}{i:02d}_0"
            image = picture(10 * c + i)
            image = np.clip(image.astype(int) + 40 * (c - 1), 0, 255).astype(np.uint8)
            save(root / "gt", target, image)
            reference = "" if pairing == "paired" else f"__{prefix}{(i + 1) % per_category:02d}_1"
            save(root / "pred", f"dresscode_test_{pairing}_{category}_{target}{reference}", worse(image, 10 * c + i))
    return root / "pred", root / "gt"


def only(folder: Path, word: str, into: Path) -> Path:
    """A copy of the files of ``folder`` whose name holds ``word``."""
    into.mkdir(parents=True)
    for path in folder.iterdir():
        if word in path.name:
            (into / path.name).write_bytes(path.read_bytes())
    return into


def gt_of(gt: Path, category: str, into: Path) -> Path:
    """The ground truth of one category's predictions alone."""
    into.mkdir(parents=True)
    for path in gt.iterdir():
        if path.stem.startswith(DRESSCODE[category]):
            (into / path.name).write_bytes(path.read_bytes())
    return into


def test_dresscode_per_category_pooled_and_mean_in_one_run(tmp_path, lpips_model):
    pred, gt = dresscode_folders(tmp_path / "dc")
    result = run(pred, gt)
    assert list(result["per_category"]) == ["upper_body", "lower_body", "dresses"]
    for category, values in result["per_category"].items():
        alone = run(only(pred, category, tmp_path / category / "pred"), gt_of(gt, category, tmp_path / category / "gt"))
        for name, value in alone["metrics"].items():
            assert values[name] == pytest.approx(value, rel=1e-6), (category, name)
        assert result["counts"]["per_category"][category] == {"pred": 4, "gt": 4, "pairs": 4}
    for name, value in result["category_mean"].items():
        assert value == pytest.approx(np.mean([v[name] for v in result["per_category"].values()]), rel=1e-12)
    # pooled = all images at once: equal categories make SSIM's pooled mean the mean of the categories,
    # FID over the union is another number than the mean of the categories' FIDs
    assert result["metrics"]["ssim"] == pytest.approx(result["category_mean"]["ssim"], rel=1e-9)
    assert abs(result["metrics"]["fid"] - result["category_mean"]["fid"]) > 1e-3
    assert result["counts"]["gt_without_category"] == 0
    assert "Tab. 2" in result["settings"]["pooling"]
    table = ev.format_table(result)
    assert all(row in table for row in ("upper_body", "lower_body", "dresses", "pooled", "mean"))


def test_dresscode_unpaired_per_category_fid_uses_the_category_ground_truth(tmp_path):
    pred, gt = dresscode_folders(tmp_path / "dc", pairing="unpaired", per_category=3)
    save(gt, "099999_0", picture(99))  # a ground-truth image no prediction names: pooled only
    result = run(pred, gt, paired=False)
    assert set(result["metrics"]) == {"fid", "kid_x1000"}
    lower_pred = only(pred, "lower_body", tmp_path / "lower" / "pred")
    lower = run(lower_pred, gt_of(gt, "lower_body", tmp_path / "lower" / "gt"), paired=False)
    assert result["per_category"]["lower_body"]["fid"] == pytest.approx(lower["metrics"]["fid"], rel=1e-6)
    assert result["per_category"]["lower_body"]["kid_x1000"] == pytest.approx(lower["metrics"]["kid_x1000"], rel=1e-6)
    assert result["counts"]["per_category"]["dresses"] == {"pred": 3, "gt": 3, "pairs": 0}
    assert result["counts"]["gt_without_category"] == 1 and result["num_images"]["gt"] == 10


def test_predictions_partly_without_a_category_are_refused(tmp_path):
    pred, gt = dresscode_folders(tmp_path / "dc", per_category=2)
    (pred / "dresscode_test_paired_dresses_020000_0.png").rename(pred / "020000_0.png")
    with pytest.raises(UserError, match=r"1 of 6 predictions .*DressCode category \(e.g. 020000_0.png\)"):
        run(pred, gt)


# --------------------------------------------------------------------------- --exclude


def test_exclude_leaves_out_the_listed_images_and_counts_them(tmp_path, lpips_model):
    ids = [f"{i:05d}_00" for i in range(7)]
    for i, gt_id in enumerate(ids):
        save(tmp_path / "gt", gt_id, picture(i))
        save(tmp_path / "pred", f"vitonhd_test_paired_{gt_id}", worse(picture(i), i))
    listing = tmp_path / "leaked.txt"
    listing.write_text(
        "# duplicated in train\n"
        f"test/image/{ids[1]}.jpg\n"  # a dataset path with another extension
        f"{ids[4]}\n\n"  # a bare id
        f"vitonhd_test_paired_{ids[6]}\n"  # a key
        "99999_00.jpg\n"  # names nothing here
    )
    result = run(tmp_path / "pred", tmp_path / "gt", exclude=listing)
    assert result["counts"]["excluded"] == {
        "file": str(listing), "listed": 4, "pred": 3, "gt": 3, "listed_unmatched": 1,
        "unmatched_examples": ["99999_00"],
    }
    assert result["num_images"] == {"pred": 4, "gt": 4, "fid_ref": 4, "pairs": 4}
    assert result["counts"]["found"] == {"pred": 7, "gt": 7}
    # the same numbers as folders without those images
    for i in (1, 4, 6):
        (tmp_path / "pred" / f"vitonhd_test_paired_{ids[i]}.png").unlink()
        (tmp_path / "gt" / f"{ids[i]}.png").unlink()
    assert result["metrics"] == pytest.approx(run(tmp_path / "pred", tmp_path / "gt")["metrics"], rel=1e-9)
    assert "left out by --exclude: 3 predictions, 3 ground-truth images" in ev.format_table(result)

    everything = tmp_path / "all.txt"
    everything.write_text("\n".join(ids[:1] + [i for i in ids[2:]]) + "\n")
    with pytest.raises(UserError, match="leaves out all 4 images"):
        run(tmp_path / "pred", tmp_path / "gt", exclude=everything)


# ------------------------------------------------------------------- the protocol record


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # dresses: 2 images left, a rank-1 covariance
def test_results_file_records_the_protocol(tmp_path, monkeypatch, lpips_model, capsys):
    """Setting, sizes, implementations with versions, weights (paths) and counts, in the --out file."""
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / metrics.INCEPTION_FILE).write_bytes(b"")  # the loader is tests/test_metrics.py's; here the record
    monkeypatch.setattr(metrics, "load_inception", lambda path, device: MeanColour())
    pred, gt = dresscode_folders(tmp_path / "dc", per_category=3)
    for path in gt.iterdir():  # ground truth at twice the size: resized, and recorded
        Image.open(path).resize((2 * W, 2 * H)).save(path)
    masks = tmp_path / "masks"
    for path in gt.iterdir():
        save(masks, path.stem, (255 * blob(1)).astype(np.uint8))
    (tmp_path / "leaked.txt").write_text("020002_0.jpg\n")
    out = tmp_path / "results" / "eval.json"
    ev.eval_main([
        "--pred", str(pred), "--gt", str(gt), "--paired", "--inception", str(weights), "--lpips-backbone", "random",
        "--lpips-net", "alex", "--device", "cpu", "--batch-size", "4", "--masks", str(masks),
        "--exclude", str(tmp_path / "leaked.txt"), "--out", str(out),
    ])
    result = json.loads(out.read_text())
    settings, counts = result["settings"], result["counts"]
    assert result["protocol"] == "tryon_paired" and settings["setting"] == "paired" and settings["task"] == "tryon"
    assert settings["image_size_wh"] == [W, H]
    assert settings["native_sizes_wh"] == {"gt": {f"{2 * W}x{2 * H}": 8}, "fid_ref": None, "masks": {f"{W}x{H}": 8}}
    versions = {name: metadata.version(name) for name in ("clean-fid", "torchmetrics", "lpips", "torch")}
    assert settings["libraries"]["clean-fid"] == versions["clean-fid"]
    assert settings["implementations"] == {
        "fid": f"clean-fid {versions['clean-fid']} fid_from_feats",
        "kid": f"clean-fid {versions['clean-fid']} kernel_distance x 1000",
        "psnr": f"torch {versions['torch']} (per image)",
        "ssim": f"torchmetrics {versions['torchmetrics']}",
        "lpips": f"lpips {versions['lpips']} v0.1, net alex",
    }
    assert settings["feature_extractor"].startswith(f"clean-fid InceptionV3W ({metrics.INCEPTION_FILE}")
    assert settings["weights"]["inception"] == str(weights / metrics.INCEPTION_FILE)
    assert settings["weights"]["lpips_backbone"] == "random"
    linear = settings["weights"]["lpips_linear"]
    assert Path(linear).is_file() and linear.endswith("alex.pth")
    assert settings["masks"] == str(masks) and settings["exclude"] == str(tmp_path / "leaked.txt")
    assert counts["excluded"]["pred"] == 1 and counts["excluded"]["gt"] == 1 and counts["excluded"]["listed"] == 1
    assert counts["evaluated"] == {"pred": 8, "gt": 8, "fid_ref": 8, "pairs": 8, "masked_pairs": 8}
    assert counts["per_category"] == {
        "upper_body": {"pred": 3, "gt": 3, "pairs": 3},
        "lower_body": {"pred": 3, "gt": 3, "pairs": 3},
        "dresses": {"pred": 2, "gt": 2, "pairs": 2},
    }
    assert set(result["per_category"]["dresses"]) == set(result["metrics"]) == set(result["category_mean"])
    printed = capsys.readouterr().out
    assert "psnr_mask" in printed and "left out by --exclude: 1 predictions" in printed
