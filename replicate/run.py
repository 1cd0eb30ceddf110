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

The jobs (``jobs.py``) run on ``--processes`` one-thread worker processes.

    python replicate/run.py --out replicate            # the full run (make replicate)
    python replicate/run.py --out /tmp/r --quick       # a handful of steps, for the test suite
    python replicate/run.py --out replicate --report-only   # report.md again from results.json
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_prep.__main__ import main as data_prep_main  # noqa: E402
from data_prep.synthetic_textures import TEXTURES  # noqa: E402
from leffa.architectures import SHORT_NAMES  # noqa: E402
from leffa.errors import UserError, user_errors_as_one_line  # noqa: E402
from leffa.module import LeffaModule  # noqa: E402
from replicate import jobs, measure  # noqa: E402
from replicate.criterion import verdict  # noqa: E402
from replicate.report import read_results, write_report  # noqa: E402

ABLATIONS = ("leffa_per_head", "leffa_no_upsample", "leffa_all_timesteps")
FAMILIES = list(TEXTURES)  # periodic (negative control), ramp (positive control), smooth, prints, mixed
TRAINED_VAE = ROOT / "assets" / "tiny_vae_synthetic"


def module_settings(args, learning_rate: float | None = None) -> dict:
    """The tiny model's settings; ``learning_rate`` in place of ``--learning-rate`` where given."""
    lr = args.learning_rate if learning_rate is None else learning_rate
    settings = dict(
        unet_config=ROOT / "configs/model/tiny_unet.yaml",
        vae_config=ROOT / "configs/model/tiny_vae.yaml",
        # "tryon": mask + masked-image latent. The synthetic DensePose colours each pixel by its
        # reference coordinate, i.e. it would hand the model the answer; try-on conditioning does not.
        conditioning="tryon",
        learning_rate=lr,
        lambda_leffa=args.lambda_leffa,
        p_drop_ref=0.0,
        # one fused kernel for the ~700 small tensors of the tiny model: a step 20% faster on a CPU
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=1e-2, fused=True),
    )
    if args.vae != "random":
        folder = Path(args.vae_folder or TRAINED_VAE)
        if not (folder / "config.json").is_file():
            raise UserError(f"--vae trained: no AutoencoderKL folder at {folder}; train it first or pass --vae-folder")
        settings["vae_pretrained"] = str(folder)
    return settings


def shard_folder(out: Path, family: str, size: tuple[int, int]) -> Path:
    return out / "work" / f"shards_{size[0]}x{size[1]}" / family


def make_shards(out: Path, family: str, size: tuple[int, int], train: int, test: int) -> Path:
    """Train and test shards of one texture family (every family: the same geometry per sample)."""
    folder = shard_folder(out, family, size)
    if not (folder / "manifest.json").is_file():
        common = ["--height", str(size[0]), "--width", str(size[1]), "--shard-size", "64", "--seed", "0",
                  "--texture", family]
        if train:
            data_prep_main(["synthetic", "--out", str(folder), "--count", str(train), "--split", "train", *common])
        data_prep_main(["synthetic", "--out", str(folder), "--count", str(test), "--split", "test", *common])
    return folder


def step_zero_plan(out: Path, family: str, args) -> list:
    """Step 0's data of one family: 64x48 (4x3, 8x6) and, unless switched off, 128x96 (16x12)."""
    size = tuple(args.size)
    plan = [(str(make_shards(out, family, size, args.train_samples, args.eval_samples)), size,
             [(size[0] // 16, size[1] // 16), (size[0] // 8, size[1] // 8)])]
    if args.large_identifiability:
        large = (2 * size[0], 2 * size[1])
        plan.append((str(make_shards(out, family, large, 0, args.identifiability_samples)), large,
                     [(size[0] // 4, size[1] // 4)]))
    return plan


def continuation_jobs(args) -> list[tuple[str, str, str, int, list[int]]]:
    """(architecture, family, run, seed, lengths) of every continuation, longest first (the pool then
    ends together). The paper's architecture runs the whole matrix; the others ``no_leffa`` and
    ``leffa`` on ``--other-families``."""
    jobs = []
    for arch in args.architectures:
        first = arch == args.architectures[0]
        for family in args.continue_families if first else args.other_families:
            names = ["no_leffa", "leffa"] + (list(ABLATIONS) if first and family in args.ablation_families else [])
            for name in names:
                long = first and family in args.long_families and name in ("no_leffa", "leffa")
                lengths = [args.steps] + ([args.long_steps] if long else [])
                jobs += [(arch, family, name, seed, lengths) for seed in args.seeds]
    return sorted(jobs, key=lambda job: -max(job[4]))


def run_matrix(out: Path, args, summary: dict) -> None:
    """Step 0, the baselines and every continuation on a pool of one-thread workers, then the flow
    pictures; the report is rewritten whenever an architecture's family is complete."""
    size, work = tuple(args.size), str(out / "work")
    seconds, start = summary["seconds"], time.perf_counter()
    settings = {arch: {**module_settings(args), "architecture": arch} for arch in args.architectures}
    continued = {arch: {**module_settings(args, args.continuation_learning_rate), "architecture": arch}
                 for arch in args.architectures}
    base_files = {arch: str(out / "work" / f"baseline_{arch}.pt") for arch in args.architectures}
    plans = {family: step_zero_plan(out, family, args) for family in args.families}
    seconds["data"] = time.perf_counter() - start
    folders = [str(shard_folder(out, f, size)) for f in args.families]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.processes, mp_context=context, initializer=jobs.init_worker,
                             initargs=(1, list(measure.EVAL_TIMESTEPS))) as pool:
        bases = {arch: pool.submit(jobs.baseline, settings[arch], folders, size, args.batch_size, args.baseline_steps,
                                   base_files[arch], work) for arch in args.architectures}
        zero = [pool.submit(jobs.step_zero, f, plans[f], args.identifiability_samples, args.identifiability_steps)
                for f in args.families]
        for future in as_completed(zero):
            family, result, secs = future.result()
            summary["identifiability"][family] = result
            seconds[f"step 0 {family}"] = secs
        summary["identifiability"] = {f: summary["identifiability"][f] for f in args.families}
        for arch, base in bases.items():
            seconds[f"{arch} baseline"] = base.result()
        work_list = continuation_jobs(args)
        pending = Counter((arch, family) for arch, family, *_ in work_list)
        futures = [pool.submit(jobs.continuation, continued[arch], base_files[arch], arch, family, name, seed, lengths,
                               str(shard_folder(out, family, size)), size, args.batch_size, work,
                               seed == args.seeds[0] and name in ("no_leffa", "leffa"))
                   for arch, family, name, seed, lengths in work_list]
        shown, collected = {}, {}
        for future in as_completed(futures):
            arch, family, name, seed, measured, secs, weights = future.result()
            seconds[f"{arch}/{family}/{name}/{seed}"] = secs
            runs = collected.setdefault((arch, family), {})
            for length, metrics in measured.items():
                runs.setdefault(name, {}).setdefault(length, []).append((seed, metrics))
            if weights is not None:
                shown.setdefault((arch, family), {})[name] = weights
            pending[arch, family] -= 1
            if not pending[arch, family]:
                finish_family(arch, family, collected.pop((arch, family)), out, args, settings[arch],
                              base_files[arch], shown.pop((arch, family), {}), summary)
                seconds["total"] = time.perf_counter() - start
                for part in ("results", "figures"):  # architectures in the order given, families in FAMILIES'
                    summary[part] = {a: in_family_order(summary[part][a]) for a in args.architectures
                                     if a in summary[part]}
                summary["scale"] = in_family_order(summary["scale"])
                add_verdicts(summary)
                write_report(summary, out, args.notes)


def in_family_order(by_family: dict) -> dict:
    return {f: by_family[f] for f in FAMILIES if f in by_family}


def finish_family(arch: str, family: str, runs: dict, out: Path, args, settings: dict, base_file: str, shown: dict,
                  summary: dict) -> None:
    """Into ``summary``: one architecture's runs on one family ({run: {length: [(seed, measures)]}},
    seeds put in order), its baseline's measures, the guesses for scale and the flow pictures."""
    size = tuple(args.size)
    batches = jobs.held_out(shard_folder(out, family, size), size, args.batch_size)
    for lengths in runs.values():
        for length, per_seed in lengths.items():
            lengths[length] = [metrics for _, metrics in sorted(per_seed, key=lambda item: item[0])]
    modules = {"baseline": LeffaModule(**settings, use_leffa_loss=False)}
    modules["baseline"].load_state_dict(torch.load(base_file, weights_only=True))
    for name, weights in sorted(shown.items(), key=lambda item: item[0] != "no_leffa"):
        modules[name] = LeffaModule(**{**settings, **jobs.RUNS[name]})
        modules[name].load_state_dict(weights)
    baseline = {"baseline": {"0": [measure.evaluate(modules["baseline"], batches)]}}
    summary["results"].setdefault(arch, {})[family] = {**baseline, **runs}
    if family not in summary["scale"]:  # the same held-out samples for every architecture
        summary["scale"][family] = {f"{g}_epe_px": measure.guess_epe(batches, g) for g in ("identity", "centre")}
    prefix = family if arch == args.architectures[0] else f"{arch}_{family}"
    summary["figures"].setdefault(arch, {})[family] = [
        str(p.relative_to(out)) for p in measure.pictures(modules, batches[0], out / "figures", prefix)]


def verdicts(summary: dict, length: str) -> dict:
    """The criterion per architecture, family and grid at one continuation length (where both runs have it)."""
    out = {}
    for arch, families in summary["results"].items():
        for family, runs in families.items():
            if length not in runs.get("no_leffa", {}) or length not in runs.get("leffa", {}):
                continue
            for grid in runs["leffa"][length][0]["by_grid"]:
                step0 = summary["identifiability"][family][f"{grid} at {summary['settings']['size']}"]
                out.setdefault(arch, {}).setdefault(family, {})[grid] = verdict(
                    runs["no_leffa"][length], runs["leffa"][length], grid, step0["floor_epe_px"], step0["gap_closed"])
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
                   help="the families whose continuations run (default: --families; a family left out is "
                        "judged from step 0 alone); the baseline pools all of --families")
    p.add_argument("--architectures", nargs="+", choices=list(SHORT_NAMES), default=["dual_unet", "concat_unet"],
                   help="the first runs the whole matrix, the others no_leffa and leffa on --other-families")
    p.add_argument("--other-families", nargs="*", choices=FAMILIES, default=["periodic", "ramp", "smooth"],
                   help="the families of the architectures after the first (default: both controls and smooth)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--baseline-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=250, help="steps of each continuation (the criterion's length)")
    p.add_argument("--long-steps", type=int, default=750, help="the longer continuation of --long-families")
    p.add_argument("--long-families", nargs="*", default=["smooth"])
    p.add_argument("--ablation-families", nargs="*", default=["smooth"])
    p.add_argument("--lambda-leffa", type=float, default=0.1)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--continuation-learning-rate", type=float,
                   help="the continuations' learning rate (default: --learning-rate; the baseline keeps that)")
    p.add_argument("--vae", choices=["random", "trained"], default="random",
                   help="the tiny VAE: random and frozen, or the one trained for the synthetic set")
    p.add_argument("--vae-folder", help=f"AutoencoderKL folder for --vae trained (default {TRAINED_VAE})")
    p.add_argument("--size", type=int, nargs=2, default=[64, 48], metavar=("H", "W"))
    p.add_argument("--train-samples", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--processes", type=int, default=2,
                   help="worker processes of one torch thread each (the tiny model runs no faster on two threads)")
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
    args.continue_families = args.continue_families or args.families
    if args.continuation_learning_rate is None:
        args.continuation_learning_rate = args.learning_rate
    if args.quick:
        args.seeds, args.baseline_steps, args.steps, args.long_steps = [0, 1], 2, 2, 3
        args.train_samples, args.eval_samples, args.size = 8, 4, [64, 48]
        args.identifiability_samples, args.identifiability_steps, args.large_identifiability = 4, 30, False
        measure.EVAL_TIMESTEPS[:] = [250]
    unknown = set(args.long_families + args.ablation_families) - set(FAMILIES)
    if unknown:
        raise UserError(f"--long-families/--ablation-families: unknown families {sorted(unknown)}; use {FAMILIES}")
    return args


def main(argv=None):
    args = parse(argv)
    out = Path(args.out)
    if args.report_only:
        summary = read_results(out)
        add_verdicts(summary)
        write_report(summary, out, args.notes)
        return
    summary = {"settings": {**{k: str(v) for k, v in vars(args).items() if k != "notes"},
                            "size": f"{args.size[0]}x{args.size[1]}", "eval_timesteps": list(measure.EVAL_TIMESTEPS),
                            "threads": 1, "cpus": os.cpu_count()},
               "identifiability": {}, "results": {}, "figures": {}, "scale": {}, "seconds": {}}
    torch.set_num_threads(1)
    run_matrix(out, args, summary)


if __name__ == "__main__":
    user_errors_as_one_line(main)
