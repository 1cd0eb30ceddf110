"""The replication pipeline end to end, with a handful of steps (make replicate runs the real one)."""

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "replicate"))

from run import attention_entropy, guess_epe  # noqa: E402


def test_replicate_smoke(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "replicate" / "run.py"), "--out", str(tmp_path), "--smoke"],
                   check=True, capture_output=True)
    summary = json.loads((tmp_path / "results.json").read_text())
    runs = {"baseline", "no_leffa", "leffa", "leffa_per_head", "leffa_no_upsample", "leffa_all_timesteps",
            "leffa_lambda_x10"}
    assert set(summary["results"]) == runs
    for name in runs:
        result = summary["results"][name][0]
        assert 0 < result["epe_px"] < 100 and result["warp_l2"] > 0 and result["denoise"] > 0
        assert 0 < result["entropy"] <= 1 and result["spread_px"] >= 0
    assert summary["overfit_check"]["steps"] == 2 and "epe_px" in summary["overfit_check"]["after"]
    report = (tmp_path / "report.md").read_text()
    assert all(f"| {name} |" in report for name in runs)
    assert (tmp_path / "figures" / "flow_leffa.png").stat().st_size > 0


def test_guess_epe_is_zero_for_its_own_flow_and_measures_pixels():
    H, W = 5, 9
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    identity = torch.stack([xs, ys], -1)[None]
    assert guess_epe([{"flow": identity}], "identity") == 0
    # every pixel maps to the centre: the error is each pixel's distance to the centre in pixels
    centre = torch.zeros_like(identity)
    assert guess_epe([{"flow": centre}], "centre") == 0
    dist = torch.sqrt((torch.arange(W) - (W - 1) / 2)[None, :] ** 2 + (torch.arange(H) - (H - 1) / 2)[:, None] ** 2)
    assert math.isclose(guess_epe([{"flow": centre}], "identity"), dist.mean().item(), rel_tol=1e-5)
    # pixels outside the mask (NaN flow) are left out
    masked = identity.clone()
    masked[0, :, : W // 2] = float("nan")
    assert guess_epe([{"flow": masked}], "identity") == 0


def test_attention_entropy_is_one_for_uniform_and_near_zero_for_one_hot_attention():
    b, heads, h, w, d = 1, 2, 3, 4, 8
    valid = torch.ones(b, 2 * h, 2 * w, dtype=torch.bool)
    uniform = SimpleNamespace(query=torch.zeros(b, heads, h * w, d), key=torch.randn(b, heads, h * w, d), grid=(h, w))
    assert math.isclose(attention_entropy(uniform, 2.0, valid), 1.0, rel_tol=1e-6)
    keys = torch.nn.functional.normalize(torch.randn(b, heads, h * w, d), dim=-1)
    sharp = SimpleNamespace(query=keys * 100, key=keys, grid=(h, w))  # each query matches its own key
    assert attention_entropy(sharp, 2.0, valid) < 0.05
