"""Every benchmark of this folder in one run, one table (``make bench``).

Runs each script in its own process (so one script's threads or allocations do not colour the
next), collects its rows and prints them as one Markdown table; ``--out FILE`` also writes the
table with the machine it was measured on. Each script's own log lines go to stderr.

    python benchmarks/run_all.py --out benchmarks/results.md                       # CPU, small sizes
    python benchmarks/run_all.py --device cuda --sd15 --out benchmarks/results_gpu.md  # GPU, SD1.5 shapes
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from table import markdown

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SD15 = ["--unet-config", str(ROOT / "configs/model/sd15_unet.yaml"),
        "--vae-config", str(ROOT / "configs/model/sd15_vae.yaml")]


def commands(args) -> dict[str, list[str]]:
    """Script -> its arguments. The GPU run uses SD1.5's shapes at 1024x768 in bf16."""
    # train_memory.py counts GPU memory without a GPU (SD1.5 at 1024x768): the same row on every machine
    memory = {"train_memory.py": []}
    if args.device == "cpu":
        return {"leffa_overhead.py": [], "architectures.py": [], "loader_throughput.py": [], "sampling_speed.py": [],
                **memory}
    gpu = ["--device", "cuda", "--bf16", "--height", "1024", "--width", "768"] + (SD15 if args.sd15 else [])
    return {
        "leffa_overhead.py": gpu + ["--batch", "2", "--token-counts", "3072", "6144", "12288"],
        "architectures.py": gpu + ["--batch", "2", "--peak-tflops", str(args.peak_tflops)],
        "loader_throughput.py": ["--workers", "1", "2", "4", "8"],
        "sampling_speed.py": gpu + ["--batch", "1", "--steps", "30"],
        **memory,
    }


def machine(device: str) -> str:
    cpu = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
    gpu = f", {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return f"{cpu}{gpu}, torch {torch.__version__}, {platform.system()} {platform.release()}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sd15", action="store_true", help="SD1.5's UNet/VAE shapes (random weights) on the GPU")
    p.add_argument("--only", nargs="+", metavar="SCRIPT", help="run only these scripts")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's dense bf16 peak for MFU (H100 SXM: 989; H200: 989)")
    p.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    args = p.parse_args(argv)
    scripts = commands(args)
    unknown = set(args.only or []) - set(scripts)
    if unknown:
        p.error(f"unknown benchmark script(s) {sorted(unknown)}; choose from {sorted(scripts)}")
    rows, seconds = [], {}
    for script, extra in scripts.items():
        if args.only and script not in args.only:
            continue
        print(f"[bench] {script} {' '.join(extra)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / script), "--json", *extra], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
        if done.returncode:
            sys.exit(f"benchmarks/{script} failed with exit status {done.returncode} (its log is above)")
        rows += json.loads(done.stdout.strip().splitlines()[-1])
        seconds[script] = time.perf_counter() - start
    table = markdown(rows)
    print(table)
    if args.out:
        when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        took = ", ".join(f"{s} {t:.0f} s" for s, t in seconds.items())
        command = " ".join(["python benchmarks/run_all.py", *(sys.argv[1:] if argv is None else argv)])
        args.out.write_text(
            f"# Benchmarks\n\nMeasured {when} on {machine(args.device)} by `{command}` ({took}).\n\n"
            "Ratios compare rows measured side by side in the same run (`vs` names the reference row): "
            "time ratios above 1 are slower than the reference; for the loader, the ratio is samples/s "
            "over what one GPU trains at 40% MFU (above 1 keeps up).\n\n" + table + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
