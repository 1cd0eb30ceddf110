"""The fidelity study (``replicate/fidelity.py``): its criterion on known numbers, and the pipeline end
to end with --quick, its scale rows against straightforward computations written here
(``make fidelity`` runs the real study)."""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

ROOT = Path(__file__).resolve().parents[1]

from replicate.criterion import FIDELITY_SEED_SDS, fidelity_verdict  # noqa: E402

MATRIX = [("dual_unet", "smooth"), ("dual_unet", "periodic"), ("concat_unet", "smooth")]
SCALE_ROWS = ["flat", "paste", "gt_warp_vae", "vae_recon"]


def test_fidelity_verdict_on_known_numbers():
    # gain 1.0 dB, larger seed SD 0.1: beyond 3 SDs
    assert fidelity_verdict([20.0, 20.1, 19.9], [21.0, 21.1, 20.9], "smooth")["verdict"] == "effect shown"
    assert fidelity_verdict([20.0, 20.1, 19.9], [21.0, 21.1, 20.9], "periodic")["verdict"].startswith("control fails")
    # gain 0.2 dB with a seed SD of 0.1: not beyond 3 SDs
    small = fidelity_verdict([20.0, 20.1, 19.9], [20.2, 20.3, 20.1], "smooth")
    assert small["verdict"] == "effect not shown" and math.isclose(small["gain_db"], 0.2)
    assert fidelity_verdict([20.0, 20.1, 19.9], [20.2, 20.3, 20.1], "periodic")["verdict"].startswith("control holds")
    # worse with the loss is never an effect; the larger arm's SD counts
    assert not fidelity_verdict([20.0, 20.1, 19.9], [19.0, 19.1, 18.9], "smooth")["beyond_noise"]
    assert math.isclose(fidelity_verdict([20.0, 20.0, 20.0], [21.0, 22.0, 23.0], "smooth")["seed_sd"], 1.0)
    assert FIDELITY_SEED_SDS == 3.0


def _masked_psnr(image, target, mask):
    """The masked PSNR of 8-bit images, written out: quantise as a PNG does, mean squared error over
    the mask's pixels and 3 channels."""
    def eight_bit(x):
        return ((x + 1) / 2 * 255 + 0.5).clamp(0, 255).floor() / 255
    squared = (eight_bit(image) - eight_bit(target)) ** 2 * mask
    return (-10 * torch.log10(squared.sum((1, 2, 3)) / (3 * mask.sum((1, 2, 3))))).tolist()


def _vae_roundtrip(vae, image):
    with torch.no_grad():
        return vae.decode(vae.encode(image).latent_dist.mode()).sample.clamp(-1, 1)


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity")
    work = out / "work"
    subprocess.run([sys.executable, str(ROOT / "replicate" / "fidelity.py"), "--out", str(out), "--work", str(work),
                    "--quick", "--processes", "1"], check=True, capture_output=True)
    return out, work, json.loads((out / "results.json").read_text())


@pytest.mark.slow  # they share one --quick run of replicate/fidelity.py (about 40 s on 2 cores)
def test_quick_study_has_every_run_row_verdict_and_grid(quick_study):
    out, _, summary = quick_study
    assert summary["settings"]["runs_done"] == summary["settings"]["runs_total"] == 12
    assert summary["settings"]["demo_steps"] == 1500 and summary["settings"]["steps"] == 2
    for arch, family in MATRIX:
        arms = summary["runs"][arch][family]
        assert [r["seed"] for r in arms["no_leffa"]] == [r["seed"] for r in arms["leffa"]] == [0, 1]
        for r in arms["no_leffa"] + arms["leffa"]:
            assert set(r["epe_px"]) == {"4x3", "8x6"} and len(r["psnr_mask_per_sample"]) == 4
            assert 0 < r["ssim_mask"] < 1 and r["psnr_mask"] > 0
        v = summary["verdicts"][arch][family]
        no_leffa = [r["psnr_mask"] for r in arms["no_leffa"]]
        leffa = [r["psnr_mask"] for r in arms["leffa"]]
        assert math.isclose(v["gain_db"], statistics.mean(leffa) - statistics.mean(no_leffa), abs_tol=1e-9)
        assert (out / summary["grids"][f"{arch}_{family}"]).is_file()
    report = (out / "report.md").read_text()
    assert report.index("## Criterion") < report.index("## Results") < report.index("## Verdicts")
    for row in SCALE_ROWS + ["no_leffa", "leffa"]:
        assert report.count(f"| {row} |") == 3, row  # one per architecture and family
    assert report.count("![") == 3
    # the hand-written reading and the 8x6 finding follow the numbers (replicate/notes.md)
    assert report.index("## Verdicts") < report.index("## The 8x6 question") and "## Fidelity" in report


@pytest.mark.slow  # they share one --quick run of replicate/fidelity.py
def test_scale_rows_match_a_straightforward_computation(quick_study):
    from replicate.jobs import held_out

    _, work, summary = quick_study
    vae = AutoencoderKL.from_pretrained(ROOT / "assets" / "tiny_vae_synthetic").eval()
    for family in ("smooth", "periodic"):
        batches = held_out(work / "work" / "shards_64x48" / family, (64, 48), 8)
        ref, tgt, mask = (torch.cat([b[k] for b in batches]) for k in ("ref", "tgt", "mask"))
        flow = torch.cat([b["flow"] for b in batches]).nan_to_num(0.0)
        inside = mask > 0.5
        warped = F.grid_sample(ref, flow, mode="bilinear", align_corners=True)
        candidates = {
            "flat": ref.mean(dim=(2, 3), keepdim=True).expand_as(ref),
            "paste": ref,
            "gt_warp_vae": _vae_roundtrip(vae, torch.where(inside, warped, tgt)),
            "vae_recon": _vae_roundtrip(vae, tgt),
        }
        rows = summary["scale"][family]["scores"]
        for row, candidate in candidates.items():
            expected = _masked_psnr(torch.where(inside, candidate, tgt), tgt, mask)
            got = rows[row]["psnr_mask_per_sample"]
            assert got == pytest.approx(expected, abs=1e-3), (family, row)
            assert rows[row]["psnr_mask"] == pytest.approx(statistics.mean(expected), abs=1e-3)
        # on this set the target inside the mask is the reference warped by the ground truth, so the
        # two VAE rows agree closely
        assert abs(rows["gt_warp_vae"]["psnr_mask"] - rows["vae_recon"]["psnr_mask"]) < 0.5, family
        if family == "smooth":  # far above a flat fill (on periodic the tiny VAE blurs the period: below it)
            assert rows["vae_recon"]["psnr_mask"] > rows["flat"]["psnr_mask"] + 1.0


def test_bad_arguments_are_user_errors():
    from leffa.errors import UserError
    from replicate.fidelity import parse

    for args, message in [(["--steps", "0"], "--steps must be at least 1, got 0"),
                          (["--eval-samples", "0"], "--eval-samples must be at least 1, got 0"),
                          (["--seeds", "1", "1"], "--seeds: each seed once, got [1, 1]")]:
        with pytest.raises(UserError) as error:
            parse(args)
        assert str(error.value) == message


@pytest.mark.slow  # a subprocess start-up: over 1.2 s on 2 cores
def test_a_user_error_of_the_script_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "replicate" / "fidelity.py"), "--out", str(tmp_path),
                             "--report-only"], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: --report-only: no {tmp_path / 'results.json'}; run without "
                                                  "--report-only first"]
