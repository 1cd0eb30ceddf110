"""The attention processors of the paper's architecture (Sec. 3.1; ``dual_unet``), added to stock
diffusers UNets.

The Reference UNet runs first; its processors (:class:`ReferenceRecorder`) record the input of every
self-attention layer in the shared :class:`~leffa.attention.ReferenceBank`. The matching layer of
the Generative UNet (:class:`ConcatAttention`) then attends from its own queries over
``[generative keys ; reference keys (; register keys)]``. Queries are computed for the generative
tokens only: the paper's "concatenate, attend, keep the first half" gives exactly this output,
because each output row depends only on its own query. Layers selected for the Leffa loss also hand
out their queries and reference keys (Sec. 3.2-3.3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from leffa.attention import (
    LeffaCapture, ReferenceBank, check_plain_self_attention, finish_attention, project_qkv, self_attention_layers,
    set_self_attention_processors,
)

__all__ = ["ReferenceRecorder", "ConcatAttention", "attach_reference_attention", "freeze_unused_reference_parameters"]


class ReferenceRecorder:
    """Reference UNet processor: records the layer's input, then runs plain self-attention."""

    #: the recorded input reaches the loss through the bank, not through the block's output: under
    #: FSDP the block keeps its parameters gathered from forward to backward (``leffa.parallel``)
    keeps_gathered = True

    def __init__(self, bank: ReferenceBank, name: str):
        self.bank, self.name = bank, name

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        check_plain_self_attention(attn, hidden_states)
        self.bank.features[self.name] = hidden_states
        q, k, v = project_qkv(attn, hidden_states)
        return finish_attention(attn, F.scaled_dot_product_attention(q, k, v), hidden_states)


class ConcatAttention(nn.Module):
    """Generative UNet processor: own queries over ``[own keys ; reference keys ; register keys]``.

    Args:
        bank: the shared reference bank.
        name: the layer's name, the same in both UNets.
        dim: the layer's input width (the hidden size C of its tokens).
        num_registers: learnable register tokens (Darcet et al. 2024, cited in Sec. 3.2). Our reading
            of the paper: per layer, R extra input tokens of width C that are projected by the layer's
            own ``to_k``/``to_v`` and appended to the keys and values, so queries can put attention
            somewhere other than the reference when no region fits. 0 turns them off.
    """

    def __init__(self, bank: ReferenceBank, name: str, dim: int, num_registers: int = 0):
        super().__init__()
        self.bank, self.name = bank, name
        self.registers = nn.Parameter(torch.randn(num_registers, dim) / math.sqrt(dim)) if num_registers else None

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        check_plain_self_attention(attn, hidden_states)
        reference = self.bank.features.get(self.name)
        if reference is None:
            raise RuntimeError(f"no reference features for layer {self.name}: run the Reference UNet first")
        batch, n, _ = hidden_states.shape
        if reference.shape[0] != batch:
            raise ValueError(f"layer {self.name}: {batch} generative samples but {reference.shape[0]} references")
        parts = [hidden_states, reference.to(hidden_states.dtype)]
        if self.registers is not None:
            parts.append(self.registers.to(hidden_states.dtype).expand(batch, -1, -1))
        # (B, n + m + R, C): the key/value tokens of the concatenated attention
        context = torch.cat(parts, dim=1)
        q, k, v = project_qkv(attn, hidden_states, context)
        self._maybe_capture(q, k, n, reference.shape[1])
        return finish_attention(attn, F.scaled_dot_product_attention(q, k, v), hidden_states)

    def _maybe_capture(self, q: torch.Tensor, k: torch.Tensor, n: int, m: int) -> None:
        grid = self.bank.grid_of(m)
        if not self.bank.wants_capture(grid):
            return
        rows = self.bank.capture_rows
        # keys (B, heads, n + m + R, d) -> reference part (b, heads, m, d), registers (b, heads, R, d)
        register_key = k[rows, :, n + m:] if self.registers is not None else None
        self.bank.captures[self.name] = LeffaCapture(q[rows], k[rows, :, n:n + m], register_key, grid)


def attach_reference_attention(generative_unet: nn.Module, reference_unet: nn.Module,
                               num_registers: int = 0, bank: ReferenceBank | None = None) -> ReferenceBank:
    """Install :class:`ReferenceRecorder` in the Reference UNet and :class:`ConcatAttention` in the
    Generative UNet, layer by layer; returns the bank they share."""
    bank = bank or ReferenceBank()
    if self_attention_layers(generative_unet).keys() != self_attention_layers(reference_unet).keys():
        raise ValueError("the Generative and Reference UNets must have the same self-attention layers")
    set_self_attention_processors(reference_unet, lambda name, layer: ReferenceRecorder(bank, name))
    set_self_attention_processors(
        generative_unet, lambda name, layer: ConcatAttention(bank, name, layer.to_k.in_features, num_registers))
    return bank


def freeze_unused_reference_parameters(reference_unet: nn.Module, bank: ReferenceBank) -> list[str]:
    """Set ``requires_grad=False`` on the Reference UNet parameters that no recorded self-attention
    input depends on, and return their names: its head (the last transformer block after its
    self-attention input, ``proj_out``, ``conv_norm_out``, ``conv_out``), whose output nothing
    reads, in training or sampling. They never get a gradient, so training is unchanged.

    Called when the model is built (:class:`~leffa.architectures.dual_unet.DualUNet`), so every strategy trains
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
