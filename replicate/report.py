"""``report.md`` and ``results.json`` of the replication, from its summary (every number from the run)."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from leffa.errors import UserError
from replicate import criterion

RUN_NOTES = {
    "baseline": "diffusion loss only, all families pooled: the start of every row below",
    "no_leffa": "diffusion loss only",
    "leffa": "+ Leffa loss",
    "leffa_per_head": "Tab. 8: loss per head, no head average",
    "leffa_no_upsample": "Tab. 8: images downsampled to the flow instead",
    "leffa_all_timesteps": "Fig. 5: theta_timestep 1000",
}
ROLE = {"periodic": "negative control", "ramp": "positive control", "smooth": "garment-like",
        "prints": "garment-like", "mixed": "garment-like"}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(summary: dict, out: Path, notes: Path | None) -> None:
    _write(out / "results.json", json.dumps(summary, indent=2))
    text = report(summary)
    if notes and Path(notes).is_file():
        text += "\n" + Path(notes).read_text()
    _write(out / "report.md", text)
    print(f"[replicate] wrote {out / 'report.md'}", flush=True)


def _cell(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def report(summary: dict) -> str:
    s = summary["settings"]
    size = s["size"]
    lines = [
        "# Leffa on the synthetic set, CPU scale",
        "",
        "Written by `make replicate` (`replicate/run.py`) with `results.json` (every number, per seed) and "
        "`figures/`; the reading at the end is `replicate/notes.md`.",
        "",
        "## Set-up",
        "",
        f"- Tiny model (`configs/model/tiny_unet.yaml`); VAE: **{s['vae']}** "
        + ("(`configs/model/tiny_vae.yaml`, random weights, frozen)" if s["vae"] == "random"
           else f"(trained for the synthetic set: {s['vae_folder'] or 'assets/tiny_vae_synthetic'})")
        + f". {size} synthetic samples, {s['train_samples']} train and {s['eval_samples']} held out per texture "
        f"family; batch {s['batch_size']}, AdamW lr {s['learning_rate']}"
        + (f" (the continuations: lr {s['continuation_learning_rate']})"
           if s.get("continuation_learning_rate", s["learning_rate"]) != s["learning_rate"] else "")
        + ", try-on conditioning (the synthetic "
        "DensePose colours each pixel by its reference coordinate: it would hand the model the answer).",
        "- Texture families (`data_prep/synthetic_textures.py`), fixed before any run; for a given sample every "
        "family shares the garment region, the flow and the background, only the reference differs: "
        + "; ".join(f"`{f}` ({ROLE.get(f, '')})" for f in summary["identifiability"]) + ".",
        f"- Baseline: {s['baseline_steps']} steps, diffusion loss only, all families pooled (seed 0). From it, per "
        f"family of {s['continue_families']} and seed {s['seeds']}: {s['steps']} steps without the Leffa loss (`no_leffa`) and with it "
        f"(`leffa`)" + _extras(s) + ".",
        *([f"- Architectures: {s['architectures']}, each from its own baseline (same data, steps and seed). "
           "`dual_unet` is the paper's (Generative + Reference UNet); `concat_unet` a CatVTON-style single UNet over "
           "[person | garment] whose Leffa loss reads person queries against garment keys "
           "(`leffa/architectures/`). The first runs the whole matrix; the others `no_leffa` and `leffa` on "
           f"{s['other_families']}; every UNet weight trains (the tiny model starts from random weights)."]
          if "architectures" in s else []),
        *([f"- This run: continuations of {s['continue_families']} only; {s['note']}."] if s.get("note") else []),
        f"- Leffa settings: the paper's tau 2.0, theta_resolution 1/32 (token grids 4x3 and 8x6 at 64x48) and "
        f"theta_timestep 500. **lambda_leffa {s['lambda_leffa']}**, 100x the paper's 1e-3: the paper fine-tunes "
        "pretrained attention for thousands of steps, here a continuation is a few hundred steps of a tiny model; "
        "at lambda 0.1 the Leffa term (two layers, warp L2 about 0.02-0.04 each) is a few percent of the "
        "diffusion loss (about 0.15), at 1e-3 it would be a few hundredths of a percent. The value was set "
        "before these runs (it is the earlier report's) and is not tuned here.",
        f"- Measured on the held-out samples at t in {s['eval_timesteps']} (all below theta_timestep), per Leffa "
        "token grid: EPE = mean end-point error in pixels between the head-averaged attention flow (bilinearly "
        "upsampled, align_corners=True, as in Eq. 4) and the ground-truth flow, inside the mask; warp L2 = Eq. 4; "
        "entropy = entropy of the head-averaged attention of the masked query tokens over log(keys) (1 uniform, "
        "0 one-hot); reach = mean distance of the attention flow from the reference centre (px); denoise = "
        "epsilon MSE.",
        "",
        "## Step 0: identifiability from data and loss alone",
        "",
        f"Per family and token grid, on {_first(summary)['samples']} held-out samples, no model: one free query per "
        "token, fixed orthonormal keys, `attention_flow` with tau 2 from near-uniform attention, "
        f"{s['identifiability_steps']} Adam steps (lr 1.0) on the warp loss (Eq. 4) alone. *centre*: every token "
        "at the reference centre (uniform attention); *cell avg*: the ground truth averaged over each token's "
        "pixels; *floor*: the least-squares fit of the ground truth by the grid's values (tokens sit at "
        "`linspace(-1, 1)`, the first and last on the border pixels, so the cell average is not the best a grid "
        "can hold); *fit*: the free queries. Gap closed = (centre - fit) / (centre - floor). A family/grid is a "
        f"valid test when it closes at least {criterion.VALID_GAP_FRACTION:.0%}.",
        "",
        "| family | grid | EPE centre | EPE cell avg | EPE floor | EPE fit | gap closed | warp L2 centre / floor / "
        "fit | valid test |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for family, grids in summary["identifiability"].items():
        for grid, m in grids.items():
            lines.append(f"| {family} | {grid} | {m['centre_epe_px']:.2f} | {m['cell_average_epe_px']:.2f} | "
                         f"{m['floor_epe_px']:.2f} | {m['fit_epe_px']:.2f} | {m['gap_closed']:.0%} | "
                         f"{m['centre_warp_l2']:.4f} / {m['floor_warp_l2']:.4f} / {m['fit_warp_l2']:.4f} | "
                         f"{_yes(m['gap_closed'] >= criterion.VALID_GAP_FRACTION)} |")
    lines += [
        "",
        "## Criterion (fixed before the runs)",
        "",
        f"Per family and token grid at {size}, at {s['steps']} continuation steps (and, as a secondary reading, "
        f"{s['long_steps']} where run), on the held-out samples, `leffa` against `no_leffa` (same baseline, steps "
        "and seeds):",
        "",
        f"1. valid test: step 0 closes at least {criterion.VALID_GAP_FRACTION:.0%} of the gap;",
        f"2. EPE(leffa) below EPE(no_leffa) by more than {criterion.SEED_SDS:g} seed standard deviations (the "
        "larger of the two runs' sample SDs);",
        f"3. and by at least {criterion.GAP_FRACTION:.0%} of the gap EPE(no_leffa) -> least-squares floor;",
        "4. the attention entropy of that grid falls;",
        f"5. the denoising loss is no worse: mean(leffa) <= mean(no_leffa) x {1 + criterion.DENOISE_TOLERANCE:g}.",
        "",
        "**Effect shown** where 1-5 hold; a family/grid failing 1 is reported as not a valid test, with what 2-5 "
        "gave. The verdicts below are computed by `replicate/criterion.py`, not by hand.",
        "",
        "## Results",
        "",
    ]
    lines += _results_table(summary)
    for length, by_arch in summary.get("verdicts", {}).items():
        if not by_arch:
            continue
        lines += ["", f"### Verdicts at {length} steps", "",
                  "| architecture | family | grid | EPE no_leffa | EPE leffa | drop (px) | seed SD | gap closed | > 5 SD "
                  "| >= 25% gap | entropy falls | denoise ok | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for arch, table in by_arch.items():
            for family, grids in table.items():
                for grid, v in grids.items():
                    c = v["checks"]
                    lines.append(f"| {arch} | {family} | {grid} | {v['no_leffa_epe']:.2f} | {v['leffa_epe']:.2f} | "
                                 f"{v['drop_px']:.2f} | {v['seed_sd']:.3f} | {v['gap_closed']:.0%} | "
                                 f"{_yes(c['below_by_5_sd'])} | {_yes(c['quarter_of_gap'])} | "
                                 f"{_yes(c['entropy_falls'])} | {_yes(c['denoise_no_worse'])} | **{v['verdict']}** |")
        first = next(iter(summary["results"]))
        for family, grids in summary["identifiability"].items():
            if family in summary["results"][first] or length != s["steps"]:
                continue
            for key, m in grids.items():
                grid, at = key.split(" at ")
                if at == s["size"]:
                    valid = "a valid" if m["gap_closed"] >= criterion.VALID_GAP_FRACTION else "not a valid"
                    lines.append(f"| {first} | {family} | {grid} | - | - | - | - | - | - | - | - | - | **{valid} "
                                 f"test (step 0 closes {m['gap_closed']:.0%} of the gap); not continued in this run** |")
    lines += ["", "## Flow pictures", "",
              "Per family, the same held-out samples, t = 250, the baseline, then `no_leffa` and `leffa` (seed "
              f"{s['seeds'].strip('[]').split(',')[0]}, {s['steps']}+ steps); in each picture one block of rows (the "
              "samples) per Leffa layer, the 4x3 layers first, then the 8x6 layers. Columns: target, reference, attention-flow colour, reference "
              "warped by the attention flow, attention of three query points, ground-truth flow colour, reference "
              "warped by the ground truth.", ""]
    for arch, families in summary.get("figures", {}).items():
        for family, files in families.items():
            lines.append(f"**{arch}, {family}**: " + " ".join(f"[{Path(f).stem}]({f})" for f in files))
            lines += ["", *(f"![{Path(f).stem}]({f})" for f in files), ""]
    lines += wall_time(summary, "Per stage (s)")
    return "\n".join(lines)


def _extras(s: dict) -> str:
    """The longer continuations and the ablations, where the run had any."""
    text = ""
    if s["long_families"] != "[]":
        text += (f"; on {s['long_families']} also {s['long_steps']} steps (the {s['steps']}-step numbers are the same "
                 "runs measured on the way: the learning rate is constant)")
    if s["ablation_families"] != "[]":
        text += f"; the ablations (per head, no upsampling, theta_timestep 1000) on {s['ablation_families']}"
    return text or "; no longer continuations and no ablations in this run"


def _first(summary: dict) -> dict:
    return next(iter(next(iter(summary["identifiability"].values())).values()))


def _results_table(summary: dict) -> list[str]:
    lines = []
    for arch, families in summary.get("results", {}).items():
        lines += [f"### {arch}", ""]
        for family, runs in families.items():
            lines += _family_table(summary, family, runs)
    return lines


def _family_table(summary: dict, family: str, runs: dict) -> list[str]:
    grids = list(runs["baseline"]["0"][0]["by_grid"])
    scale = summary["scale"][family]
    floors = {g: summary["identifiability"][family][f"{g} at {summary['settings']['size']}"]["floor_epe_px"]
              for g in grids}
    lines = [f"**{family}** ({ROLE.get(family, '')}). For scale: centre guess {scale['centre_epe_px']:.2f} px, "
             f"identity {scale['identity_epe_px']:.2f} px, least-squares floor "
             + ", ".join(f"{g} {v:.2f} px" for g, v in floors.items()) + ".", "",
             "| run | steps | " + " | ".join(f"EPE {g} (px)" for g in grids) + " | "
             + " | ".join(f"entropy {g}" for g in grids) + " | warp L2 | reach (px) | denoise | what it is |",
             "|---|---|" + "---|" * (2 * len(grids)) + "---|---|---|---|"]
    for name, lengths in runs.items():
        for length, seeds in lengths.items():
            cells = [_cell([r["by_grid"][g]["epe_px"] for r in seeds]) for g in grids]
            cells += [_cell([r["by_grid"][g]["entropy"] for r in seeds], 3) for g in grids]
            cells += [_cell([r["warp_l2"] for r in seeds], 4), _cell([r["spread_px"] for r in seeds]),
                      _cell([r["denoise"] for r in seeds], 4)]
            shown_length = summary["settings"]["baseline_steps"] if name == "baseline" else length
            lines.append(f"| {name} | {shown_length} | " + " | ".join(cells) + f" | {RUN_NOTES.get(name, '')} |")
    lines.append("")
    return lines


def wall_time(summary: dict, per: str, where: str = "") -> list[str]:
    """The report's "Wall time" section: the total, the workers, and each entry of ``seconds``."""
    s, secs = summary["settings"], summary.get("seconds", {})
    return ["## Wall time", "",
            f"{secs.get('total', 0) / 60:.1f} min in all on {s.get('processes')} one-thread worker processes, "
            f"{s.get('cpus')} CPUs seen{where}. {per}: "
            + ", ".join(f"{k} {v:.0f}" for k, v in secs.items() if k != "total"), ""]


def read_results(out: Path) -> dict:
    """``out/results.json`` for ``--report-only``; one error line when there is none."""
    if not (out / "results.json").is_file():
        raise UserError(f"--report-only: no {out / 'results.json'}; run without --report-only first")
    return json.loads((out / "results.json").read_text())
