"""Tests for leffa.metrics and leffa.evaluate: each metric against a direct computation.

Tiny images, a seeded random CNN in place of Inception and a random LPIPS trunk; every
download route of clean-fid, lpips and torchvision is made to raise.
"""

import json
import socket
import urllib.request
import warnings

import cleanfid.downloads_helper
import cleanfid.features
import cleanfid.fid
import cleanfid.inception_torchscript
import lpips
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from scipy import linalg
from torchmetrics.functional.image import structural_similarity_index_measure

from leffa import evaluate as ev
from leffa import metrics
from leffa.errors import UserError

N_IMAGES, WIDTH, HEIGHT = 12, 64, 48


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to reach the network or a download helper fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(cleanfid.downloads_helper, "check_download_inception", refuse)
    monkeypatch.setattr(cleanfid.inception_torchscript, "check_download_inception", refuse)
    monkeypatch.setattr(cleanfid.features, "build_feature_extractor", refuse)
    monkeypatch.setattr(cleanfid.fid, "build_feature_extractor", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    monkeypatch.delenv(metrics.LPIPS_ENV, raising=False)


class TinyFeatures(torch.nn.Module):
    """Seeded random CNN: (B, 3, 299, 299) floats in [0, 255] -> (B, 8) features (2 x 2 x 2)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 2, 3, stride=2), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
        )

    def forward(self, x):
        # Inception's input normalisation; x10 gives O(1) features, as Inception's are
        return 10 * self.net((x - 128) / 128)


def smooth_images(seed, size=(WIDTH, HEIGHT)):
    """N_IMAGES smooth random RGB uint8 images (H, W, 3): upsampled noise plus fine texture."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(N_IMAGES):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        base = np.asarray(coarse.resize(size, Image.BICUBIC), dtype=np.float64)
        texture = rng.normal(0, 8, base.shape)
        images.append(np.clip(base + texture, 0, 255).astype(np.uint8))
    return images


def degrade(image, seed):
    """Shift by 3 pixels and add noise: a worse prediction."""
    rng = np.random.default_rng(seed)
    shifted = np.roll(image, 3, axis=1).astype(np.float64)
    return np.clip(shifted + rng.normal(0, 25, image.shape), 0, 255).astype(np.uint8)


def write(folder, images, names):
    folder.mkdir()
    for image, name in zip(images, names):
        Image.fromarray(image).save(folder / f"{name}.png")
    return folder


IDS = [f"{i:05d}_00" for i in range(N_IMAGES)]
KEYS = [f"vitonhd_test_paired_{i}" for i in IDS]  # predictions named by sample key (leffa.schema)


@pytest.fixture
def folders(tmp_path):
    """gt/ by dataset id; same/ identical copies and bad/ degraded ones, named by sample key."""
    gt = smooth_images(0)
    return {
        "gt": write(tmp_path / "gt", gt, IDS),
        "same": write(tmp_path / "same", gt, KEYS),
        "bad": write(tmp_path / "bad", [degrade(g, i) for i, g in enumerate(gt)], KEYS),
        "big_gt": write(tmp_path / "big_gt", smooth_images(0, (2 * WIDTH, 2 * HEIGHT)), IDS),
    }


def run(pred, gt, **kwargs):
    torch.manual_seed(0)  # the random LPIPS trunk
    kwargs.setdefault("lpips_backbone", "random")
    return ev.evaluate(pred, gt, inception=TinyFeatures(), batch_size=5, **kwargs)


# ----------------------------------------------------------- direct computations (oracle)


def load_pair(pred_path, gt_path):
    """Prediction and LANCZOS-resized ground truth as uint8 arrays, as VtonEval prepares them."""
    pred = Image.open(pred_path).convert("RGB")
    gt = Image.open(gt_path).convert("RGB").resize(pred.size, Image.LANCZOS)
    return np.asarray(pred), np.asarray(gt)


def direct_features(arrays, model):
    """clean-fid 'clean' preprocessing written out: per-channel float bicubic to 299x299."""
    batch = []
    for a in arrays:
        channels = [
            np.asarray(Image.fromarray(a[:, :, c].astype(np.float32)).resize((299, 299), Image.BICUBIC))
            for c in range(3)
        ]
        batch.append(np.clip(np.stack(channels), 0, 255))
    with torch.no_grad():
        return model(torch.tensor(np.stack(batch), dtype=torch.float32)).double().numpy()


def direct_fid(f1, f2):
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def direct_kid(f1, f2):
    """Unbiased polynomial-kernel MMD^2 (Binkowski et al., 2018), k(x, y) = (x.y / d + 1)^3."""
    m, d = len(f1), f1.shape[1]
    kxx, kyy, kxy = [(a @ b.T / d + 1) ** 3 for a, b in ((f1, f1), (f2, f2), (f1, f2))]
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def direct_lpips(pred, gt, state, lin):
    """LPIPS v0.1 on an AlexNet trunk (Zhang et al., 2018) written out from a torchvision state dict."""
    features = torchvision.models.alexnet().features
    features.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    x0, y0 = ((2 * t - 1 - shift) / scale for t in (pred, gt))  # [0, 1] -> [-1, 1] -> ScalingLayer
    total = 0.0
    for layer, relu_index in enumerate([1, 4, 7, 9, 11]):  # the five ReLU outputs LPIPS taps
        x, y = features[: relu_index + 1](x0), features[: relu_index + 1](y0)
        nx = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        weight = lin[f"lin{layer}.model.1.weight"]  # (1, C, 1, 1)
        total = total + ((nx - ny) ** 2 * weight).sum(1).mean((1, 2))
    return total


def to_tensor(array):
    return torch.tensor(array, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0


# ----------------------------------------------------------------------------- tests


def test_identical_folders_score_perfect(folders):
    result = run(folders["same"], folders["gt"], paired=True)
    assert result["protocol"] == "tryon_paired"
    assert result["num_images"] == {"pred": 12, "gt": 12, "fid_ref": 12, "pairs": 12}
    m = result["metrics"]
    assert m["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert m["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert m["psnr"] == float("inf")  # MSE 0
    assert abs(m["fid"]) < 1e-4


def test_degraded_predictions_score_worse(folders):
    good = run(folders["same"], folders["gt"], paired=True)["metrics"]
    bad = run(folders["bad"], folders["gt"], paired=True)["metrics"]
    assert bad["ssim"] < good["ssim"] - 0.1
    assert bad["lpips"] > good["lpips"] + 0.01
    assert bad["fid"] > good["fid"] + 5e-3
    assert bad["kid_x1000"] > good["kid_x1000"]


def test_fid_kid_equal_direct_computation_with_lanczos_resize(folders):
    """Ground truth twice the prediction size: resized with LANCZOS, then clean-fid's 299 resize."""
    result = run(folders["bad"], folders["big_gt"])  # unpaired: FID and KID only
    assert set(result["metrics"]) == {"fid", "kid_x1000"}
    arrays = [load_pair(folders["bad"] / f"{k}.png", folders["big_gt"] / f"{i}.png") for k, i in zip(KEYS, IDS)]
    model = TinyFeatures()
    pred_feats = direct_features([p for p, _ in arrays], model)
    gt_feats = direct_features([g for _, g in arrays], model)
    assert result["metrics"]["fid"] == pytest.approx(direct_fid(pred_feats, gt_feats), rel=1e-3)
    assert result["metrics"]["kid_x1000"] == pytest.approx(1000 * direct_kid(gt_feats, pred_feats), rel=1e-3)


def test_fid_equals_cleanfid_compute_fid(folders):
    ours = run(folders["bad"], folders["gt"])["metrics"]["fid"]
    theirs = cleanfid.fid.compute_fid(
        str(folders["bad"]), str(folders["gt"]), mode="clean", custom_feat_extractor=TinyFeatures(),
        num_workers=0, batch_size=5, device=torch.device("cpu"), verbose=False,
    )
    assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.slow
def test_ssim_and_lpips_equal_direct_computation(folders, tmp_path):
    torch.manual_seed(1)
    trunk = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), trunk)
    result = run(folders["bad"], folders["big_gt"], paired=False, fid_ref=folders["gt"], lpips_backbone=trunk)
    assert result["protocol"] == "pose_transfer"
    assert set(result["metrics"]) == {"fid", "psnr", "ssim", "lpips"}

    state = torch.load(trunk, weights_only=True)
    lin = torch.load(f"{lpips.__path__[0]}/weights/v0.1/alex.pth", map_location="cpu", weights_only=True)
    ssims, lpipses, psnrs = [], [], []
    for key, gt_id in zip(KEYS, IDS):
        arrays = load_pair(folders["bad"] / f"{key}.png", folders["big_gt"] / f"{gt_id}.png")
        mse = np.mean((arrays[0] / 255.0 - arrays[1] / 255.0) ** 2)
        psnrs.append(10 * np.log10(1 / mse))
        pred, gt = (to_tensor(a) for a in arrays)
        ssims.append(structural_similarity_index_measure(pred, gt, data_range=1.0))
        with torch.no_grad():
            lpipses.append(direct_lpips(pred, gt, state, lin))
    assert result["metrics"]["ssim"] == pytest.approx(float(torch.stack(ssims).mean()), rel=1e-5)
    assert result["metrics"]["lpips"] == pytest.approx(float(torch.cat(lpipses).mean()), rel=1e-4)
    assert result["metrics"]["psnr"] == pytest.approx(np.mean(psnrs), rel=1e-6)


def test_missing_counterpart_is_clear_error(folders):
    (folders["gt"] / f"{IDS[3]}.png").unlink()
    with pytest.raises(UserError, match=f"1 of 12 predictions have no ground truth.*{KEYS[3]}"):
        run(folders["same"], folders["gt"], paired=True)
    (folders["same"] / f"{KEYS[3]}.png").unlink()
    (folders["same"] / f"{KEYS[5]}.png").unlink()  # paired try-on: every gt needs a prediction
    with pytest.raises(UserError, match=f"1 ground-truth images .* no prediction: {IDS[5]}"):
        run(folders["same"], folders["gt"], paired=True)


def test_missing_weights_name_the_file_and_variable(folders, tmp_path, monkeypatch):
    with pytest.raises(UserError, match=f"no Inception weights.*{metrics.INCEPTION_ENV}"):
        ev.evaluate(folders["same"], folders["gt"])
    monkeypatch.setenv(metrics.INCEPTION_ENV, str(tmp_path / "nowhere" / metrics.INCEPTION_FILE))
    with pytest.raises(UserError, match=f"not found at .*nowhere.*{metrics.INCEPTION_ENV}"):
        ev.evaluate(folders["same"], folders["gt"])
    with pytest.raises(UserError, match=f"alexnet-owt.*{metrics.LPIPS_ENV}"):
        metrics.load_lpips("alex", None)
    monkeypatch.setenv(metrics.LPIPS_ENV, str(tmp_path / "vgg.pth"))
    with pytest.raises(UserError, match="vgg.pth.*vgg16-397923af"):
        metrics.load_lpips("vgg")


def test_inception_loads_from_a_local_torchscript_file(tmp_path, monkeypatch):
    """A stand-in with clean-fid's interface (a `layers` submodule, 2048 features) goes
    through clean-fid's own InceptionV3W loader with downloads off."""

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, 2048)

        def forward(self, x):
            return self.head(x.mean((2, 3)))

    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x, return_features: bool = False):
            return self.layers(x)

    with warnings.catch_warnings():  # torch.jit.script is deprecated but writes clean-fid's format
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(StandIn()).save(str(tmp_path / metrics.INCEPTION_FILE))
    monkeypatch.setenv(metrics.INCEPTION_ENV, str(tmp_path))  # a folder holding the file also works
    for model in (metrics.load_inception(tmp_path / metrics.INCEPTION_FILE), metrics.load_inception()):
        assert model(torch.zeros(2, 3, 299, 299)).shape == (2, 2048)


def test_cli_prints_table_and_writes_json(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(metrics, "load_inception", lambda path, device: TinyFeatures())
    out = tmp_path / "res" / "results.json"
    torch.manual_seed(0)
    result = ev.eval_main([
        "--pred", str(folders["bad"]), "--gt", str(folders["gt"]), "--paired",
        "--lpips-backbone", "random", "--batch-size", "4", "--device", "cpu", "--out", str(out),
    ])
    assert json.loads(out.read_text()) == result
    assert set(result["metrics"]) == {"fid", "kid_x1000", "psnr", "ssim", "lpips"}
    printed = capsys.readouterr().out
    assert "KID is x 1000" in printed and "kid_x1000" in printed and "random backbone" in printed
    # unpaired needs no LPIPS trunk at all
    assert set(ev.eval_main(["--pred", str(folders["bad"]), "--gt", str(folders["gt"])])["metrics"]) == {"fid", "kid_x1000"}
