"""Sampling with and without reference acceleration (the Reference UNet run once vs at every step),
side by side in one process, the two interleaved.

    python benchmarks/sampling_speed.py [--height 128 --width 96 --batch 2 --steps 20]
    python benchmarks/sampling_speed.py --device cuda --bf16 --height 1024 --width 768 \\
        --unet-config configs/model/sd15_unet.yaml --vae-config configs/model/sd15_vae.yaml
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from table import add_output_flag, compared, emit, row

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--unet-config", default=str(ROOT / "configs/model/tiny_unet.yaml"))
    p.add_argument("--vae-config", default=str(ROOT / "configs/model/tiny_vae.yaml"))
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    add_output_flag(p)
    args = p.parse_args(argv)

    from leffa.testing import make_batch

    from leffa.module import LeffaModule
    from leffa.sampling import SamplingConfig, sample

    torch.manual_seed(0)
    module = LeffaModule(unet_config=args.unet_config, vae_config=args.vae_config,
                         conditioning="released").to(args.device).eval()
    batch = make_batch(args.batch, args.height, args.width, device=args.device)
    variants = {"reference at every step": None, "reference once (t=500)": 500}
    times = {name: [] for name in variants}
    for i in range(args.repeat + 1):
        for name, reference_timestep in variants.items():
            start = time.perf_counter()
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
                sample(module, batch, SamplingConfig("ddim", args.steps, 2.5, reference_timestep=reference_timestep,
                                                     repaint=False), torch.Generator().manual_seed(0))
            if args.device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    setting = f"{Path(args.unet_config).stem}, batch {args.batch}, {args.height}x{args.width}, {args.steps} DDIM steps, CFG 2.5"
    out = [row("sampling", setting, name, statistics.median(values) * 1e3, "ms") for name, values in times.items()]
    emit(compared(out, "reference at every step"), args.json)


if __name__ == "__main__":
    main()
