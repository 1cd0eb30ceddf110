"""Fully sharded data parallelism for the denoiser's networks: FSDP2 (``fully_shard``) under
Lightning's ``ModelParallelStrategy``, and the wrap policy of Lightning's ``FSDPStrategy`` (FSDP1).

Applied from outside the model, by ``LeffaModule.configure_model``, which asks the architecture to
shard its networks (``ReferenceDenoiser.shard``, by default :func:`shard_modules` over its
components); the model files stay single-device. ``ModelParallelStrategy`` builds the device mesh
and also runs on CPU (gloo), so the sharded code path is tested without a GPU. Units, for both:
every ``BasicTransformerBlock`` and ``ResnetBlock2D`` (their parameters are all-gathered just
before they run and freed after), then each network's remaining parameters (``conv_in``, time
embedding, projections, ``conv_out``, ...).

What stays as it is:
  * the VAE: frozen, used under ``no_grad``; FSDP2 leaves a full copy on every rank;
  * the attention processors: a processor that holds parameters (``dual_unet``'s register tokens)
    is a submodule of its ``BasicTransformerBlock``, so its parameters are gathered with the block's;
  * the ``ReferenceBank``: it holds activations (plain tensors), not parameters, from the
    Reference UNet's forward to the Generative UNet's.

One constraint shapes the units: ``dual_unet``'s bank hands the *input of each self-attention*, a
tensor from inside a Reference UNet transformer block, to the Generative UNet. The loss reaches
such a block's ``norm1`` through the bank, not through the block's output, while FSDP re-gathers a
freed block only when the gradient reaches its output (for the last blocks it never does: their
output feeds only the unused ``conv_out``). So a block whose self-attention processor says
``keeps_gathered`` (the Reference UNet's recorders) keeps its parameters gathered from its forward
to its backward: FSDP2 with ``reshard_after_forward=False``; FSDP1 by not wrapping it (it joins the
root unit, which FSDP1 keeps gathered between forward and backward). Otherwise the backward fails:
"The tensor has a non-zero number of elements, but its data is not allocated yet" (FSDP2),
"expected to be in states [FORWARD_BACKWARD]" (FSDP1).
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

from leffa.errors import UserError

__all__ = [
    "SHARDED_BLOCKS",
    "is_sharding",
    "shard_modules",
    "is_sharded",
    "fsdp_wrap_policy",
    "refuse_unshardable_callbacks",
    "refuse_under_sharding",
    "clip_gradients",
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


def _keeps_gathered(module: nn.Module) -> bool:
    # a transformer block whose self-attention hands its input out (a processor with keeps_gathered)
    return isinstance(module, BasicTransformerBlock) and getattr(module.attn1.processor, "keeps_gathered", False)


def fsdp_wrap_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """``auto_wrap_policy`` for Lightning's ``FSDPStrategy`` (FSDP1, GPU): wrap every
    ``ResnetBlock2D`` and every Generative UNet ``BasicTransformerBlock``; Reference UNet
    transformer blocks stay in the root unit (see the module docstring), and so does the frozen
    VAE. The signature of ``torch.distributed.fsdp.wrap.lambda_auto_wrap_policy``'s callables."""
    if recurse:
        return True  # look inside every module
    return isinstance(module, SHARDED_BLOCKS) and not _keeps_gathered(module)


# ---------------------------------------------------------------- FSDP2 (ModelParallelStrategy)


def shard_modules(networks, mesh: DeviceMesh, param_dtype: torch.dtype | None = None) -> int:
    """Apply ``fully_shard`` over ``mesh`` to each block of each network, then to each network;
    returns the number of FSDP units made. A network that is already sharded is left alone, so the
    call is idempotent (Lightning may call ``configure_model`` more than once).

    Blocks whose self-attention ``keeps_gathered`` (the Reference UNet's) keep their gathered
    parameters from their forward until their backward (``reshard_after_forward=False``; see the
    module docstring). The cost: those blocks' full parameters (in ``param_dtype``) stay in memory
    through the rest of the forward and the backward.

    Args:
        networks: the denoiser's networks (``ReferenceDenoiser.components().values()``).
        mesh: the 1-D data-parallel mesh (``device_mesh["data_parallel"]``).
        param_dtype: dtype the parameters are all-gathered and computed in (e.g. ``torch.bfloat16``);
            gradients are still reduced in float32 and the sharded master weights stay float32.
            None: compute in the parameters' own dtype.
    """
    if mesh.ndim != 1:
        raise ValueError(f"shard_modules wants a 1-D data-parallel mesh, got {mesh.ndim} dimensions: {mesh}")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    units = 0
    for network in networks:
        if is_sharded(network):
            continue
        for block in network.modules():
            if isinstance(block, SHARDED_BLOCKS):
                fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=not _keeps_gathered(block))
                units += 1
        # the root unit: the network's remaining parameters; it also starts the blocks' prefetching
        fully_shard(network, mesh=mesh, mp_policy=policy)
        units += 1
    return units


# ---------------------------------------------------------------- what sharding needs of the rest


def refuse_unshardable_callbacks(strategy: Strategy, callbacks: list) -> None:
    """Raise if a sharding strategy meets a callback that cannot work with sharded parameters.

    * ``WeightAveraging`` (``EMAWeightAveraging``) keeps a full deep copy of the module and
      updates it parameter by parameter from the live one; sharded parameters allow neither
      (FSDP2 refuses ``deepcopy``; FSDP1's live parameters are local shards of another shape).
    Failing at start-up names the fix instead of a traceback from inside ``deepcopy`` or a silently
    wrong average. (Callbacks of the project's own that run the model on rank 0 alone refuse
    themselves: :func:`refuse_under_sharding`.)
    """
    if not is_sharding(strategy):
        return
    problems = []
    for callback in callbacks:
        if isinstance(callback, WeightAveraging):
            problems.append(f"{type(callback).__name__} keeps an unsharded copy of the model and updates it from "
                            "the sharded parameters (train with DDPStrategy to keep EMA weights)")
    if problems:
        raise UserError(f"with {type(strategy).__name__}, remove from trainer.callbacks: " + "; ".join(problems))


def refuse_under_sharding(trainer, callback, instead: str) -> None:
    """For a callback that runs the model on rank 0 alone (``SampleGrid``, ``FlowPictures``): one
    error line under a sharding strategy, where a forward is a collective (every rank all-gathers
    each block), so rank 0 would wait for the others until the process group times out (30
    minutes by default). ``instead`` says what to use."""
    if is_sharding(trainer.strategy):
        raise UserError(f"with {type(trainer.strategy).__name__}, remove from trainer.callbacks: "
                        f"{type(callback).__name__} runs the sharded model on rank 0 alone and would hang ({instead})")


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


def clip_gradients(module, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
    """``LeffaModule.configure_gradient_clipping``: Lightning's clipping (``trainer.gradient_clip_val``),
    except by norm under ``FSDPStrategy``: its precision plugin refuses that (a norm over one rank's
    shards is not the total), so the FSDP root module's own ``clip_grad_norm_`` (over all ranks) clips."""
    strategy = module.trainer.strategy
    if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(strategy, FSDPStrategy):
        strategy.model.clip_grad_norm_(gradient_clip_val)
        return
    module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
