"""A CPU-scale check of the Leffa paper's claim on the synthetic set, which has exact correspondence.

0. Identifiability, from data and Eq. 4 alone (no model): per texture family and token grid, free
   per-token queries optimised on the warp loss; the fraction of the gap centre guess ->
   least-squares floor they close decides whether the family/grid is a valid test.
1. One baseline stage (diffusion loss only) with the tiny model, on all families pooled.
2. From it, per family and seed: the same steps without the Leffa loss and with it (and, on the
   families named, longer runs and the ablations: per head, no upsampling, theta_timestep 1000).
3. On held-out samples, at t < theta_timestep, per Leffa token grid: the end-point error of the
   attention flow against the ground-truth flow, warp L2 (Eq. 4), entropy, denoising loss; the
   pre-registered criterion (``criterion.py``) and its verdict per family/grid; ``report.md``,
   ``results.json`` and flow pictures per family (baseline, no_leffa, leffa; same samples).

    python replicate/run.py --out replicate            # the full run (make replicate)
    python replicate/run.py --out /tmp/r --quick       # a handful of steps, for the test suite
    python replicate/run.py --out replicate --report-only   # report.md again from results.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_prep.__main__ import main as data_prep_main  # noqa: E402
from data_prep.synthetic_textures import TEXTURES  # noqa: E402
from leffa.data import LeffaDataModule  # noqa: E402
from leffa.data.batch import to_model_batch  # noqa: E402
from leffa.errors import UserError  # noqa: E402
from leffa.losses import warp_loss  # noqa: E402
from leffa.module import LeffaModule  # noqa: E402
from replicate import measure  # noqa: E402
from replicate.criterion import verdict  # noqa: E402
from replicate.identifiability import (  # noqa: E402
    cell_average,
    centre_flow,
    end_point_error,
    free_query_fit,
    gap_closed,
    least_squares_floor,
)
from replicate.report import write_report  # noqa: E402

# Continuations of the baseline: name -> module settings on top of the shared ones.
RUNS = {
    "no_leffa": dict(use_leffa_loss=False),
    "leffa": dict(use_leffa_loss=True),
    "leffa_per_head": dict(use_leffa_loss=True, average_heads=False),
    "leffa_no_upsample": dict(use_leffa_loss=True, upsample_flow=False),
    "leffa_all_timesteps": dict(use_leffa_loss=True, theta_timestep=1000),
}
ABLATIONS = ("leffa_per_head", "leffa_no_upsample", "leffa_all_timesteps")
FAMILIES = list(TEXTURES)  # periodic (negative control), ramp (positive control), smooth, prints, mixed
TRAINED_VAE = ROOT / "assets" / "tiny_vae_synthetic"


def module_settings(args) -> dict:
    settings = dict(
        unet_config=ROOT / "configs/model/tiny_unet.yaml",
        vae_config=ROOT / "configs/model/tiny_vae.yaml",
        # "tryon": mask + masked-image latent. The synthetic DensePose colours each pixel by its
        # reference coordinate, i.e. it would hand the model the answer; try-on conditioning does not.
        conditioning="tryon",
        learning_rate=args.learning_rate,
        lambda_leffa=args.lambda_leffa,
        p_drop_ref=0.0,
    )
    if args.vae != "random":
        folder = Path(args.vae_folder or TRAINED_VAE)
        if not (folder / "config.json").is_file():
            raise UserError(f"--vae trained: no AutoencoderKL folder at {folder}; train it first or pass --vae-folder")
        settings["vae_pretrained"] = str(folder)
    return settings


class EvaluateAt(L.Callback):
    """Evaluate the module on held-out batches after the given optimizer steps (one run, several lengths)."""

    def __init__(self, steps: list[int], batches: list[dict]):
        self.steps, self.batches, self.results = set(steps), batches, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in self.steps and step not in self.results:
            self.results[step] = measure.evaluate(pl_module, self.batches)


def train(module: LeffaModule, data: LeffaDataModule, lengths: list[int], seed: int, root: Path,
          batches: list[dict] | None) -> tuple[dict, float]:
    """Train for max(lengths) steps from ``seed``; evaluate after each length when ``batches`` are given."""
    L.seed_everything(seed, verbose=False)
    evaluator = EvaluateAt(lengths, batches or [])
    trainer = L.Trainer(max_steps=max(lengths), accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=root, callbacks=[evaluator] if batches else [])
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    if batches:
        for length in lengths:  # a run that stopped early (it never does) is measured where it ended
            evaluator.results.setdefault(length, measure.evaluate(module, batches))
    return {str(k): v for k, v in sorted(evaluator.results.items())}, time.perf_counter() - start


def make_shards(out: Path, family: str, args, size: tuple[int, int], train: int, test: int) -> Path:
    """Train and test shards of one texture family (every family: the same geometry per sample)."""
    folder = out / "work" / f"shards_{size[0]}x{size[1]}" / family
    if not (folder / "manifest.json").is_file():
        common = ["--height", str(size[0]), "--width", str(size[1]), "--shard-size", "64", "--seed", "0",
                  "--texture", family]
        if train:
            data_prep_main(["synthetic", "--out", str(folder), "--count", str(train), "--split", "train", *common])
        data_prep_main(["synthetic", "--out", str(folder), "--count", str(test), "--split", "test", *common])
    return folder


def held_out(folder: Path, size: tuple[int, int], batch_size: int) -> list[dict]:
    data = LeffaDataModule(predict_shards=f"{folder}@test", height=size[0], width=size[1],
                           val_batch_size=batch_size, num_workers=0)
    return [to_model_batch(b) for b in data.predict_dataloader()]


def identifiability(batch: dict, grid: tuple[int, int], steps: int) -> dict:
    """Step 0 on one batch: centre guess, cell average, least-squares floor and the free-query fit."""
    gt = batch["flow"]
    flows = {"centre": centre_flow(gt, grid), "cell_average": cell_average(gt, grid),
             "floor": least_squares_floor(gt, grid)}
    fit, losses = free_query_fit(batch, grid, steps=steps, lr=1.0, tau=2.0)
    flows["fit"] = fit
    out = {}
    for name, flow in flows.items():
        out[f"{name}_epe_px"] = end_point_error(flow, gt)
        out[f"{name}_warp_l2"] = warp_loss(flow, batch["ref"], batch["tgt"], batch["mask"]).mean().item()
    out["gap_closed"] = gap_closed(out["centre_epe_px"], out["fit_epe_px"], out["floor_epe_px"])
    out["samples"] = int(gt.shape[0])
    return out


def step_zero(out: Path, args) -> dict:
    """Identifiability per family and grid: 64x48 (4x3, 8x6) and, unless --quick, 128x96 (16x12)."""
    sizes = [(tuple(args.size), [(args.size[0] // 16, args.size[1] // 16), (args.size[0] // 8, args.size[1] // 8)])]
    if args.large_identifiability:
        sizes.append(((2 * args.size[0], 2 * args.size[1]), [(args.size[0] // 4, args.size[1] // 4)]))
    result = {}
    for family in args.families:
        for size, grids in sizes:
            folder = make_shards(out, family, args, size, 0 if size != tuple(args.size) else args.train_samples,
                                 args.eval_samples)
            batch = held_out(folder, size, args.identifiability_samples)[0]
            for grid in grids:
                key = f"{measure.grid_name(grid)} at {size[0]}x{size[1]}"
                result.setdefault(family, {})[key] = identifiability(batch, grid, args.identifiability_steps)
                print(f"[replicate] step 0 {family} {key}: {result[family][key]['gap_closed']:.2f} of the gap",
                      flush=True)
    return result


def run_family(family: str, base_state: dict, baseline: LeffaModule, args, out: Path, settings: dict,
               summary: dict) -> None:
    """Every continuation of one family, its measures, flow pictures and scale lines, into ``summary``."""
    results, seconds = summary["results"], summary["seconds"]
    folder = out / "work" / f"shards_{args.size[0]}x{args.size[1]}" / family
    batches = held_out(folder, tuple(args.size), args.batch_size)
    summary["scale"][family] = {f"{g}_epe_px": measure.guess_epe(batches, g) for g in ("identity", "centre")}
    results[family] = {"baseline": {"0": [measure.evaluate(baseline, batches)]}}
    runs = ["no_leffa", "leffa"] + (list(ABLATIONS) if family in args.ablation_families else [])
    shown = {"baseline": baseline}
    for name in runs:
        lengths = [args.steps] + ([args.long_steps] if family in args.long_families and name in ("no_leffa", "leffa")
                                  else [])
        for seed in args.seeds:
            data = LeffaDataModule(train_shards=str(folder), height=args.size[0], width=args.size[1],
                                   batch_size=args.batch_size, num_workers=args.workers, shuffle_buffer=64,
                                   hflip=False, seed=seed)
            module = LeffaModule(**{**settings, **RUNS[name]})
            module.load_state_dict(base_state)
            print(f"[replicate] {family} {name} seed {seed}: {max(lengths)} steps", flush=True)
            measured, seconds[f"{family}/{name}/{seed}"] = train(module, data, lengths, seed, out / "work", batches)
            for length, metrics in measured.items():
                results[family].setdefault(name, {}).setdefault(length, []).append(metrics)
            if seed == args.seeds[0] and name in ("no_leffa", "leffa"):
                shown[name] = module
    summary["figures"][family] = [str(p.relative_to(out)) for p in measure.pictures(shown, batches[0], out / "figures", family)]


def verdicts(summary: dict, length: str) -> dict:
    """The criterion per family and grid at one continuation length (where both runs have it)."""
    out = {}
    for family, runs in summary["results"].items():
        if length not in runs.get("no_leffa", {}) or length not in runs.get("leffa", {}):
            continue
        for grid in runs["leffa"][length][0]["by_grid"]:
            step0 = summary["identifiability"][family][f"{grid} at {summary['settings']['size']}"]
            out.setdefault(family, {})[grid] = verdict(runs["no_leffa"][length], runs["leffa"][length], grid,
                                                       step0["floor_epe_px"], step0["gap_closed"])
    return out


def add_verdicts(summary: dict) -> None:
    """The criterion at the main and the long continuation length, from the results (recomputed by
    --report-only, so that the verdicts always follow the numbers)."""
    s = summary["settings"]
    summary["verdicts"] = {s["steps"]: verdicts(summary, s["steps"]), s["long_steps"]: verdicts(summary, s["long_steps"])}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "replicate"))
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=FAMILIES)
    p.add_argument("--continue-families", nargs="+", choices=FAMILIES,
                   help="the families whose continuations run (default: --families; the baseline still pools "
                        "every family of --families)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--baseline-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=250, help="steps of each continuation (the criterion's length)")
    p.add_argument("--long-steps", type=int, default=750, help="the longer continuation of --long-families")
    p.add_argument("--long-families", nargs="*", default=["ramp"])
    p.add_argument("--ablation-families", nargs="*", default=["ramp"])
    p.add_argument("--lambda-leffa", type=float, default=0.1)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--vae", choices=["random", "trained"], default="random",
                   help="the tiny VAE: random and frozen, or the one trained for the synthetic set")
    p.add_argument("--vae-folder", help=f"AutoencoderKL folder for --vae trained (default {TRAINED_VAE})")
    p.add_argument("--size", type=int, nargs=2, default=[64, 48], metavar=("H", "W"))
    p.add_argument("--train-samples", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=1, help="data loader workers of each training run")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--identifiability-samples", type=int, default=8)
    p.add_argument("--identifiability-steps", type=int, default=400)
    p.add_argument("--no-large-identifiability", dest="large_identifiability", action="store_false",
                   help="skip step 0 at twice the size (16x12 grid)")
    p.add_argument("--notes", type=Path, default=ROOT / "replicate/notes.md",
                   help="hand-written reading of the result, appended to the report when the file exists")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite report.md from the results.json already in --out (no training)")
    p.add_argument("--quick", action="store_true", help="a handful of steps on tiny sets, to check the pipeline")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.baseline_steps, args.steps, args.long_steps = [0, 1], 2, 2, 3
        args.train_samples, args.eval_samples, args.size, args.workers = 8, 4, [64, 48], 0
        args.identifiability_samples, args.identifiability_steps, args.large_identifiability = 4, 30, False
        measure.EVAL_TIMESTEPS[:] = [250]
    args.continue_families = args.continue_families or args.families
    unknown = set(args.long_families + args.ablation_families) - set(FAMILIES)
    if unknown:
        raise UserError(f"--long-families/--ablation-families: unknown families {sorted(unknown)}; use {FAMILIES}")
    return args


def main(argv=None):
    args = parse(argv)
    out = Path(args.out)
    if args.report_only:
        if not (out / "results.json").is_file():
            raise UserError(f"--report-only: no {out / 'results.json'}; run without --report-only first")
        summary = json.loads((out / "results.json").read_text())
        add_verdicts(summary)
        write_report(summary, out, args.notes)
        return
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    seconds = {}
    summary = {"settings": {**{k: str(v) for k, v in vars(args).items() if k != "notes"},
                            "size": f"{args.size[0]}x{args.size[1]}", "eval_timesteps": list(measure.EVAL_TIMESTEPS),
                            "threads": torch.get_num_threads(), "cpus": os.cpu_count()}}
    summary["identifiability"] = step_zero(out, args)
    seconds["step 0 and data"] = time.perf_counter() - start

    settings = module_settings(args)
    torch.manual_seed(0)
    baseline = LeffaModule(**settings, use_leffa_loss=False)
    folders = [str(out / "work" / f"shards_{args.size[0]}x{args.size[1]}" / f) for f in args.families]
    data = LeffaDataModule(train_shards=folders, height=args.size[0], width=args.size[1], batch_size=args.batch_size,
                           num_workers=args.workers, shuffle_buffer=64, hflip=False, seed=0)
    print(f"[replicate] baseline: {args.baseline_steps} steps on {', '.join(args.families)}", flush=True)
    _, seconds["baseline"] = train(baseline, data, [args.baseline_steps], 0, out / "work", None)
    base_state = {k: v.clone() for k, v in baseline.state_dict().items()}
    summary.update(results={}, figures={}, scale={}, seconds=seconds)
    for family in args.continue_families:
        run_family(family, base_state, baseline, args, out, settings, summary)
        add_verdicts(summary)
        seconds["total"] = time.perf_counter() - start
        write_report(summary, out, args.notes)  # after every family, so that a stopped run leaves its part


if __name__ == "__main__":
    main()
