"""Fully sharded data parallelism for the two UNets: FSDP2 (``fully_shard``) under Lightning's
``ModelParallelStrategy``, and the wrap policy of Lightning's ``FSDPStrategy`` (FSDP1).

Applied from outside the model, by ``LeffaModule.configure_model``; the model files stay
single-device. ``ModelParallelStrategy`` builds the device mesh and also runs on CPU (gloo), so the
sharded code path is tested without a GPU. Units, for both: every ``BasicTransformerBlock`` and
``ResnetBlock2D`` (their parameters are all-gathered just before they run and freed after), then
each UNet's remaining parameters (``conv_in``, time embedding, projections, ``conv_out``, ...).

What stays as it is:
  * the VAE: frozen, used under ``no_grad``; FSDP2 leaves a full copy on every rank;
  * the attention processors: ``ConcatAttention`` (and its register tokens) is a submodule of its
    ``BasicTransformerBlock``, so its parameters are gathered with the block's;
  * the ``ReferenceBank``: it holds activations (plain tensors), not parameters, from the
    Reference UNet's forward to the Generative UNet's.

One constraint shapes the units: the bank hands the *input of each self-attention*, a tensor from
inside a Reference UNet transformer block, to the Generative UNet. The loss reaches such a block's
``norm1`` through the bank, not through the block's output, while FSDP re-gathers a freed block
only when the gradient reaches its output (for the last blocks it never does: their output feeds
only the unused ``conv_out``). So a Reference UNet transformer block keeps its parameters gathered
from its forward to its backward: FSDP2 with ``reshard_after_forward=False``; FSDP1 by not wrapping
it (it joins the root unit, which FSDP1 keeps gathered between forward and backward). Otherwise
the backward fails: "The tensor has a non-zero number of elements, but its data is not allocated
yet" (FSDP2), "expected to be in states [FORWARD_BACKWARD]" (FSDP1).
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

from leffa.attention import ReferenceBank, ReferenceRecorder
from leffa.errors import UserError

__all__ = [
    "SHARDED_BLOCKS",
    "is_sharding",
    "shard_unets",
    "is_sharded",
    "fsdp_wrap_policy",
    "refuse_unshardable_callbacks",
    "freeze_unused_reference_parameters",
]

# the FSDP units inside each UNet: the blocks that hold most of the parameters
SHARDED_BLOCKS = (BasicTransformerBlock, ResnetBlock2D)


# ---------------------------------------------------------------- units


def is_sharding(strategy: Strategy) -> bool:
    """Whether ``strategy`` shards parameters (FSDP1 or FSDP2)."""
    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` itself."""
    return isinstance(module, FSDPModule)


def _is_reference_block(module: nn.Module) -> bool:
    # a Reference UNet transformer block: its self-attention records into the bank
    return isinstance(module, BasicTransformerBlock) and isinstance(module.attn1.processor, ReferenceRecorder)


def fsdp_wrap_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """``auto_wrap_policy`` for Lightning's ``FSDPStrategy`` (FSDP1, GPU): wrap every
    ``ResnetBlock2D`` and every Generative UNet ``BasicTransformerBlock``; Reference UNet
    transformer blocks stay in the root unit (see the module docstring), and so does the frozen
    VAE. The signature of ``torch.distributed.fsdp.wrap.lambda_auto_wrap_policy``'s callables."""
    if recurse:
        return True  # look inside every module
    return isinstance(module, SHARDED_BLOCKS) and not _is_reference_block(module)


# ---------------------------------------------------------------- FSDP2 (ModelParallelStrategy)


def shard_unets(generative_unet: nn.Module, reference_unet: nn.Module | None, mesh: DeviceMesh,
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
        reference_unet: the Reference UNet (its processors record into the bank); None for a
            single-UNet architecture (``concat_unet``), whose blocks all reshard after forward.
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
        if unet is None or is_sharded(unet):
            continue
        for block in unet.modules():
            if isinstance(block, SHARDED_BLOCKS):
                fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=not _is_reference_block(block))
                units += 1
        # the root unit: the UNet's remaining parameters; it also starts the blocks' prefetching
        fully_shard(unet, mesh=mesh, mp_policy=policy)
        units += 1
    return units


# ---------------------------------------------------------------- what sharding needs of the rest


def refuse_unshardable_callbacks(strategy: Strategy, callbacks: list) -> None:
    """Raise if a sharding strategy meets a callback that cannot work with sharded parameters.

    * ``WeightAveraging`` (``EMAWeightAveraging``) keeps a full deep copy of the module and
      updates it parameter by parameter from the live one; sharded parameters allow neither
      (FSDP2 refuses ``deepcopy``; FSDP1's live parameters are local shards of another shape).
    * a callback that runs the model on rank 0 alone (one with an ``unsharded_forward`` attribute
      saying what to use instead, e.g. ``SampleGrid`` and ``FlowPictures``): a sharded forward is a
      collective (every rank all-gathers each block), so rank 0 would wait for the others until
      the process group times out (30 minutes by default).

    Failing at start-up names the fix instead of a traceback from inside ``deepcopy``, a hang at
    the first validation, or a silently wrong average.
    """
    if not is_sharding(strategy):
        return
    problems = []
    for callback in callbacks:
        if isinstance(callback, WeightAveraging):
            problems.append(f"{type(callback).__name__} keeps an unsharded copy of the model and updates it from "
                            "the sharded parameters (train with DDPStrategy to keep EMA weights)")
        elif getattr(callback, "unsharded_forward", None):
            problems.append(f"{type(callback).__name__} runs the sharded model on rank 0 alone and would hang "
                            f"({callback.unsharded_forward})")
    if problems:
        raise UserError(f"with {type(strategy).__name__}, remove from trainer.callbacks: " + "; ".join(problems))


def freeze_unused_reference_parameters(reference_unet: nn.Module, bank: ReferenceBank) -> list[str]:
    """Set ``requires_grad=False`` on the Reference UNet parameters that no recorded self-attention
    input depends on, and return their names: its head (the last transformer block after its
    self-attention input, ``proj_out``, ``conv_norm_out``, ``conv_out``), whose output nothing
    reads, in training or sampling. They never get a gradient, so training is unchanged.

    Called when the model is built (``leffa.architectures.dual_unet``), so every strategy trains
    the same set, each member of which gets a gradient at every step. Why: DDP would otherwise
    need ``find_unused_parameters=True`` (a walk of the autograd graph at every step); under
    ``ModelParallelStrategy`` the optimizer holds no state for such parameters, while its resume
    (``--ckpt_path``) loads optimizer state for every parameter the optimizer has and fails
    ("Missing key in checkpoint state_dict: optimizer_0.state.reference_unet....step"); and the
    optimizer and the EMA would carry tensors that never move. Frozen, they leave all of them.

    Found by one forward of the Reference UNet traced on the meta device (no memory, no compute):
    autograd says which parameters the recorded features depend on.
    """
    from torch.func import functional_call

    # (1, C, s, s) with s = 2**levels: every level of the UNet gets at least a 2x2 grid
    size = 2 ** len(reference_unet.down_blocks)
    trainable = {n: p for n, p in reference_unet.named_parameters() if p.requires_grad}
    if not trainable:
        return []
    meta = {n: torch.empty_like(p, device="meta").requires_grad_(n in trainable)
            for n, p in reference_unet.named_parameters()}
    meta |= {n: torch.empty_like(b, device="meta") for n, b in reference_unet.named_buffers()}
    sample = torch.zeros(1, reference_unet.config.in_channels, size, size, device="meta")
    timestep = torch.zeros(1, dtype=torch.long, device="meta")
    # gradient checkpointing would recompute blocks in backward with the real parameters; the
    # dependencies are the same without it
    checkpointing = reference_unet.is_gradient_checkpointing
    reference_unet.disable_gradient_checkpointing()
    bank.features.clear()
    try:
        with torch.enable_grad():
            functional_call(reference_unet, meta, (sample, timestep), {"encoder_hidden_states": None})
            recorded = sum(feature.sum() for feature in bank.features.values())
            grads = torch.autograd.grad(recorded, [meta[n] for n in trainable], allow_unused=True)
    finally:
        bank.features.clear()
        if checkpointing:
            reference_unet.enable_gradient_checkpointing()
    unused = [n for n, g in zip(trainable, grads) if g is None]
    for name in unused:
        trainable[name].requires_grad_(False)
    return unused


def shard_for_strategy(module, trainer) -> None:
    """``LeffaModule.configure_model``: under a sharding strategy, refuse the callbacks that cannot
    work with a sharded model and, under ``ModelParallelStrategy`` (it gives a device mesh), shard
    the denoiser with FSDP2 (``FSDPStrategy`` wraps the model itself after the hook). Under DDP or
    one device, nothing. A bf16 Trainer (``bf16-mixed``, ``bf16-true``) also all-gathers and computes
    in bf16; the sharded master weights and the gradient reduction stay float32."""
    if not is_sharding(trainer.strategy):
        return
    refuse_unshardable_callbacks(trainer.strategy, trainer.callbacks)
    mesh = module.device_mesh
    if mesh is None:
        return
    if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
        raise UserError(f"the UNets have no tensor-parallel plan: use tensor_parallel_size=1, "
                        f"got {mesh['tensor_parallel'].size()} (mesh {mesh})")
    param_dtype = torch.bfloat16 if str(trainer.precision).startswith("bf16") else None
    module.denoiser.shard(mesh["data_parallel"], param_dtype)
