"""Training-speed switches (``model.speed``), each measured on and off by ``make bench-gpu``.

None of them changes what is computed beyond floating-point rounding (tests compare each against
the plain step): they change how. What each does:

- ``compile``: ``torch.compile`` per block (regional), not the whole model: every transformer block
  and every ResNet block of the UNets is compiled on its own, in place. The attention processors'
  reference bank and Leffa captures are Python state written inside the transformer blocks, which
  dynamo traces as side effects; LoRA (peft's layers sit inside the compiled blocks) keeps working
  (tested). FSDP2 shards the compiled blocks (``fully_shard`` after compile, the order torchtitan
  uses; not yet run: ``make test-gpu`` holds no such case). Refused, in one
  line: with ``gradient_checkpointing`` (diffusers checkpoints the blocks around the compiled ones,
  and the recomputation of a compiled block in backward saves other tensors than its forward did:
  torch's checkpoint stops with a metadata mismatch) and with ``FSDPStrategy`` (FSDP1 flattens the
  parameters under the compiled code).
- ``channels_last``: the UNets and the VAE in channels_last memory format, the layout GPU
  convolution kernels prefer (inputs follow the weights).
- ``frozen_bf16``: under a bf16 precision (``bf16-mixed``, ``bf16-true``) the frozen weights are
  stored in bf16: the VAE always, and the frozen UNet weights under ``trainable: attention`` or
  ``lora``. Half their memory, and autocast does not cast them again at every use. Trainable
  weights, their gradients, the optimizer and the EMA stay float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from leffa.errors import UserError

__all__ = ["SpeedSettings", "apply_speed", "compile_blocks", "refuse_compile_with", "use_channels_last",
           "store_frozen_in_bf16", "pinned_copy", "autocast_on"]


@dataclass
class SpeedSettings:
    """``model.speed``: see the module docstring.

    Args:
        compile: ``torch.compile`` every transformer and ResNet block of the UNets (regional).
        channels_last: UNets and VAE in channels_last memory format.
        frozen_bf16: frozen weights stored in bf16 under a bf16 precision.
    """

    compile: bool = False
    channels_last: bool = False
    frozen_bf16: bool = False


COMPILED_BLOCKS = (BasicTransformerBlock, ResnetBlock2D)


def compile_blocks(unet: nn.Module) -> int:
    """Compile every transformer and ResNet block of ``unet`` in place; returns how many."""
    blocks = [m for m in unet.modules() if isinstance(m, COMPILED_BLOCKS)]
    for block in blocks:
        block.compile()
    return len(blocks)


def refuse_compile_with(strategy=None, gradient_checkpointing: bool = False) -> None:
    """One line for a setting or strategy that compiled blocks do not work under."""
    from lightning.pytorch.strategies import FSDPStrategy

    if gradient_checkpointing:
        raise UserError("model.speed.compile: not with model.gradient_checkpointing (a compiled block recomputed "
                        "in backward saves other tensors than its forward did); turn one of them off")
    if isinstance(strategy, FSDPStrategy):
        raise UserError("model.speed.compile: not with FSDPStrategy (FSDP1 flattens the parameters the compiled "
                        "blocks read); use ModelParallelStrategy (FSDP2, configs/strategy/fsdp2*.yaml) or DDP")


def use_channels_last(*modules: nn.Module) -> None:
    """Put the 4-D weights of ``modules`` in channels_last memory format, in place."""
    for module in modules:
        module.to(memory_format=torch.channels_last)


@torch.no_grad()
def store_frozen_in_bf16(module: nn.Module) -> int:
    """Store every frozen floating-point parameter of ``module`` in bf16, in place; returns how many
    values. Trainable parameters are left as they are."""
    count = 0
    for parameter in module.parameters():
        if not parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != torch.bfloat16:
            parameter.data = parameter.data.to(torch.bfloat16)
            count += parameter.numel()
    return count


def pinned_copy(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` (on the CPU) on ``device``: to a CUDA device through pinned memory without making
    the host wait (a copy from pageable memory waits for the device to finish its queued work)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, dtype, non_blocking=True)
    return tensor.to(device, dtype)


def autocast_on(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type (False for types autocast does not know, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


def apply_speed(module, settings: SpeedSettings, applied: set[str], bf16: bool) -> None:
    """Apply ``settings`` to a ``LeffaModule``, each switch once (``applied`` records which): its UNets
    and VAE in channels_last, its frozen weights in bf16 when ``bf16`` (a bf16 precision), its UNets'
    blocks compiled. Before any sharding (FSDP2 shards the compiled blocks in ``configure_model``)."""
    unets = list(module.denoiser.components().values())
    wanted = {"channels_last": settings.channels_last, "frozen_bf16": settings.frozen_bf16 and bf16,
              "compile": settings.compile}
    for switch in [s for s, on in wanted.items() if on and s not in applied]:
        if switch == "channels_last":
            use_channels_last(*unets, module.vae)
        elif switch == "frozen_bf16":
            store_frozen_in_bf16(module)
        else:
            for unet in unets:
                compile_blocks(unet)
        applied.add(switch)
