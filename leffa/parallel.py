"""Fully sharded data parallelism for the two UNets: FSDP2 (``fully_shard``) and the wrap policy
of Lightning's ``FSDPStrategy`` (FSDP1).

Applied from outside the model, in ``LeffaModule.configure_model`` under Lightning's
``ModelParallelStrategy`` (which builds the device mesh and also runs on CPU with gloo); the
model files stay single-device. Order, as in torchtitan's ``parallelize.py``: every
``BasicTransformerBlock`` and ``ResnetBlock2D`` becomes its own FSDP unit (its parameters are
all-gathered just before it runs and freed after), then each UNet as a whole becomes a root unit
for the parameters left over (``conv_in``, time embedding, projections, ``conv_out``, ...).

What stays as it is:
  * the VAE: frozen, used under ``no_grad``, so every rank keeps a full copy;
  * the attention processors: ``ConcatAttention`` (and its register tokens) is a submodule of its
    ``BasicTransformerBlock``, so its parameters are gathered with the block's; it is invoked by
    the block's forward, never on its own;
  * the ``ReferenceBank``: it holds activations (plain tensors), not parameters, between the
    Reference UNet's forward and the Generative UNet's.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from leffa.attention import ReferenceRecorder

__all__ = ["SHARDED_BLOCKS", "shard_unets", "is_sharded", "fsdp_wrap_policy", "refuse_weight_averaging"]

# the FSDP units inside each UNet: the blocks that hold most of the parameters
SHARDED_BLOCKS = (BasicTransformerBlock, ResnetBlock2D)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` itself."""
    return isinstance(module, FSDPModule)


def _is_reference_block(module: nn.Module) -> bool:
    # a Reference UNet transformer block: its self-attention records into the bank
    return isinstance(module, BasicTransformerBlock) and isinstance(module.attn1.processor, ReferenceRecorder)


def fsdp_wrap_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """``auto_wrap_policy`` for Lightning's ``FSDPStrategy`` (FSDP1, GPU): wrap every
    ``ResnetBlock2D`` and every Generative UNet ``BasicTransformerBlock``; Reference UNet
    transformer blocks stay in the root unit (see the module docstring). The VAE, frozen, is in
    the root unit too. Signature of ``torch.distributed.fsdp.wrap.lambda_auto_wrap_policy``."""
    if recurse:
        return True  # look inside every module
    return isinstance(module, SHARDED_BLOCKS) and not _is_reference_block(module)


def shard_unets(generative_unet: nn.Module, reference_unet: nn.Module, mesh: DeviceMesh,
                param_dtype: torch.dtype | None = None) -> int:
    """Apply ``fully_shard`` over ``mesh`` to each block of both UNets, then to each UNet; returns
    the number of FSDP units made. A UNet that is already sharded is left alone, so the call is
    idempotent (Lightning may call ``configure_model`` more than once).

    The Reference UNet's transformer blocks keep their gathered parameters from their forward
    until their backward (``reshard_after_forward=False``; see the module docstring). The cost:
    those blocks' full parameters (in ``param_dtype``) stay in memory through the Generative
    UNet's forward and the backward.

    Args:
        generative_unet: the Generative UNet.
        reference_unet: the Reference UNet (its processors record into the bank).
        mesh: the 1-D data-parallel mesh (``device_mesh["data_parallel"]``).
        param_dtype: dtype the parameters are all-gathered and computed in (e.g. ``torch.bfloat16``);
            gradients are still reduced in float32 and the sharded master weights stay float32.
            None: compute in the parameters' own dtype.
    """
    if mesh.ndim != 1:
        raise ValueError(f"shard_unets wants a 1-D data-parallel mesh, got {mesh.ndim} dimensions: {mesh}")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    units = 0
    for unet in (generative_unet, reference_unet):
        if is_sharded(unet):
            continue
        for block in unet.modules():
            if isinstance(block, SHARDED_BLOCKS):
                fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=not _is_reference_block(block))
                units += 1
        # the root unit: the UNet's remaining parameters; it also starts the blocks' prefetching
        fully_shard(unet, mesh=mesh, mp_policy=policy)
        units += 1
    return units


def refuse_weight_averaging(strategy: Strategy, callbacks: list) -> None:
    """Raise if a sharding strategy meets Lightning's ``WeightAveraging`` (``EMAWeightAveraging``).

    The callback keeps a full deep copy of the module and updates it parameter by parameter from
    the live one; sharded parameters allow neither (FSDP2 refuses ``deepcopy``; FSDP1's live
    parameters are local shards of another shape). Failing here names the fix instead of a
    traceback from inside ``deepcopy`` or a silently wrong average.
    """
    if not isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        return
    averaging = [type(c).__name__ for c in callbacks if isinstance(c, WeightAveraging)]
    if averaging:
        raise ValueError(
            f"{', '.join(averaging)} cannot run with {type(strategy).__name__}: it keeps an unsharded copy of "
            "the model and updates it from the sharded parameters. Remove it from trainer.callbacks, or train "
            "with DDPStrategy to keep EMA weights."
        )
