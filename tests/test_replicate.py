"""The replication: step 0's measures on known cases, and the pipeline end to end with --quick
(``make replicate`` runs the real one)."""

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from replicate.identifiability import (  # noqa: E402
    cell_average,
    centre_flow,
    end_point_error,
    free_query_fit,
    gap_closed,
    least_squares_floor,
)
from replicate.measure import attention_entropy, guess_epe  # noqa: E402

FAMILIES = ["periodic", "ramp", "smooth", "prints", "mixed"]


def _bilinear_flow(grid, size, seed=0):
    """A flow that is exactly the align_corners=True upsampling of random grid values, NaN outside a disc."""
    values = torch.rand(1, *grid, 2, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8
    flow = F.interpolate(values.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=True)
    flow = flow.permute(0, 2, 3, 1).clone()
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size[0]), torch.linspace(-1, 1, size[1]), indexing="ij")
    flow[0][xs ** 2 + ys ** 2 > 0.8] = float("nan")
    return values, flow


def test_least_squares_floor_recovers_a_flow_the_grid_can_hold_and_beats_the_cell_average():
    for grid in [(4, 3), (8, 6)]:
        _, gt = _bilinear_flow(grid, (64, 48))
        floor = end_point_error(least_squares_floor(gt, grid), gt)
        average = end_point_error(cell_average(gt, grid), gt)
        assert floor < 1e-3, (grid, floor)
        assert average > 0.3, (grid, average)  # cells centred half a cell in from the token positions
        assert end_point_error(centre_flow(gt, grid), gt) > average


def test_least_squares_floor_leaves_tokens_without_masked_pixels_at_the_centre():
    gt = torch.full((1, 16, 12, 2), float("nan"))
    gt[0, :4, :3] = 0.5  # only the top-left corner is defined
    floor = least_squares_floor(gt, (4, 3))
    assert torch.isfinite(floor).all()
    assert floor[0, 3, 2].abs().max() < 1e-6  # the far corner token touches no masked pixel


def test_gap_closed_is_the_fraction_of_the_way_from_the_start_to_the_floor():
    assert gap_closed(16.0, 16.0, 0.0) == 0
    assert gap_closed(16.0, 8.0, 0.0) == 0.5
    assert gap_closed(16.0, 1.0, 1.0) == 1
    assert gap_closed(16.0, 18.0, 0.0) < 0


def _held_out(tmp_path, family, count=4):
    from data_prep.__main__ import main as data_prep_main
    from replicate.jobs import held_out

    folder = tmp_path / family
    data_prep_main(["synthetic", "--out", str(folder), "--count", str(count), "--split", "test", "--height", "64",
                    "--width", "48", "--seed", "0", "--texture", family])
    return held_out(folder, (64, 48), count)[0]


def test_free_queries_find_the_flow_on_ramp_references_and_not_on_periodic_ones(tmp_path):
    grid, closed = (8, 6), {}
    for family in ("ramp", "periodic"):
        batch = _held_out(tmp_path, family)
        gt = batch["flow"]
        fit, losses = free_query_fit(batch, grid, steps=200, lr=1.0)
        assert losses[-1] < losses[0]  # on both the warp loss falls ...
        closed[family] = gap_closed(end_point_error(centre_flow(gt, grid), gt), end_point_error(fit, gt),
                                    end_point_error(least_squares_floor(gt, grid), gt))
    # ... but only a reference whose colour names the position leads the flow to the ground truth
    assert closed["ramp"] > 0.5 and closed["periodic"] < 0.2, closed


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("replicate")
    subprocess.run([sys.executable, str(ROOT / "replicate" / "run.py"), "--out", str(out), "--quick"],
                   check=True, capture_output=True)
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow  # they share one --quick run of replicate/run.py (about 2 minutes)
def test_quick_run_has_step_zero_and_the_runs_of_every_family(quick_run):
    out, summary = quick_run
    grids = ["4x3", "8x6"]
    assert list(summary["identifiability"]) == FAMILIES
    for family, measures in summary["identifiability"].items():
        assert list(measures) == [f"{g} at 64x48" for g in grids]
        for m in measures.values():
            # the least-squares floor is below the cell average, which is below the centre guess
            assert m["floor_epe_px"] < m["cell_average_epe_px"] < m["centre_epe_px"]
            assert math.isfinite(m["gap_closed"]) and m["fit_warp_l2"] < m["centre_warp_l2"]
    assert list(summary["results"]) == ["dual_unet", "concat_unet"]
    assert list(summary["results"]["dual_unet"]) == FAMILIES
    # the second architecture: both controls and the garment-like smooth family, no ablations
    assert list(summary["results"]["concat_unet"]) == ["periodic", "ramp", "smooth"]
    for arch, families in summary["results"].items():
        for family, runs in families.items():
            expected = {"baseline", "no_leffa", "leffa"}
            if family == "smooth" and arch == "dual_unet":
                expected |= {"leffa_per_head", "leffa_no_upsample", "leffa_all_timesteps"}
                assert list(runs["leffa"]) == ["2", "3"]  # the short and the long continuation
            assert set(runs) == expected
            centre = summary["scale"][family]["centre_epe_px"]
            for name, lengths in runs.items():
                for seeds in lengths.values():
                    assert len(seeds) == (1 if name == "baseline" else 2)
                    for r in seeds:
                        assert list(r["by_grid"]) == grids
                        # a model of a few steps attends almost uniformly: its flow sits near the centre guess
                        assert all(abs(r["by_grid"][g]["epe_px"] - centre) < 2.0 for g in grids)
                        assert all(0 < r["by_grid"][g]["entropy"] <= 1 for g in grids) and r["denoise"] > 0


@pytest.mark.slow  # they share one --quick run of replicate/run.py (about 2 minutes)
def test_quick_run_has_a_verdict_per_family_and_grid_and_the_report(quick_run):
    out, summary = quick_run
    table = summary["verdicts"]["2"]
    assert set(table["dual_unet"]) == set(FAMILIES) and set(table["concat_unet"]) == {"periodic", "ramp", "smooth"}
    assert set(summary["verdicts"]["3"]) == {"dual_unet"} and set(summary["verdicts"]["3"]["dual_unet"]) == {"smooth"}
    for arch, families in table.items():
        for family, grids in families.items():
            assert set(grids) == {"4x3", "8x6"}
            for grid, v in grids.items():
                valid = summary["identifiability"][family][f"{grid} at 64x48"]["gap_closed"] >= 0.5
                assert v["checks"]["valid_test"] == valid
                assert v["verdict"].startswith("effect" if valid else "not a valid test")
    report = (out / "report.md").read_text()
    # the criterion is stated before the results
    assert report.index("## Step 0") < report.index("## Criterion") < report.index("## Results")
    assert all(f"| dual_unet | {family} | 4x3 |" in report for family in FAMILIES)
    assert "not continued" not in report
    assert "| concat_unet | smooth | 4x3 |" in report
    for prefix in FAMILIES + ["concat_unet_periodic", "concat_unet_ramp", "concat_unet_smooth"]:
        for run in ("baseline", "no_leffa", "leffa"):
            assert (out / "figures" / f"{prefix}_{run}.png").stat().st_size > 0


@pytest.mark.slow  # they share one --quick run of replicate/run.py (about 2 minutes)
def test_report_only_rewrites_the_report_from_results_json(quick_run, tmp_path):
    out, summary = quick_run
    summary = json.loads(json.dumps(summary))
    del summary["results"]["dual_unet"]["mixed"]  # as if run with --continue-families leaving mixed out
    (tmp_path / "results.json").write_text(json.dumps(summary))
    subprocess.run([sys.executable, str(ROOT / "replicate" / "run.py"), "--out", str(tmp_path), "--report-only"],
                   check=True, capture_output=True)
    report = (tmp_path / "report.md").read_text()
    assert "## Criterion" in report
    # the verdicts follow the results: a family without continuations is judged from step 0 alone
    assert "mixed" not in json.loads((tmp_path / "results.json").read_text())["verdicts"]["2"]["dual_unet"]
    assert report.count("| dual_unet | mixed |") == 2 and report.count("not continued in this run** |") == 2


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


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_a_user_error_of_the_script_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "replicate" / "run.py"), "--out", str(tmp_path), "--report-only"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: --report-only: no {tmp_path / 'results.json'}; run without "
                                                  "--report-only first"]
