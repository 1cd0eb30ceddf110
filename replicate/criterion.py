"""The criterion of the replication, fixed before any run, and the verdict it gives.

Per texture family and token grid, on held-out samples, Leffa against the run without it
(same baseline, same steps, same seeds):

1. the family/grid is a valid test: the free-query fit (step 0) closes at least
   ``VALID_GAP_FRACTION`` of the gap centre guess -> least-squares floor;
2. EPE(leffa) is below EPE(no_leffa) by more than ``SEED_SDS`` seed standard deviations (the larger
   of the two runs' sample standard deviations over seeds);
3. and by at least ``GAP_FRACTION`` of the gap EPE(no_leffa) -> least-squares floor;
4. the attention entropy of that grid falls;
5. the denoising loss is no worse: mean(leffa) <= mean(no_leffa) * (1 + ``DENOISE_TOLERANCE``).

The effect is *shown* where 2-5 hold; a family/grid that fails 1 is reported all the same, as
"not a valid test" together with what 2-5 gave (the negative control is expected to fail 1).
"""

from __future__ import annotations

import statistics

VALID_GAP_FRACTION = 0.5
SEED_SDS = 5.0
GAP_FRACTION = 0.25
DENOISE_TOLERANCE = 0.02


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def verdict(no_leffa: list[dict], leffa: list[dict], grid: str, floor_epe: float, gap_fraction: float) -> dict:
    """The criterion for one family/grid. ``no_leffa``/``leffa``: one ``evaluate`` result per seed;
    ``floor_epe``: the least-squares floor at that grid; ``gap_fraction``: step 0's fraction."""
    base_epe, base_sd = _mean_sd([r["by_grid"][grid]["epe_px"] for r in no_leffa])
    epe, sd = _mean_sd([r["by_grid"][grid]["epe_px"] for r in leffa])
    drop = base_epe - epe
    spread = max(base_sd, sd)
    checks = {
        "valid_test": gap_fraction >= VALID_GAP_FRACTION,
        "below_by_5_sd": drop > SEED_SDS * spread,  # NaN (one seed) is never enough
        "quarter_of_gap": drop >= GAP_FRACTION * (base_epe - floor_epe),
        "entropy_falls": statistics.mean(r["by_grid"][grid]["entropy"] for r in leffa)
        < statistics.mean(r["by_grid"][grid]["entropy"] for r in no_leffa),
        "denoise_no_worse": statistics.mean(r["denoise"] for r in leffa)
        <= statistics.mean(r["denoise"] for r in no_leffa) * (1 + DENOISE_TOLERANCE),
    }
    effect = all(checks[k] for k in ("below_by_5_sd", "quarter_of_gap", "entropy_falls", "denoise_no_worse"))
    if checks["valid_test"]:
        outcome = "effect shown" if effect else "effect not shown"
    else:
        outcome = "not a valid test (" + ("yet the effect shows" if effect else "and no effect") + ")"
    return {"grid": grid, "no_leffa_epe": base_epe, "leffa_epe": epe, "drop_px": drop, "seed_sd": spread,
            "gap_px": base_epe - floor_epe, "gap_closed": drop / (base_epe - floor_epe), "checks": checks,
            "effect": effect, "verdict": outcome}


# The fidelity study (replicate/fidelity.py), fixed before its full run: the masked PSNR of the
# sampled images on the held-out samples, ``leffa`` against ``no_leffa`` (same protocol and seeds).
FIDELITY_SEED_SDS = 3.0
FIDELITY_CONTROLS = ("periodic",)  # negative controls: no gain beyond noise expected


def fidelity_verdict(no_leffa: list[float], leffa: list[float], family: str) -> dict:
    """Masked PSNR per seed of each arm -> the verdict. On a valid family the effect is shown when
    mean(leffa) - mean(no_leffa) > ``FIDELITY_SEED_SDS`` x the larger of the two seed SDs; on a
    negative control the control holds when the gain is no more than that (no gain beyond noise)."""
    base, base_sd = _mean_sd(no_leffa)
    with_loss, sd = _mean_sd(leffa)
    gain, spread = with_loss - base, max(base_sd, sd)
    beyond_noise = gain > FIDELITY_SEED_SDS * spread  # NaN (one seed) is never beyond
    if family in FIDELITY_CONTROLS:
        outcome = "control fails: a gain beyond noise" if beyond_noise else "control holds: no gain beyond noise"
    else:
        outcome = "effect shown" if beyond_noise else "effect not shown"
    return {"no_leffa_psnr": base, "leffa_psnr": with_loss, "gain_db": gain, "seed_sd": spread,
            "beyond_noise": beyond_noise, "control": family in FIDELITY_CONTROLS, "verdict": outcome}
