"""Cost of the Leffa loss, measured side by side in one run.

1. One training step of the tiny model without and with the Leffa loss (time, peak memory).
2. ``attention_flow`` (one fused attention call) against the naive explicit-matrix flow at growing
   token counts (time of forward + backward, peak memory).
3. Generative-query-only concatenated attention against the literal concat-then-slice.

Each case runs in its own process so that its peak memory is its own (CPU: peak RSS above the RSS
before the timed work; CUDA: ``max_memory_allocated``). Usage::

    python benchmarks/leffa_overhead.py                     # CPU, tiny model, small sizes
    python benchmarks/leffa_overhead.py --device cuda --bf16 --height 1024 --width 768 --batch 2 \\
        --unet-config configs/model/sd15_unet.yaml --vae-config configs/model/sd15_vae.yaml
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from table import add_output_flag, compared, emit, row

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- measuring


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakRSS:
    """Samples the process RSS every millisecond in a thread; CPU torch has no allocator statistics."""

    def __enter__(self):
        self.peak, self._stop = _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(fn, device: str, warmup: int, repeat: int) -> dict:
    """Median seconds of ``fn()`` and the peak memory it used above what was held before."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    times = []
    with PeakRSS() as rss:
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - before if device == "cuda" else rss.peak - before
    return {"seconds": statistics.median(times), "peak_bytes": max(peak, 0)}


# ---------------------------------------------------------------- cases (run in a child process)


STEP_VARIANTS = {"baseline": dict(use_leffa_loss=False), "leffa_t500": dict(use_leffa_loss=True, theta_timestep=500),
                 "leffa_t1000": dict(use_leffa_loss=True, theta_timestep=1000)}


def case_step(args) -> dict:
    """Training steps of the tiny model, the variants interleaved step by step in this one process,
    so that they see the same machine state (timings of separate processes drifted by 30%)."""
    from leffa.module import LeffaModule

    from leffa.testing import make_batch

    batch = make_batch(args.batch, args.height, args.width, device=args.device)
    modules, optimizers = {}, {}
    for name, options in STEP_VARIANTS.items():
        torch.manual_seed(0)
        module = LeffaModule(unet_config=args.unet_config, vae_config=args.vae_config, p_drop_ref=0.0,
                             **options)
        module.setup("fit")
        modules[name] = module.to(args.device).train()
        optimizers[name] = module.configure_optimizers()
    # the same draw at every step and in every variant: the same samples pass theta_timestep
    seed = half_selected_seed(modules["leffa_t500"], batch)

    def step(module, optimizer):
        generator = torch.Generator().manual_seed(seed)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = module.compute_loss(batch, generator, train=False)[0]
        loss.backward()
        optimizer.step()

    steps = {name: functools.partial(step, modules[name], optimizers[name]) for name in modules}
    results = {name: {"times": [], "peak_bytes": 0} for name in steps}
    for i in range(args.warmup + args.repeat):
        for name, step in steps.items():
            one = measure(step, args.device, warmup=0, repeat=1)
            if i >= args.warmup:
                results[name]["times"].append(one["seconds"])
                results[name]["peak_bytes"] = max(results[name]["peak_bytes"], one["peak_bytes"])
    for name, result in results.items():
        result["seconds"] = statistics.median(result.pop("times"))
        rows = modules[name].bank.capture_rows
        result["leffa_samples"] = 0 if rows is None else int(rows.numel())
        result["leffa_layers"] = len(modules[name].bank.captures)
    return results


def half_selected_seed(module, batch: dict) -> int:
    """The first generator seed whose draw sends half the batch below ``module``'s theta_timestep,
    so that variant shows the cost of the usual case (the draw order is the module's own)."""
    size = batch["tgt"].shape[0]
    with torch.no_grad():
        for seed in range(100):
            module.compute_loss(batch, torch.Generator().manual_seed(seed), train=False)[0]
            if module.bank.capture_rows.numel() == size // 2:
                return seed
    raise RuntimeError(f"no seed below 100 draws {size // 2} of {size} timesteps below "
                       f"{module.hparams.theta_timestep}")


def _qk(args, n):
    g = torch.Generator().manual_seed(0)
    shape = (1, args.heads, n, args.head_dim)
    q = torch.randn(shape, generator=g).to(args.device).requires_grad_()
    k = torch.randn(shape, generator=g).to(args.device).requires_grad_()
    return q, k


def _grid(n: int) -> tuple[int, int]:
    """A token grid (h, w) with h*w = n, as close to a 4:3 portrait as n allows."""
    h = min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - math.sqrt(n * 4 / 3)))
    return h, n // h


def case_flow(args) -> dict:
    from leffa.losses import attention_flow, coordinate_map

    n = args.tokens
    q, k = _qk(args, n)
    grid = _grid(n)

    def fused():
        attention_flow(q, k, grid, pad_values=True).sum().backward()

    def fused_2wide():
        attention_flow(q, k, grid, pad_values=False).sum().backward()

    def naive():
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) / 2.0, dim=-1).mean(1)
        (attn @ coordinate_map(*grid, device=q.device)).sum().backward()

    variants = {"fused": fused, "fused_2wide": fused_2wide, "naive": naive}
    result = measure(variants[args.variant], args.device, args.warmup, args.repeat)
    if args.device == "cuda" and args.variant == "fused":
        result["backends"] = flow_backends(q, k, grid)
    return result


def flow_backends(q, k, grid) -> dict:
    """Which SDPA kernels accept the flow call, with C as given (2 wide) and zero-padded to d."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from leffa.losses import attention_flow

    found = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        for pad in (False, True):
            try:
                with sdpa_kernel(backend):
                    attention_flow(q.detach().bfloat16(), k.detach().bfloat16(), grid, pad_values=pad)
                found[f"{backend.name}{'+pad' if pad else ''}"] = "ok"
            except RuntimeError:
                found[f"{backend.name}{'+pad' if pad else ''}"] = "refused"
    return found


def case_concat(args) -> dict:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from leffa.architectures.dual_unet_attention import ConcatAttention
    from leffa.attention import ReferenceBank

    torch.manual_seed(0)
    dim = args.heads * args.head_dim
    attn = Attention(query_dim=dim, heads=args.heads, dim_head=args.head_dim).to(args.device)
    g = torch.Generator().manual_seed(0)
    gen = torch.randn(2, args.tokens, dim, generator=g).to(args.device).requires_grad_()
    ref = torch.randn(2, args.tokens, dim, generator=g).to(args.device).requires_grad_()
    bank = ReferenceBank(latent_hw=_grid(args.tokens))
    bank.features["layer"] = ref
    ours, literal = ConcatAttention(bank, "layer", dim), AttnProcessor2_0()

    def queries_only():
        ours(attn, gen).sum().backward()

    def concat_then_slice():
        literal(attn, torch.cat([gen, ref], dim=1))[:, : args.tokens].sum().backward()

    return measure(queries_only if args.variant == "ours" else concat_then_slice, args.device, args.warmup, args.repeat)


CASES = {"step": case_step, "flow": case_flow, "concat": case_concat}


# ---------------------------------------------------------------- driver


def run_case(args, case: str, **overrides) -> dict:
    cmd = [sys.executable, __file__, "--case", case]
    options = {**{k: v for k, v in vars(args).items() if k not in ("case", "token_counts", "json")}, **overrides}
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd += [flag] if value else [f"--no-{key.replace('_', '-')}"]
        elif value is not None:
            cmd += [flag, str(value)]
    # A fixed mmap threshold: glibc then maps every large tensor on its own and unmaps it when freed,
    # so the sampled RSS follows the live tensors (with the default, growing threshold, freed memory
    # stays in the heap and a later step's peak is invisible).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def _row(bench: str, setting: str, variant: str, result: dict) -> dict:
    return row(bench, setting, variant, result["seconds"] * 1e3, "ms", result["peak_bytes"] / 2**20)


STEP_LABELS = {"baseline": "baseline (diffusion loss)", "leffa_t500": "+ Leffa, theta_t 500",
               "leffa_t1000": "+ Leffa, theta_t 1000"}


def rows(args) -> list[dict]:
    out = []
    precision = " bf16" if args.bf16 else ""
    unet = Path(args.unet_config).stem
    steps = run_case(args, "step")
    setting = f"{unet}, batch {args.batch}, {args.height}x{args.width}{precision}"
    step_rows = [_row("Leffa step", setting, STEP_LABELS[name], res) for name, res in steps.items()]
    for r, res in zip(step_rows[1:], list(steps.values())[1:]):
        r["variant"] += f" ({res['leffa_samples']}/{args.batch} samples, {res['leffa_layers']} layers)"
    out += compared(step_rows, STEP_LABELS["baseline"])

    for n in args.token_counts:
        setting = f"{n} tokens, {args.heads} heads x {args.head_dim}"
        results = {v: run_case(args, "flow", tokens=n, variant=v) for v in ("fused", "fused_2wide", "naive")}
        if "backends" in results["fused"]:
            print(f"SDPA kernels for the flow at {n} tokens: {results['fused']['backends']}", file=sys.stderr)
        labels = {"fused": "fused, C padded to d", "fused_2wide": "fused, C 2 wide", "naive": "naive matrix"}
        out += compared([_row("attention flow", setting, labels[v], r) for v, r in results.items()],
                        labels["fused"])

    for n in args.token_counts:
        setting = f"{n} tokens, batch 2"
        ours = _row("concat attention", setting, "generative queries only",
                    run_case(args, "concat", tokens=n, variant="ours"))
        literal = _row("concat attention", setting, "concat then slice",
                       run_case(args, "concat", tokens=n, variant="literal"))
        out += compared([ours, literal], ours["variant"])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--unet-config", default=str(ROOT / "configs/model/tiny_unet.yaml"))
    p.add_argument("--vae-config", default=str(ROOT / "configs/model/tiny_vae.yaml"))
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=40, help="SD1.5's first level: 320 channels / 8 heads")
    p.add_argument("--token-counts", type=int, nargs="+", default=[1024, 3072, 6144])
    p.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    add_output_flag(p)
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(CASES[args.case](args)))
        return
    emit(rows(args), args.json)


if __name__ == "__main__":
    main()
