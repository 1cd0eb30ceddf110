"""Where one training step's time goes, at each stage shape of the try-on configs.

The real :class:`leffa.module.LeffaModule` (dual UNet, every weight trained, the Leffa loss on every
sample, bf16 autocast on a GPU) runs the steps of a fit by hand: the loss, backward, gradient
clipping with the non-finite check, AdamW, the EMA of the trainable weights. Each part is timed
with the device synchronised around it (so parts do not overlap; the total is a little above an
unsynchronised step), inside ``torch.profiler.record_function`` ranges of the same names for a
trace. The forward is split into VAE encodes, Reference UNet, Generative UNet forward and the
Leffa flow and loss; "forward, other" is the rest (conditioning, noise, the selection draws).
On a GPU, host syncs per step (``.item()``, ``.tolist()``, copies to the host) are counted over one
unsynchronised step by CUDA's sync debug mode, and ``--trace`` writes that step's torch-profiler
trace. Data wait is not part of this step (see ``loader_throughput.py``).

    python benchmarks/gpu_profile.py                                  # CPU, tiny model: a smoke run
    python benchmarks/gpu_profile.py --device cuda --sd15 --trace out # SD1.5 shapes, stage batches, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from table import add_output_flag, emit, row

ROOT = Path(__file__).resolve().parents[1]
# (height, width, per-device batch) of configs/vton_512.yaml and configs/vton_1024.yaml
STAGES = {"512x384": (512, 384, 16), "1024x768": (1024, 768, 4)}
TINY_STAGES = {"64x48": (64, 48, 2)}
FORWARD_PARTS = ("VAE encode", "Reference UNet", "Generative UNet forward", "Leffa flow and loss")


class Regions:
    """Seconds per named part, the device synchronised at each boundary; off: only the ranges."""

    def __init__(self, device: str):
        self.device, self.timing = device, True
        self.seconds: dict[str, float] = defaultdict(float)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def region(self, name: str):
        with torch.profiler.record_function(name):
            if not self.timing:
                yield
                return
            self.sync()
            start = time.perf_counter()
            yield
            self.sync()
            self.seconds[name] += time.perf_counter() - start

    def wrap(self, owner, attribute: str, name: str) -> None:
        """Time every call of ``owner.attribute`` as ``name`` (an instance attribute over the method)."""
        method = getattr(owner, attribute)

        def timed(*args, **kwargs):
            with self.region(name):
                return method(*args, **kwargs)

        setattr(owner, attribute, timed)


def build(args, height: int, width: int, batch_size: int):
    from leffa.ema import TrainableView
    from leffa.module import LeffaModule
    from leffa.testing import make_batch

    torch.manual_seed(0)
    module = LeffaModule(unet_config=args.unet_config, vae_config=args.vae_config, conditioning="tryon",
                         use_leffa_loss=True, theta_timestep=1000, p_drop_ref=0.0, trainable="all")
    module.setup("fit")
    module = module.to(args.device).train()
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    view = TrainableView(module)
    ema = AveragedModel(view, device=args.device, use_buffers=False, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    return module, optimizer, view, ema, make_batch(batch_size, height, width, device=args.device)


def profile_stage(args, height: int, width: int, batch_size: int) -> list[dict]:
    module, optimizer, view, ema, batch = build(args, height, width, batch_size)
    regions = Regions(args.device)
    regions.wrap(module, "encode", "VAE encode")
    regions.wrap(module.denoiser, "encode_reference", "Reference UNet")
    regions.wrap(module.denoiser, "denoise", "Generative UNet forward")
    regions.wrap(module, "leffa_loss", "Leffa flow and loss")
    params = [p for p in module.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)

    def step():
        with regions.region("forward"):
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
                loss = module.compute_loss(batch, generator, train=True)[0]
        with regions.region("backward"):
            loss.backward()
        with regions.region("clipping and non-finite check"):
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            if not bool(torch.isfinite(norm) & torch.isfinite(loss.detach())):  # one host sync, as in a fit
                raise RuntimeError("non-finite loss or gradient")
        with regions.region("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with regions.region("EMA"):
            ema.update_parameters(view)

    for _ in range(args.warmup):
        step()
    regions.seconds.clear()
    regions.sync()
    start = time.perf_counter()
    for _ in range(args.repeat):
        step()
    regions.sync()
    total = (time.perf_counter() - start) / args.repeat

    regions.timing = False  # the steps below run as in a fit, without the timing synchronisations
    syncs = count_host_syncs(step) if args.device == "cuda" else None
    if args.trace:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if args.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            step()
            regions.sync()
        Path(args.trace).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(args.trace) / f"step_{height}x{width}.json"))

    per_step = {name: seconds / args.repeat for name, seconds in regions.seconds.items()}
    forward_other = per_step.pop("forward") - sum(per_step.get(part, 0.0) for part in FORWARD_PARTS)
    parts = {**{part: per_step.get(part, 0.0) for part in FORWARD_PARTS}, "forward, other": forward_other,
             **{k: v for k, v in per_step.items() if k not in FORWARD_PARTS}}
    setting = (f"{Path(args.unet_config).stem}, batch {batch_size}, {height}x{width}" + (", bf16" if args.bf16 else ""))
    timed = sum(parts.values())
    rows = [row("step profile", setting, f"{name} ({seconds / timed:.0%})", seconds * 1000, "ms")
            for name, seconds in parts.items()]
    rows.append(row("step profile", setting, "step, synchronised parts summed", timed * 1000, "ms"))
    rows.append(row("step profile", setting, f"step, measured ({batch_size / total:.2f} samples/s)", total * 1000, "ms"))
    if syncs is not None:
        rows.append(row("step profile", setting, "host syncs per step", float(syncs), "syncs"))
    return rows


def count_host_syncs(step) -> int:
    """How often one call of ``step`` makes the host wait for the GPU (CUDA's sync debug mode warns
    at each such call)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sd15", action="store_true", help="SD1.5's UNet and VAE shapes (random weights), the stage sizes")
    p.add_argument("--unet-config", default=None, help="default: tiny, or SD1.5 with --sd15")
    p.add_argument("--vae-config", default=None)
    p.add_argument("--stages", nargs="+", default=None, help="stage shapes to run (default: all of the setting)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--trace", default=None, help="folder for a Chrome trace of the profiled step per stage")
    add_output_flag(p)
    args = p.parse_args(argv)
    model = "sd15" if args.sd15 else "tiny"
    args.unet_config = args.unet_config or str(ROOT / f"configs/model/{model}_unet.yaml")
    args.vae_config = args.vae_config or str(ROOT / f"configs/model/{model}_vae.yaml")
    args.bf16 = args.device == "cuda"
    if args.device == "cpu":
        torch.set_num_threads(1)
    stages = STAGES if args.sd15 else TINY_STAGES
    rows = []
    for name in args.stages or stages:
        rows += profile_stage(args, *stages[name])
    emit(rows, args.json)


if __name__ == "__main__":
    main()
