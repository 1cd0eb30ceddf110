"""Training speed on one GPU, every switch of ``model.speed`` side by side (``make bench-gpu``).

At each stage shape of the try-on configs (512x384 with configs/vton_512.yaml's per-device batch of
16, 1024x768 with configs/vton_1024.yaml's 4), SD1.5's UNet and VAE shapes with random weights, the
dual UNet with every weight trained and the Leffa loss on, bf16 autocast: the step of a fit (loss,
backward, clipping, AdamW, EMA) with every switch off, each switch alone, all together, all
together on cached latents (the batch carries the VAE posterior's moments, as ``leffa
cache-latents`` writes them and ``data.latents`` reads them: the VAE does not run), and a bare
diffusers ``UNet2DConditionModel`` forward, backward and AdamW step at the same shape (what one
UNet costs, the anchor). Each variant is built, warmed up (compiling where it compiles), timed and
freed in turn. Reported: samples/s, MFU (the FLOPs of the step run, counted on the meta device,
against ``--peak-tflops``) and the step's peak memory.

    python benchmarks/bench_gpu.py --out benchmarks/results_gpu.md    # one GPU, about 8 minutes
    python benchmarks/bench_gpu.py --device cpu --tiny --repeat 2      # a smoke run on the CPU
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from table import compared, markdown, row

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"512x384": (512, 384, 16), "1024x768": (1024, 768, 4)}
TINY_STAGES = {"64x48": (64, 48, 2)}
SWITCHES = ("tf32", "channels_last", "compile", "frozen_bf16", "fused_adamw")
BASELINE = "every switch off"


def variants() -> dict[str, dict]:
    """Variant name -> the switches it turns on."""
    return {BASELINE: {}, **{f"{s} alone": {s: True} for s in SWITCHES},
            "all switches": dict.fromkeys(SWITCHES, True),
            "all switches, cached latents": {**dict.fromkeys(SWITCHES, True), "cached_latents": True}}


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cudnn.benchmark = on


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def leffa_step(args, switches: dict, height: int, width: int, batch_size: int):
    """(step function, FLOPs per step) of the LeffaModule with ``switches``."""
    from leffa.ema import TrainableView
    from leffa.module import LeffaModule
    from leffa.testing import make_batch
    from leffa.throughput import training_flops
    from leffa.vae_encoding import posterior_moments

    set_tf32(switches.get("tf32", False))
    torch.manual_seed(0)
    speed = {k: switches.get(k, False) for k in ("compile", "channels_last", "frozen_bf16")}
    module = LeffaModule(unet_config=args.unet_config, vae_config=args.vae_config, conditioning="tryon",
                         use_leffa_loss=True, theta_timestep=1000, p_drop_ref=0.0, trainable="all", speed=speed)
    module.setup("fit")
    batch = make_batch(batch_size, height, width, device=args.device)
    if switches.get("cached_latents"):  # computed once, before timing, as leffa cache-latents does offline
        batch["moments"] = posterior_moments(module.vae.to(args.device), "tryon", batch)
    flops = training_flops(module, batch)
    module = module.to(args.device).train()
    module.apply_speed(bf16=args.bf16)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=switches.get("fused_adamw", False))
    view = TrainableView(module)
    ema = AveragedModel(view, device=args.device, use_buffers=False, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    generator = torch.Generator().manual_seed(0)

    def step():
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = module.compute_loss(batch, generator, train=True)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update_parameters(view)

    return step, flops


def bare_unet_step(args, height: int, width: int, batch_size: int):
    """One stock diffusers UNet at the latent shape: forward, backward, AdamW (fused)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from leffa.pretrained import read_config

    set_tf32(False)
    torch.manual_seed(0)
    config = read_config(args.unet_config)
    unet = UNet2DConditionModel(**config).to(args.device).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=args.device == "cuda")
    latent = torch.randn(batch_size, config.get("in_channels", 4), height // 8, width // 8, device=args.device)
    text = torch.zeros(batch_size, 77, config["cross_attention_dim"], device=args.device)
    timesteps = torch.randint(0, 1000, (batch_size,), device=args.device)

    def forward_backward():
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            out = unet(latent, timesteps, encoder_hidden_states=text).sample
        out.float().square().mean().backward()

    with FlopCounterMode(display=False) as counter:
        forward_backward()
    unet.zero_grad(set_to_none=True)

    def step():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, counter.get_total_flops()


def measure(args, step, flops, batch_size: int) -> tuple[float, float | None, float | None]:
    """(samples/s, MFU or None, peak MiB or None) of ``step`` after the warm-up steps."""
    for _ in range(args.warmup):
        step()
    synchronize(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeat):
        synchronize(args.device)
        start = time.perf_counter()
        step()
        synchronize(args.device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    mfu = flops / seconds / (args.peak_tflops * 1e12) if flops and args.peak_tflops else None
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
    return batch_size / seconds, mfu, peak


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run(args) -> list[dict]:
    rows = []
    stages = TINY_STAGES if args.tiny else STAGES
    for stage in args.stages or stages:
        height, width, batch_size = stages[stage]
        setting = f"{Path(args.unet_config).stem}, batch {batch_size}, {height}x{width}" + (", bf16" if args.bf16 else "")
        stage_rows = []
        builds = {name: (lambda s=switches: leffa_step(args, s, height, width, batch_size))
                  for name, switches in variants().items()}
        builds["bare diffusers UNet (one UNet, no VAE, no Leffa)"] = lambda: bare_unet_step(args, height, width, batch_size)
        for name, build in builds.items():
            if args.only and name not in args.only and name != BASELINE:
                continue
            step, flops = build()
            rate, mfu, peak = measure(args, step, flops, batch_size)
            del step
            free(args.device)
            label = name + (f" (MFU {mfu:.0%})" if mfu is not None else "")
            print(f"[bench_gpu] {stage} {label}: {rate:.2f} samples/s", flush=True)
            stage_rows.append(row("training step", setting, label, rate, "samples/s", peak))
        rows += compared(stage_rows, stage_rows[0]["variant"])
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--tiny", action="store_true", help="the tiny model at 64x48 (a smoke run)")
    p.add_argument("--stages", nargs="+", default=None, help="stage shapes to run (default: all)")
    p.add_argument("--only", nargs="+", default=None, help="variants to run beside the baseline")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the device's dense bf16 peak for MFU (H100 SXM: 989); 0 leaves MFU out")
    p.add_argument("--out", default=None, help="also write the table, with the machine, to this file")
    args = p.parse_args(argv)
    model = "tiny" if args.tiny else "sd15"
    args.unet_config = str(ROOT / f"configs/model/{model}_unet.yaml")
    args.vae_config = str(ROOT / f"configs/model/{model}_vae.yaml")
    args.bf16 = args.device == "cuda"
    if args.device == "cpu":
        torch.set_num_threads(1)
        args.peak_tflops = 0.0
    table = markdown(run(args))
    print(table)
    if args.out:
        device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
        when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        Path(args.out).write_text(f"# Training speed (benchmarks/bench_gpu.py)\n\nMeasured {when} on {device}, "
                                  f"torch {torch.__version__}.\n\n{table}\n")


if __name__ == "__main__":
    main()
