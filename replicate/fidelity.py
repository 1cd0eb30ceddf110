"""Fidelity study: does the Leffa loss make the sampled garment closer to the ground truth?

``make demo``'s protocol (``replicate/fidelity_runs.py``) with and without the Leffa loss, per seed,
on ``smooth`` (valid) and ``periodic`` (negative control) with ``dual_unet`` and on ``smooth`` with
``concat_unet``. On the held-out samples, inside the mask, against the ground-truth target: PSNR and
SSIM of the images ``leffa predict`` would sample, the flow EPE per token grid, and the scale rows
(``replicate/fidelity_scores.py``). The criterion is ``criterion.fidelity_verdict``. Writes
``report.md``, ``results.json`` and ``grids/`` to ``--out``, again after every finished run.

    python replicate/fidelity.py                      # the full study (make fidelity)
    python replicate/fidelity.py --out /tmp/f --quick # a few steps on tiny sets, for the test suite
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from leffa.errors import UserError, user_errors_as_one_line  # noqa: E402
from leffa.sampling import SamplingConfig  # noqa: E402
from replicate import criterion, fidelity_report, jobs, measure  # noqa: E402
from replicate.fidelity_runs import demo_protocol, scale_run, training_run  # noqa: E402
from replicate.report import read_results  # noqa: E402
from replicate.run import make_shards  # noqa: E402

MATRIX = (("dual_unet", "smooth"), ("dual_unet", "periodic"), ("concat_unet", "smooth"))
ARMS = ((False, "no_leffa"), (True, "leffa"))
GRID_COLUMNS = 8


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "replicate" / "fidelity"))
    p.add_argument("--work", help="shards and Lightning's scratch (default: replicate/work/fidelity, ignored by git)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, help="training steps of each run (default: the demo's max_steps)")
    p.add_argument("--train-samples", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--processes", type=int, default=2, help="one-thread worker processes")
    p.add_argument("--report-only", action="store_true", help="report.md again from --out's results.json")
    p.add_argument("--quick", action="store_true",
                   help="2 steps, 2 seeds, 8 train and 4 held-out samples, 2 sampling steps: checks the pipeline")
    args = p.parse_args(argv)
    protocol = demo_protocol()
    args.steps = args.steps if args.steps is not None else protocol["steps"]
    args.sampling = dataclasses.asdict(SamplingConfig())  # leffa predict's defaults (configs/predict.yaml)
    if args.quick:
        args.seeds, args.steps, args.train_samples, args.eval_samples = [0, 1], 2, 8, 4
        args.sampling["num_steps"] = 2
        measure.EVAL_TIMESTEPS[:] = [250]
    for name in ("steps", "train_samples", "eval_samples", "processes"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds: each seed once, got {args.seeds}")
    args.work = Path(args.work) if args.work else ROOT / "replicate" / "work" / "fidelity"
    return args, protocol


def new_summary(args, protocol: dict) -> dict:
    settings = {**protocol, "demo_steps": protocol["steps"], "steps": args.steps, "seeds": args.seeds,
                "train_samples": args.train_samples, "eval_samples": args.eval_samples,
                "size": f"{protocol['size'][0]}x{protocol['size'][1]}", "sampling": args.sampling,
                "eval_timesteps": list(measure.EVAL_TIMESTEPS), "processes": args.processes, "cpus": os.cpu_count(),
                "grid_columns": GRID_COLUMNS, "runs_total": len(MATRIX) * len(ARMS) * len(args.seeds), "runs_done": 0}
    return {"settings": settings, "scale": {}, "runs": {}, "verdicts": {}, "grids": {}, "seconds": {}}


def add_verdicts(summary: dict) -> None:
    summary["verdicts"] = {}
    for arch, families in summary["runs"].items():
        for family, arms in families.items():
            if arms.get("no_leffa") and arms.get("leffa"):
                summary["verdicts"].setdefault(arch, {})[family] = criterion.fidelity_verdict(
                    [r["psnr_mask"] for r in arms["no_leffa"]], [r["psnr_mask"] for r in arms["leffa"]], family)


def run(args, protocol: dict, out: Path) -> None:
    start = time.perf_counter()
    size = tuple(protocol["size"])
    summary = new_summary(args, protocol)
    families = sorted({f for _, f in MATRIX}, key=lambda f: [m[1] for m in MATRIX].index(f))
    folders = {f: str(make_shards(args.work, f, size, args.train_samples, args.eval_samples)) for f in families}
    shown: dict = {}  # seed-0 images of each (arch, family) arm and each family's scale rows, for the grids
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.processes, mp_context=context, initializer=jobs.init_worker,
                             initargs=(1, list(measure.EVAL_TIMESTEPS))) as pool:
        futures = [pool.submit(scale_run, f, folders[f], size, protocol["batch_size"]) for f in families]
        futures += [pool.submit(training_run, arch, family, leffa, seed, args.steps, folders[family], size,
                                protocol["batch_size"], protocol["ema_decay"], args.sampling, str(args.work))
                    for seed in args.seeds for arch, family in MATRIX for leffa, _ in ARMS]
        for future in as_completed(futures):
            result = future.result()
            if "scores" in result:  # a family's scale rows
                family = result.pop("family")
                shown[family] = {k: result.pop(k) for k in ("images", "reference", "target")}
                summary["settings"]["leffa_package"] = result.pop("leffa_package")  # the workers' leffa
                summary["scale"][family] = result
            else:
                add_run(summary, result, shown, args.seeds[0])
            write_grids(summary, shown, out)
            add_verdicts(summary)
            summary["seconds"]["total"] = time.perf_counter() - start
            fidelity_report.write(summary, out)
    print(f"[fidelity] wrote {out / 'report.md'} ({summary['seconds']['total'] / 60:.1f} min)", flush=True)


def add_run(summary: dict, result: dict, shown: dict, first_seed: int) -> None:
    arch, family, arm, seed = (result.pop(k) for k in ("architecture", "family", "run", "seed"))
    images = result.pop("images")
    if seed == first_seed:
        shown[arch, family, arm] = images
    summary["seconds"][f"{arch}/{family}/{arm}/{seed}"] = result["seconds"]
    per_seed = summary["runs"].setdefault(arch, {}).setdefault(family, {}).setdefault(arm, [])
    per_seed.append({"seed": seed, **result})
    per_seed.sort(key=lambda r: r["seed"])
    summary["runs"] = in_matrix_order(summary["runs"])
    summary["settings"]["runs_done"] += 1


def in_matrix_order(runs: dict) -> dict:
    ordered: dict = {}
    for arch, family in MATRIX:
        if family in runs.get(arch, {}):
            ordered.setdefault(arch, {})[family] = runs[arch][family]
    return ordered


def write_grids(summary: dict, shown: dict, out: Path) -> None:
    """The before/after grid of each (architecture, family) once its seed-0 arms and scale rows are in."""
    for arch, family in MATRIX:
        name = f"{arch}_{family}"
        parts = [shown.get(family), shown.get((arch, family, "no_leffa")), shown.get((arch, family, "leffa"))]
        if name in summary["grids"] or any(p is None for p in parts):
            continue
        scale, without, with_loss = parts
        rows = [scale["target"], scale["reference"], scale["images"]["gt_warp_vae"], without, with_loss]
        (out / "grids").mkdir(parents=True, exist_ok=True)
        path = fidelity_report.write_grid(rows, out / "grids" / f"{name}.png", GRID_COLUMNS)
        summary["grids"][name] = str(path.relative_to(out))


def main(argv=None) -> None:
    args, protocol = parse(argv)
    out = Path(args.out)
    if args.report_only:
        summary = read_results(out)
        add_verdicts(summary)
        fidelity_report.write(summary, out)
        return
    out.mkdir(parents=True, exist_ok=True)
    run(args, protocol, out)


if __name__ == "__main__":
    user_errors_as_one_line(main)
