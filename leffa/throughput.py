"""What a training run reports about its own size and speed: the samples of a batch (the
``batch_size_fn`` of Lightning's ``ThroughputMonitor``), the FLOPs of one training batch counted on
a meta-device copy of the module (the monitor's ``flops_per_batch``, hence MFU on GPUs), and the
global batch, logged once when training starts (:func:`report_training_start`)."""

from __future__ import annotations

import copy

import torch
from lightning.fabric.utilities.throughput import measure_flops
from lightning_utilities.core.apply_func import apply_to_collection
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

__all__ = ["batch_samples", "training_flops", "report_training_start"]


def batch_samples(batch: dict) -> int:
    """The number of samples in a batch (the batch contract's ``tgt`` is (B, 3, H, W))."""
    return int(batch["tgt"].shape[0])


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are on the meta device (shapes only: no
    memory, no compute); its other attributes (settings, scheduler, bank) are copied."""
    memo = {id(b): torch.empty(b.shape, dtype=b.dtype, device="meta") for b in module.buffers()}
    memo |= {id(p): nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)
             for p in module.parameters()}
    return copy.deepcopy(module, memo).to("meta")


def training_flops(module, batch: dict) -> int | None:
    """FLOPs of one training step on ``batch`` (``compute_loss``'s forward and backward, the VAE
    encoding included), counted on a meta-device copy of ``module`` with the batch's shapes. None,
    with one info line, when the count fails (e.g. a model sharded by FSDP, or an operation that
    has no meta implementation): the run then logs no MFU."""
    try:
        counted = meta_copy(module)
        # nested too: the cached latents' moments, {image: (mean, std)}
        shapes = apply_to_collection(batch, torch.Tensor, lambda v: torch.empty_like(v, device="meta"))
        generator = torch.Generator().manual_seed(0)  # a stream of its own: the run's stays untouched
        return measure_flops(counted, lambda: counted.compute_loss(shapes, generator, train=True)[0],
                             loss_fn=lambda loss: loss)
    except Exception as error:  # a report, never a reason to stop training
        rank_zero_info(f"no MFU: counting the FLOPs of a training batch failed ({type(error).__name__}: "
                       f"{str(error).splitlines()[0] if str(error) else ''})")
        return None


def report_training_start(module, batch: dict) -> None:
    """At the first training batch of a fit: log the global batch (devices x per-device batch x
    gradient accumulation) as one info line and as the hyper-parameter ``global_batch_size``, and,
    when a ``ThroughputMonitor`` is on the Trainer, set ``module.flops_per_batch`` (rank 0 only:
    the monitor runs there)."""
    trainer = module.trainer
    per_device, accumulate = batch_samples(batch), trainer.accumulate_grad_batches
    total = trainer.world_size * per_device * accumulate
    devices = f"{trainer.world_size} device{'s' if trainer.world_size > 1 else ''}"
    rank_zero_info(f"global batch {total} = {devices} x {per_device} per device x {accumulate} accumulated")
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_hyperparams({"global_batch_size": total})
        if any(isinstance(c, ThroughputMonitor) for c in trainer.callbacks):
            module.flops_per_batch = training_flops(module, batch)
