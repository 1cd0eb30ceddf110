"""``report.md`` and the before/after sample grids of the fidelity study (every number from its summary)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torchvision.utils import make_grid

from replicate import criterion
from replicate.fidelity_scores import SCALE_ROWS
from replicate.report import ROLE, _cell, _write, wall_time
from leffa.pictures import save_png, to_unit

SCALE_NOTES = {
    "flat": "every masked pixel the reference's mean colour",
    "paste": "the reference pasted unwarped",
    "gt_warp_vae": "the reference warped by the ground-truth flow, through the VAE: the best this VAE allows",
    "vae_recon": "the target through the VAE",
}
RUN_NOTES = {"no_leffa": "sampled, trained without the Leffa loss", "leffa": "sampled, trained with it"}
GRID_ROWS = "target, reference, reference warped by the ground truth through the VAE, without Leffa, with Leffa"


def write_grid(rows: list[torch.Tensor], path: Path, columns: int) -> Path:
    """One PNG: each row the same first ``columns`` held-out samples, (B, 3, H, W) in [-1, 1] each."""
    tiles = torch.cat([to_unit(r[:columns]) for r in rows])
    tmp = path.with_name(f".{path.stem}.tmp.png")
    save_png(make_grid(tiles, nrow=min(columns, rows[0].shape[0]), padding=2, pad_value=1.0), tmp)
    os.replace(tmp, path)
    return path


def _seed_cells(per_seed: list[dict], key: str, grid: str | None = None, digits: int = 2) -> str:
    values = [r[key][grid] if grid else r[key] for r in per_seed]
    return _cell(values, digits)


def report(summary: dict) -> str:
    s = summary["settings"]
    done, total = s["runs_done"], s["runs_total"]
    lines = [
        "# Fidelity: does the Leffa loss reach the pixels? (CPU scale)",
        "",
        "Written by `make fidelity` (`replicate/fidelity.py`) with `results.json` (every number, per seed and "
        "per sample) and `grids/`; the reading is in `replicate/notes.md`, section \"Fidelity\".",
        "",
        *([f"**Partial: {done} of {total} runs finished.** Verdicts with fewer than 2 seeds per arm cannot "
           "pass.", ""] if done < total else []),
        "## Set-up",
        "",
        f"- `make demo`'s protocol, read from `configs/tiny_synthetic.yaml`: from random weights (seeds "
        f"{s['seeds']}), {s['optimizer']} {s['optimizer_args']}, lambda_leffa as the config says, "
        f"EMA {s['ema_decay']}, batch {s['batch_size']}, {s['size']}, the trained tiny VAE "
        f"(`assets/tiny_vae_synthetic`), **{s['steps']} steps**"
        + (" (the demo's)" if s["steps"] == s["demo_steps"] else f" (the demo runs {s['demo_steps']})")
        + ". `dual_unet` with the demo's conditioning (`released`); `concat_unet` with "
        "`configs/concat/concat_unet.yaml` on top (try-on conditioning, `trainable: attention`). The two "
        "arms differ only in `use_leffa_loss`.",
        f"- Data: synthetic shards per texture family, {s['train_samples']} train and {s['eval_samples']} "
        "held-out samples (the same held-out samples for every run of a family).",
        f"- Sampled as `leffa predict` does ({s['sampling']}), each sample's noise from its key; the EMA "
        "weights. Scored by `leffa.metrics.paired_scores` on 8-bit PNGs, as `leffa eval` scores files: "
        "**PSNR and SSIM inside the mask** against the ground-truth target (whole-image PSNR beside them; "
        "outside the mask every row is the target, repainted).",
        "- Flow EPE (px): the head-averaged attention flow of the Leffa layers against the ground-truth flow, "
        f"per token grid, on the same held-out samples at t in {s['eval_timesteps']} "
        "(`replicate/measure.py`); denoise = epsilon MSE there.",
        "",
        "## Criterion (fixed before the full run)",
        "",
        "Per architecture and family, masked PSNR of the sampled images, mean over seeds, `leffa` against "
        "`no_leffa`; seed SD = the larger of the two arms' sample SDs over seeds:",
        "",
        f"- on `smooth` (valid: the reference's content names the position) the **effect is shown** when "
        f"PSNR(leffa) - PSNR(no_leffa) > {criterion.FIDELITY_SEED_SDS:g} seed SDs;",
        f"- on {', '.join(f'`{c}`' for c in criterion.FIDELITY_CONTROLS)} (negative control: a flow a period "
        f"away fits as well) the **control holds** when the gain is no more than {criterion.FIDELITY_SEED_SDS:g} "
        "seed SDs.",
        "",
        "Computed by `replicate/criterion.py` (`fidelity_verdict`), not by hand.",
        "",
        "## Results",
        "",
    ]
    for arch, families in summary["runs"].items():
        for family, arms in families.items():
            lines += _table(summary, arch, family, arms)
    lines += ["## Verdicts", "",
              "| architecture | family | PSNR no_leffa (dB) | PSNR leffa (dB) | gain (dB) | seed SD | "
              f"> {criterion.FIDELITY_SEED_SDS:g} SD | verdict |", "|---|---|---|---|---|---|---|---|"]
    for arch, families in summary.get("verdicts", {}).items():
        for family, v in families.items():
            lines.append(f"| {arch} | {family} | {v['no_leffa_psnr']:.2f} | {v['leffa_psnr']:.2f} | "
                         f"{v['gain_db']:+.2f} | {v['seed_sd']:.2f} | {'yes' if v['beyond_noise'] else 'no'} | "
                         f"**{v['verdict']}** |")
    lines += ["", "## Before/after sample grids", "",
              f"Seed {s['seeds'][0]}, the first {s['grid_columns']} held-out samples (columns); rows: {GRID_ROWS}.", ""]
    for name, path in summary.get("grids", {}).items():
        lines += [f"**{name}**", "", f"![{name}]({path})", ""]
    lines += wall_time(summary, "Per run (s, training + measuring)",
                       f"; the workers' leffa: `{s.get('leffa_package', '?')}`")
    return "\n".join(lines)


def _table(summary: dict, arch: str, family: str, arms: dict) -> list[str]:
    scale = summary["scale"].get(family)
    grids = sorted({g for per_seed in arms.values() for r in per_seed for g in r["epe_px"]})
    head = "| row | PSNR mask (dB) | SSIM mask | PSNR image (dB) | " + " | ".join(f"EPE {g} (px)" for g in grids)
    lines = [f"### {arch}, {family} ({ROLE.get(family, '')})", ""]
    if scale:
        guess = scale["flow_guess_epe_px"]
        lines += [f"Flow EPE for scale: centre guess {guess['centre']:.2f} px, identity {guess['identity']:.2f} px.", ""]
    lines += [head + " | denoise | seeds | what it is |", "|---" * (6 + len(grids)) + "|---|"]
    dashes = " | ".join("-" for _ in grids)
    for row in SCALE_ROWS if scale else ():
        m = scale["scores"][row]
        lines.append(f"| {row} | {m['psnr_mask']:.2f} | {m['ssim_mask']:.3f} | {m['psnr']:.2f} | {dashes} | - | - | "
                     f"{SCALE_NOTES[row]} |")
    for arm in ("no_leffa", "leffa"):
        per_seed = arms.get(arm, [])
        if not per_seed:
            continue
        epe = " | ".join(_seed_cells(per_seed, "epe_px", g) for g in grids)
        lines.append(f"| {arm} | {_seed_cells(per_seed, 'psnr_mask')} | {_seed_cells(per_seed, 'ssim_mask', digits=3)} | "
                     f"{_seed_cells(per_seed, 'psnr')} | {epe} | {_seed_cells(per_seed, 'denoise', digits=4)} | "
                     f"{len(per_seed)} | {RUN_NOTES[arm]} |")
    lines.append("")
    return lines


#: the hand-written sections of ``replicate/notes.md`` that end the report: its reading, and why the
#: 8x6 layers learn in this protocol and not in ``make replicate``'s continuations
NOTES = Path(__file__).resolve().parent / "notes.md"
NOTE_SECTIONS = ("## Fidelity", "## The 8x6 question")


def notes_sections(notes: Path = NOTES) -> str:
    """The :data:`NOTE_SECTIONS` of ``notes`` (each from its heading to the next ``## ``), or nothing."""
    if not notes.is_file():
        return ""
    sections = notes.read_text().split("\n## ")
    picked = [("## " + part if i else part).rstrip() for i, part in enumerate(sections)
              if ("## " + part if i else part).startswith(NOTE_SECTIONS)]
    return "\n\n".join(picked) + "\n" if picked else ""


def write(summary: dict, out: Path) -> None:
    """``results.json`` and ``report.md`` (with :func:`notes_sections` at the end) into ``out`` (each
    written to a temporary name, then renamed)."""
    _write(out / "results.json", json.dumps(summary, indent=2))
    notes = notes_sections()
    _write(out / "report.md", report(summary) + ("\n" + notes if notes else ""))
