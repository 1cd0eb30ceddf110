"""The two architectures side by side (``model.architecture``): one training step of ``dual_unet``
(the paper's Generative + Reference UNet, every weight trained) against ``concat_unet`` (one UNet
over [person | garment]; CatVTON's recipe trains its self-attention only, and, for a like-for-like
row, every weight), at the same size and batch, the Leffa loss on for every sample
(theta_timestep 1000, so each variant captures the same samples).

Rows: the median step time (forward, backward, optimizer) and the peak memory of the step above
what the model and its optimizer hold; then the trained parameters, and the FLOPs of a step
counted on the meta device (``leffa.throughput.training_flops``) over the step time. The variants
run interleaved step by step in one process, so that they see the same machine state.

    python benchmarks/architectures.py                      # CPU, tiny model
    python benchmarks/architectures.py --device cuda --bf16 --height 1024 --width 768 --batch 2 \\
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

VARIANTS = {
    "dual_unet, all trained": dict(architecture="dual_unet", trainable="all"),
    "concat_unet, attention trained": dict(architecture="concat_unet", trainable="attention"),
    "concat_unet, all trained": dict(architecture="concat_unet", trainable="all"),
}


def build(args, options: dict):
    from leffa.module import LeffaModule

    torch.manual_seed(0)
    module = LeffaModule(unet_config=args.unet_config, vae_config=args.vae_config, conditioning="tryon",
                         use_leffa_loss=True, theta_timestep=1000, p_drop_ref=0.0, **options)
    module.setup("fit")
    module = module.to(args.device).train()
    optimizer = module.configure_optimizers()
    return module, optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(args) -> list[dict]:
    from leffa.testing import make_batch
    from leffa.throughput import training_flops

    batch = make_batch(args.batch, args.height, args.width, device=args.device)
    built = {name: build(args, options) for name, options in VARIANTS.items()}
    flops = {name: training_flops(module, batch) for name, (module, _) in built.items()}
    trained = {name: sum(p.numel() for p in module.parameters() if p.requires_grad)
               for name, (module, _) in built.items()}

    def step(module, optimizer):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = module.compute_loss(batch, torch.Generator().manual_seed(0), train=True)[0]
        loss.backward()
        optimizer.step()

    times = {name: [] for name in built}
    peaks = dict.fromkeys(built, 0)
    for i in range(args.warmup + args.repeat):
        for name, (module, optimizer) in built.items():
            synchronize(args.device)
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                held = torch.cuda.memory_allocated()
            start = time.perf_counter()
            step(module, optimizer)
            synchronize(args.device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
                if args.device == "cuda":
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() - held)

    setting = (f"{Path(args.unet_config).stem}, batch {args.batch}, {args.height}x{args.width}"
               + (", bf16" if args.bf16 else ""))
    steps, rates = [], []
    for name in built:
        seconds = statistics.median(times[name])
        memory = peaks[name] / 2**20 if args.device == "cuda" else None
        steps.append(row("architecture step", setting, name, seconds * 1000, "ms", memory))
        if flops[name]:
            scale, unit = (1e12, "TFLOP") if args.device == "cuda" else (1e9, "GFLOP")
            rate = flops[name] / seconds / scale
            mfu = f", MFU {flops[name] / seconds / 1e12 / args.peak_tflops:.0%}" if args.peak_tflops else ""
            rates.append(row("architecture step", setting, f"{name}: {trained[name] / 1e6:.2f} M trained, "
                             f"{flops[name] / scale:.2f} {unit} per step{mfu}", rate, f"{unit}/s"))
    return compared(steps, "dual_unet, all trained") + (compared(rates, rates[0]["variant"]) if rates else [])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=48)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--unet-config", default=str(ROOT / "configs/model/tiny_unet.yaml"))
    p.add_argument("--vae-config", default=str(ROOT / "configs/model/tiny_vae.yaml"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the device's dense bf16 peak, for MFU (an H100 SXM: 989); 0 leaves MFU out")
    add_output_flag(p)
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    emit(run(args), args.json)


if __name__ == "__main__":
    main()
