"""Sampling with and without reference acceleration (the Reference UNet run once vs at every step),
side by side in one process, the two interleaved.

    python benchmarks/sampling_speed.py [--height 128 --width 96 --batch 2 --steps 20] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_batch

    from leffa.module import LeffaModule
    from leffa.sampling import make_scheduler, sample

    torch.manual_seed(0)
    module = LeffaModule(unet_config=ROOT / "configs/model/tiny_unet.yaml", vae_config=ROOT / "configs/model/tiny_vae.yaml",
                         conditioning="released").to(args.device).eval()
    batch = {k: v.to(args.device) if torch.is_tensor(v) else v
             for k, v in make_batch(args.batch, args.height, args.width).items()}
    variants = {"reference at every step": None, "reference once (t=500)": 500}
    times = {name: [] for name in variants}
    for i in range(args.repeat + 1):
        for name, reference_timestep in variants.items():
            start = time.perf_counter()
            sample(module, batch, make_scheduler("ddim", module.scheduler), args.steps, 2.5,
                   generator=torch.Generator().manual_seed(0), reference_timestep=reference_timestep)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["reference at every step"])
    print(f"sampling, tiny model, batch {args.batch} at {args.height}x{args.width}, {args.steps} DDIM steps, CFG 2.5, "
          f"{args.device}, median of {args.repeat}")
    for name, values in times.items():
        t = statistics.median(values)
        print(f"  {name:26s} {t * 1e3:8.1f} ms   {t / base:.2f}x time")


if __name__ == "__main__":
    main()
