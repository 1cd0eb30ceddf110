"""Peak GPU memory of one fine-tuning step, counted without a GPU (``benchmarks/step_memory.py``).

For every trainable set (``all``, ``attention``, ``lora``) x optimizer (AdamW, 8-bit AdamW) x
gradient checkpointing (on, off): the real module with SD1.5's or SDXL's UNet and VAE shapes
(``--backbone``), the 12-channel ``released`` conditioning, batch 1, bf16-mixed, the EMA of the
trainable weights on the GPU (``leffa.ema.TrainableEMA``'s default), gradients kept across
accumulated micro-batches, clipping; one step under FakeTensorMode. Also the check at small size:
the same step of a small model on real CPU tensors, its peak from the allocator's records, against
the fake count.

    python benchmarks/train_memory.py                 # SD1.5, 1024x768 (about a minute per row on 2 cores)
    python benchmarks/train_memory.py --backbone sdxl --optimizer adamw   # SDXL-inpainting shapes
    python benchmarks/train_memory.py --height 512 --width 384 --trainable lora --optimizer adamw
    python benchmarks/train_memory.py --frozen-bf16 --trainable attention lora --optimizer adamw   # model.speed.frozen_bf16
    python benchmarks/train_memory.py --check-only    # the small-size check alone
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import subprocess
import sys
from pathlib import Path

import torch
from step_memory import (
    GIB, autocast_cache_bytes, init_optimizer_state, make_optimizer, profiled_peak, smallest_card, static_bytes,
    tracked_peak, training_step,
)
from table import add_output_flag, emit, row

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPTIMIZERS = {"adamw": "AdamW", "adamw8bit": "8-bit AdamW"}
# --backbone: its rows' label and the name of its configs/model/<name>_{unet,vae}.yaml
BACKBONES = {"sd15": "SD1.5", "sdxl": "SDXL"}
# the small-size check: (trainable, gradient checkpointing); the first peaks in AdamW's step, the
# others in backward
CHECK_CASES = (("all", False), ("attention", False), ("attention", True))


@contextlib.contextmanager
def moves_in_place_skipped():
    """peft moves each new LoRA layer to its base layer's device and dtype with ``Module.to``, which
    fails on fake tensors (``swap_tensors``: the fake mode holds weak references to them) even where
    nothing moves. While building, ``Module.to`` returns the module itself when every tensor is
    already on that device and of that dtype; any real move goes on as before."""
    to = torch.nn.Module.to

    def to_unless_in_place(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        tensors = itertools.chain(self.parameters(), self.buffers())
        if all((device is None or t.device == device) and (dtype is None or t.dtype == dtype or not t.is_floating_point())
               for t in tensors):
            return self
        return to(self, *args, **kwargs)

    torch.nn.Module.to = to_unless_in_place
    try:
        yield
    finally:
        torch.nn.Module.to = to


def build(unet_config, vae_config, trainable: str, checkpointing: bool, conditioning: str = "released",
          frozen_bf16: bool = False):
    from leffa.module import LeffaModule

    with moves_in_place_skipped():
        module = LeffaModule(unet_config=str(unet_config), vae_config=str(vae_config), conditioning=conditioning,
                             trainable=trainable, gradient_checkpointing=checkpointing, p_drop_ref=0.0,
                             speed={"frozen_bf16": frozen_bf16})
    module.apply_speed(bf16=True)  # the step runs under bf16 autocast (model.speed.frozen_bf16 applies)
    return module.train()


def make_batch(height: int, width: int) -> dict:
    mask = torch.zeros(1, 1, height, width)
    mask[:, :, height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1.0
    return {"tgt": torch.zeros(1, 3, height, width), "ref": torch.zeros(1, 3, height, width),
            "densepose": torch.zeros(1, 3, height, width), "mask": mask}


def measure(unet_config, vae_config, trainable: str, optimizer_kind: str, checkpointing: bool,
            height: int, width: int, frozen_bf16: bool = False) -> dict:
    """One step's tracked bytes (``start``, ``peak``, ``end``: :func:`step_memory.tracked_peak`) and
    the direct count of its weights, gradients, optimizer state and EMA."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.optim.swa_utils import AveragedModel

    from leffa.ema import TrainableView

    with FakeTensorMode():
        module = build(unet_config, vae_config, trainable, checkpointing, frozen_bf16=frozen_bf16)
        # what leffa.ema.TrainableEMA keeps on the module's device: an AveragedModel of the view
        ema = AveragedModel(TrainableView(module), use_buffers=False)
        optimizer = make_optimizer(optimizer_kind, (p for p in module.parameters() if p.requires_grad))
        init_optimizer_state(optimizer)  # gradients stay: the micro-batch of an accumulated step
        batch = make_batch(height, width)
        peak = tracked_peak(lambda: training_step(module, batch, optimizer), module, optimizer, ema,
                            list(batch.values()))
        counted = static_bytes(module, optimizer_kind)
        counted["autocast_cache"] = autocast_cache_bytes(module, checkpointing)
    return {"peak": peak, "counted": counted, "total": peak["peak"] + counted["autocast_cache"]}


def measure_in_child(unet_config, vae_config, trainable: str, optimizer_kind: str, checkpointing: bool,
                     height: int, width: int, frozen_bf16: bool = False) -> dict:
    """:func:`measure` in a process of its own: fake tensors under autocast have crashed a long-lived
    process at a later garbage collection, and each count starts from a clean slate this way."""
    done = subprocess.run([sys.executable, __file__, "--measure-one", trainable, optimizer_kind,
                           "on" if checkpointing else "off", "--unet-config", str(unet_config),
                           "--vae-config", str(vae_config), "--height", str(height), "--width", str(width)]
                          + (["--frozen-bf16"] if frozen_bf16 else []),
                          stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def check(height: int, width: int, trainable: str = "all", checkpointing: bool = False) -> dict:
    """The small-size agreement: the tiny model's step, its peak above what it held before, as the
    fake count has it (``fake``) and as the real CPU allocator recorded it (``real``), in bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    unet, vae = ROOT / "configs/model/tiny_unet.yaml", ROOT / "configs/model/tiny_vae.yaml"
    results = {}
    for fake in (True, False):
        with FakeTensorMode() if fake else torch.random.fork_rng():
            torch.manual_seed(0)
            module = build(unet, vae, trainable, checkpointing)
            optimizer = make_optimizer("adamw", (p for p in module.parameters() if p.requires_grad))
            init_optimizer_state(optimizer)
            batch = make_batch(height, width)

            def step():
                training_step(module, batch, optimizer)

            if fake:
                peak = tracked_peak(step, module, optimizer, list(batch.values()))
                results["fake"] = peak["peak"] - peak["start"]
            else:
                step()  # warm-up, then the gradients back as at the start
                init_optimizer_state(optimizer)
                results["real"] = profiled_peak(step)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="sd15", choices=list(BACKBONES),
                   help="the shapes counted: configs/model/<backbone>_{unet,vae}.yaml unless given below")
    p.add_argument("--unet-config", help="default: configs/model/<backbone>_unet.yaml")
    p.add_argument("--vae-config", help="default: configs/model/<backbone>_vae.yaml")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--trainable", nargs="+", default=["all", "attention", "lora"])
    p.add_argument("--optimizer", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    p.add_argument("--checkpointing", nargs="+", default=["on", "off"], choices=["on", "off"])
    p.add_argument("--check-height", type=int, default=64)
    p.add_argument("--check-width", type=int, default=48)
    p.add_argument("--check-only", action="store_true")
    p.add_argument("--frozen-bf16", action="store_true",
                   help="the frozen weights stored in bf16 (model.speed.frozen_bf16) in the rows")
    p.add_argument("--measure-one", nargs=3, metavar=("TRAINABLE", "OPTIMIZER", "CHECKPOINTING"),
                   help="print measure()'s result for one case as JSON (the parent runs each case so)")
    add_output_flag(p)
    args = p.parse_args(argv)
    args.unet_config = args.unet_config or str(ROOT / f"configs/model/{args.backbone}_unet.yaml")
    args.vae_config = args.vae_config or str(ROOT / f"configs/model/{args.backbone}_vae.yaml")
    torch.set_num_threads(1)
    if args.measure_one:
        trainable, optimizer, ckpt = args.measure_one
        print(json.dumps(measure(args.unet_config, args.vae_config, trainable, optimizer, ckpt == "on",
                                 args.height, args.width, args.frozen_bf16)), flush=True)
        return
    rows = []
    setting = f"tiny, batch 1, {args.check_height}x{args.check_width}, CPU"
    for trainable, checkpointing in CHECK_CASES:
        agreement = check(args.check_height, args.check_width, trainable, checkpointing)
        fake, real = agreement["fake"] / 2**20, agreement["real"] / 2**20
        case = f"{trainable}, checkpointing {'on' if checkpointing else 'off'}"
        print(f"[train_memory] check {case}: fake {fake:.3f} MiB, real {real:.3f} MiB", file=sys.stderr, flush=True)
        rows += [row("train step memory check", setting, f"{case}: fake count", fake, "MiB", fake),
                 row("train step memory check", setting, f"{case}: CPU allocator", real, "MiB", real,
                     vs=f"{case}: fake count", ratio=real / fake, mem_ratio=real / fake)]
    if not args.check_only:
        shapes = (f"{BACKBONES[args.backbone]}, batch 1, {args.height}x{args.width}, bf16"
                  + (", frozen weights bf16" if args.frozen_bf16 else ""))
        for trainable in args.trainable:
            for optimizer in args.optimizer:
                for ckpt in args.checkpointing:
                    r = measure_in_child(args.unet_config, args.vae_config, trainable, optimizer, ckpt == "on",
                                         args.height, args.width, args.frozen_bf16)
                    peak, counted = r["peak"], r["counted"]
                    total = r["total"]
                    card = smallest_card(total)
                    variant = (f"{trainable}, {OPTIMIZERS[optimizer]}, checkpointing {ckpt}: "
                               f"{counted['trainable_params'] / 1e6:.1f} M trainable; fits "
                               + (f"{card} GB" if card else "no card up to 80 GB"))
                    print(f"[train_memory] {variant}; "
                          f"{ {k: round(v / GIB, 2) for k, v in peak.items()} } "
                          f"counted { {k: round(v / GIB, 2) for k, v in counted.items() if k != 'trainable_params'} }",
                          file=sys.stderr, flush=True)
                    rows.append(row("train step memory", shapes, variant, total / GIB, "GiB", total / 2**20))
    emit(rows, args.json)


if __name__ == "__main__":
    main()
