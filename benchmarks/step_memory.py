"""Peak memory of one training step, counted without a GPU.

The real :class:`leffa.module.LeffaModule` runs one step (forward, backward, gradient clipping,
optimizer step) under torch's ``FakeTensorMode`` (tensors with shapes and dtypes but no data, so
SD1.5 at 1024x768 costs seconds and no memory) while :class:`LiveBytes` adds up the bytes of every
live tensor storage after every operation; its maximum is the step's peak.

What a CUDA bf16-mixed step does differently from the fake CPU step, and how it is matched:

* autocast: the step runs under CPU bf16 autocast with CUDA's policy for the normalisation layers
  (:func:`cuda_autocast_policy`: ``group_norm``, ``layer_norm`` and ``softmax`` in float32, as
  CUDA autocast runs them; CPU autocast would keep them in bf16). Other ops follow CPU autocast,
  whose bf16 list (convolutions, matmuls, attention) is CUDA's. Attention is the fused kernel
  (CUDA: flash attention, saving its output and log-sum-exp, as the CPU flash kernel does).
* autocast's weight cache is off (with it on, fake tensors crash the process): CUDA's cache keeps
  the bf16 copy of every trainable weight until the forward ends, which costs nothing extra
  where backward saves that copy anyway, but 2 bytes per trainable parameter under gradient
  checkpointing; :func:`autocast_cache_bytes` adds that as a bound.
* AdamW: ``foreach=True`` as ``torch.optim.AdamW`` defaults to on CUDA (its step holds one float32
  temporary per trainable parameter).
* 8-bit AdamW (``bitsandbytes``, which needs a GPU): :class:`AdamW8bitState` allocates the state
  bitsandbytes' ``AdamW8bit`` keeps (two uint8 moments per parameter plus a float32 scale per
  256 values; float32 moments for tensors under 4096 values) and updates nothing.

Counted: parameters, buffers, gradients, optimizer state, the EMA copy, activations and every
temporary of the step, each storage at its exact size. Not counted: the CUDA context, cuBLAS and
cuDNN workspaces, the caching allocator's rounding and fragmentation (see :func:`smallest_card`'s
margin).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import weakref

import torch
import torch.nn.functional as F
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

__all__ = ["cuda_autocast_policy", "AdamW8bitState", "training_step", "tracked_peak", "profiled_peak",
           "LiveBytes", "static_bytes", "autocast_cache_bytes", "smallest_card", "CARDS_GIB", "MARGIN_GIB", "FRAGMENTATION"]

# common cards, GiB of memory; what must stay free besides the tracked peak: the CUDA context with
# cuBLAS/cuDNN workspaces (about 1 GiB) and the caching allocator's fragmentation (10% of the peak)
CARDS_GIB = (12, 16, 24, 40, 80)
MARGIN_GIB = 1.0
FRAGMENTATION = 0.10
GIB = 1024 ** 3
# CUDA autocast runs these in float32 (CPU autocast leaves them in the input's dtype)
FLOAT32_OPS = ("group_norm", "layer_norm", "softmax", "log_softmax")


@contextlib.contextmanager
def cuda_autocast_policy():
    """CPU bf16 autocast that runs :data:`FLOAT32_OPS` in float32, as CUDA autocast does: while
    on, those ``torch.nn.functional`` functions take float32 inputs under CPU autocast."""
    originals = {name: getattr(F, name) for name in FLOAT32_OPS}

    def in_float32(function):
        @functools.wraps(function)
        def wrapper(input, *args, **kwargs):
            if torch.is_autocast_enabled("cpu") and input.dtype in (torch.bfloat16, torch.float16):
                with torch.autocast("cpu", enabled=False):
                    args, kwargs = tree_map_only(
                        torch.Tensor, lambda t: t.float() if t.dtype in (torch.bfloat16, torch.float16) else t,
                        (args, kwargs))
                    return function(input.float(), *args, **kwargs)
            return function(input, *args, **kwargs)
        return wrapper

    for name, function in originals.items():
        setattr(F, name, in_float32(function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(F, name, function)


class AdamW8bitState(torch.optim.Optimizer):
    """The optimizer state of ``bitsandbytes.optim.AdamW8bit`` (block-wise 8-bit moments), for
    counting memory where bitsandbytes cannot run: allocates it on the first step, updates nothing."""

    BLOCK = 256
    MIN_8BIT_SIZE = 4096

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or self.state[p]:
                    continue
                state = self.state[p]
                state["step"] = 0
                if p.numel() < self.MIN_8BIT_SIZE:
                    state["state1"] = torch.zeros_like(p, dtype=torch.float32)
                    state["state2"] = torch.zeros_like(p, dtype=torch.float32)
                    continue
                blocks = -(-p.numel() // self.BLOCK)
                for i in (1, 2):
                    state[f"state{i}"] = torch.zeros_like(p, dtype=torch.uint8)
                    state[f"absmax{i}"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)


def make_optimizer(kind: str, params):
    """``adamw`` (torch's AdamW, foreach as on CUDA) or ``adamw8bit`` (:class:`AdamW8bitState`)."""
    params = list(params)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, foreach=True)
    if kind == "adamw8bit":
        return AdamW8bitState(params)
    raise ValueError(f"unknown optimizer {kind!r}")


def init_optimizer_state(optimizer) -> None:
    """One optimizer step on zero gradients, so the state exists as it does after the first step."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()


def training_step(module, batch: dict, optimizer, clip: float | None = 1.0, bf16: bool = True) -> None:
    """One micro-batch of a step with gradient accumulation, then the optimizer step: forward and
    backward (adding to the gradients already there), clipping, step, gradients set to None."""
    generator = torch.Generator().manual_seed(0)
    # the float32 policy stays on through backward: checkpointed blocks recompute under autocast there
    with cuda_autocast_policy() if bf16 else contextlib.nullcontext():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            loss = module.compute_loss(batch, generator, train=False)[0]
        loss.backward()
    del loss
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class LiveBytes(TorchDispatchMode):
    """Adds up the bytes of every live tensor storage: those given to :meth:`hold` and every
    output of an operation run under this mode, each until its storage is freed; ``peak`` is the
    most at any moment. Works on fake tensors (their storages have sizes but no data)."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = self.peak = 0

    def hold(self, *objects) -> None:
        """Count tensors that exist already (any nesting of tensors, modules, optimizers, dicts, lists)."""
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                self.hold(list(obj.parameters()), list(obj.buffers()),
                          [p.grad for p in obj.parameters() if p.grad is not None])
            elif isinstance(obj, torch.optim.Optimizer):
                self.hold(list(obj.state.values()))
            elif isinstance(obj, torch.Tensor):
                self._add(obj)
            elif isinstance(obj, dict):
                self.hold(*obj.values())
            elif isinstance(obj, (list, tuple)):
                self.hold(*obj)

    def _add(self, tensor: torch.Tensor) -> None:
        for storage in get_untyped_storages(tensor):
            key = storage._cdata
            if key in self._live:
                continue
            size = storage.nbytes()
            self._live[key] = (weakref.ref(storage, functools.partial(self._free, key)), size)
            self.current += size
            self.peak = max(self.peak, self.current)

    def _free(self, key: int, _ref) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[1]

    def __exit__(self, *exc):
        # drop the weak references (and their callbacks) once the count is over
        self._live.clear()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._add, out)
        return out


def tracked_peak(fn, *held) -> dict[str, int]:
    """Run ``fn()`` under :class:`LiveBytes`; ``held`` (modules with their gradients, optimizers,
    tensors) exist before it and count from the start. Returns ``start`` (bytes held before
    ``fn``), ``peak`` (the most at once during it) and ``end``."""
    with LiveBytes() as tracker:
        tracker.hold(*held)
        start = tracker.current
        tracker.peak = start
        fn()
        gc.collect()
        end = tracker.current
    return {"start": start, "peak": tracker.peak, "end": end}


def profiled_peak(fn) -> int:
    """Real CPU tensors: the most bytes allocated at once by ``fn()`` above what was allocated
    before it, from the allocator's own records (the profiler's memory events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes, nodes = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        if node.tag == _EventType.Allocation:  # alloc_size: + allocated, - freed
            changes.append((node.start_time_ns, node.extra_fields.alloc_size))
        nodes.extend(node.children)
    live = peak = 0
    for _, change in sorted(changes, key=lambda c: c[0]):
        live += change
        peak = max(peak, live)
    return peak


def static_bytes(module, optimizer_kind: str, ema: bool = True) -> dict[str, int]:
    """A direct count of what a step holds besides activations: every weight (float32), the
    gradients and optimizer state of the trainable ones, and their float32 EMA copy."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    weights += sum(b.numel() * b.element_size() for b in module.buffers())
    grads = sum(p.numel() * p.element_size() for p in trainable)
    if optimizer_kind == "adamw":
        state = sum(8 * p.numel() + 4 for p in trainable)
    else:
        small = [p for p in trainable if p.numel() < AdamW8bitState.MIN_8BIT_SIZE]
        large = [p for p in trainable if p.numel() >= AdamW8bitState.MIN_8BIT_SIZE]
        state = sum(8 * p.numel() for p in small)
        state += sum(2 * p.numel() + 8 * -(-p.numel() // AdamW8bitState.BLOCK) for p in large)
    return {"weights": weights, "gradients": grads, "optimizer": state, "ema": grads if ema else 0,
            "trainable_params": sum(p.numel() for p in trainable)}


def autocast_cache_bytes(module, checkpointing: bool) -> int:
    """What autocast's weight cache adds to the counted peak (see the module docstring): the bf16
    copies of the trainable weights under gradient checkpointing, else nothing."""
    return sum(2 * p.numel() for p in module.parameters() if p.requires_grad) if checkpointing else 0


def smallest_card(peak_bytes: float) -> int | None:
    """The smallest of :data:`CARDS_GIB` that holds ``peak_bytes`` plus the fragmentation share and
    :data:`MARGIN_GIB`; None when none does."""
    need = peak_bytes * (1 + FRAGMENTATION) / GIB + MARGIN_GIB
    return next((card for card in CARDS_GIB if need <= card), None)
