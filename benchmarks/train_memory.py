"""Peak GPU memory of one fine-tuning step, counted without a GPU (``benchmarks/step_memory.py``).

For every trainable set (``all``, ``attention``, ``lora``) x optimizer (AdamW, 8-bit AdamW) x
gradient checkpointing (on, off): the real module with SD1.5's UNet and VAE shapes, the 12-channel
``released`` conditioning, batch 1, bf16-mixed, the EMA of the trainable weights on the GPU
(``leffa.ema.TrainableEMA``'s default), gradients kept across accumulated micro-batches, clipping;
one step under FakeTensorMode. Also the check at small size: the same step of a small model on
real CPU tensors, its peak from the allocator's records, against the fake count.

    python benchmarks/train_memory.py                 # SD1.5, 1024x768 (about a minute per row on 2 cores)
    python benchmarks/train_memory.py --height 512 --width 384 --trainable lora --optimizer adamw
    python benchmarks/train_memory.py --check-only    # the small-size check alone
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from step_memory import (
    GIB, init_optimizer_state, make_optimizer, profiled_peak, smallest_card, static_bytes, tracked_peak,
    training_step,
)
from table import add_output_flag, emit, row

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPTIMIZERS = {"adamw": "AdamW", "adamw8bit": "8-bit AdamW"}


def build(unet_config, vae_config, trainable: str, checkpointing: bool, conditioning: str = "released"):
    from leffa.module import LeffaModule

    module = LeffaModule(unet_config=str(unet_config), vae_config=str(vae_config), conditioning=conditioning,
                         trainable=trainable, gradient_checkpointing=checkpointing, p_drop_ref=0.0)
    return module.train()


def make_batch(height: int, width: int) -> dict:
    mask = torch.zeros(1, 1, height, width)
    mask[:, :, height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1.0
    return {"tgt": torch.zeros(1, 3, height, width), "ref": torch.zeros(1, 3, height, width),
            "densepose": torch.zeros(1, 3, height, width), "mask": mask}


def measure(unet_config, vae_config, trainable: str, optimizer_kind: str, checkpointing: bool,
            height: int, width: int, fake: bool = True) -> dict:
    """One step's peak (bytes by kind) and the direct count of its weights, gradients and state."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.optim.swa_utils import AveragedModel

    from leffa.ema import TrainableEMA, TrainableView

    del TrainableEMA  # (the EMA below is what TrainableEMA keeps: an AveragedModel of the view)
    with FakeTensorMode() if fake else torch.random.fork_rng():
        torch.manual_seed(0)
        module = build(unet_config, vae_config, trainable, checkpointing)
        ema = AveragedModel(TrainableView(module), use_buffers=False)
        optimizer = make_optimizer(optimizer_kind, (p for p in module.parameters() if p.requires_grad))
        init_optimizer_state(optimizer)  # gradients stay: the micro-batch of an accumulated step
        batch = make_batch(height, width)
        peak = tracked_peak(lambda: training_step(module, batch, optimizer), module, optimizer, ema,
                            list(batch.values()))
        counted = static_bytes(module, optimizer_kind)
    return {"peak": peak, "counted": counted}


def check(args) -> dict:
    """The small-size agreement: the fake count of one step against the real CPU allocator's peak."""
    unet, vae = ROOT / "configs/model/tiny_unet.yaml", ROOT / "configs/model/tiny_vae.yaml"
    results = {}
    for fake in (True, False):
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() if fake else torch.random.fork_rng():
            torch.manual_seed(0)
            module = build(unet, vae, "all", False)
            optimizer = make_optimizer("adamw", module.parameters())
            init_optimizer_state(optimizer)
            batch = make_batch(args.check_height, args.check_width)

            def step():
                training_step(module, batch, optimizer)

            if fake:
                peak = tracked_peak(step, module, optimizer, list(batch.values()))
                results["fake"] = peak["peak"] - peak["start"]
            else:
                step()  # warm-up: lazily made kernels' buffers
                init_optimizer_state(optimizer)
                results["real"] = profiled_peak(step)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unet-config", default=str(ROOT / "configs/model/sd15_unet.yaml"))
    p.add_argument("--vae-config", default=str(ROOT / "configs/model/sd15_vae.yaml"))
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--trainable", nargs="+", default=["all", "attention", "lora"])
    p.add_argument("--optimizer", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    p.add_argument("--checkpointing", nargs="+", default=["on", "off"], choices=["on", "off"])
    p.add_argument("--check-height", type=int, default=64)
    p.add_argument("--check-width", type=int, default=48)
    p.add_argument("--check-only", action="store_true")
    add_output_flag(p)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    agreement = check(args)
    rows = [row("train step memory check", f"tiny, batch 1, {args.check_height}x{args.check_width}, CPU",
                "fake count (activations)", agreement["fake"] / 2**20, "MiB", agreement["fake"] / 2**20),
            row("train step memory check", f"tiny, batch 1, {args.check_height}x{args.check_width}, CPU",
                "real CPU allocator", agreement["real"] / 2**20, "MiB", agreement["real"] / 2**20,
                vs="fake count (activations)", ratio=agreement["real"] / agreement["fake"],
                mem_ratio=agreement["real"] / agreement["fake"])]
    print(f"[train_memory] check: fake {agreement['fake'] / 2**20:.2f} MiB, real {agreement['real'] / 2**20:.2f} MiB",
          file=sys.stderr, flush=True)
    if not args.check_only:
        for trainable in args.trainable:
            for optimizer in args.optimizer:
                for ckpt in args.checkpointing:
                    r = measure(args.unet_config, args.vae_config, trainable, optimizer, ckpt == "on",
                                args.height, args.width)
                    peak, counted = r["peak"], r["counted"]
                    card = smallest_card(peak["peak"])
                    variant = (f"{trainable}, {OPTIMIZERS[optimizer]}, checkpointing {ckpt}: "
                               f"{counted['trainable_params'] / 1e6:.1f} M trainable; fits "
                               + (f"{card} GB" if card else "no card up to 80 GB"))
                    print(f"[train_memory] {variant}; "
                          f"{ {k: round(v / GIB, 2) for k, v in peak.items()} } "
                          f"counted { {k: round(v / GIB, 2) for k, v in counted.items() if k != 'trainable_params'} }",
                          file=sys.stderr, flush=True)
                    rows.append(row("train step memory", f"SD1.5, batch 1, {args.height}x{args.width}, bf16",
                                    variant, peak["peak"] / GIB, "GiB", peak["peak"] / 2**20))
    emit(rows, args.json)


if __name__ == "__main__":
    main()
