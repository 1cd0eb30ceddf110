"""Spatially concatenated self-attention (Leffa paper, Sec. 3.1), added to stock diffusers UNets
through attention processors.

The Reference UNet runs first; its processors record the input of every self-attention layer in a
shared :class:`ReferenceBank`. The matching layer of the Generative UNet then attends from its own
queries over ``[generative keys ; reference keys (; register keys)]``. Queries are computed for the
generative tokens only: the paper's "concatenate, attend, keep the first half" gives exactly this
output, because each output row depends only on its own query. Layers selected for the Leffa loss
also hand out their queries and reference keys (Sec. 3.2-3.3).

:class:`WidthConcatAttention` is the single-UNet form (``concat_unet``): the UNet's input holds
person and garment side by side, so its self-attention already spans both; a Leffa layer hands out
the person half's queries and the garment half's keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from leffa.errors import UserError

__all__ = [
    "ReferenceBank",
    "LeffaCapture",
    "ReferenceRecorder",
    "ConcatAttention",
    "token_grid",
    "attach_reference_attention",
    "WidthConcatAttention",
    "attach_width_concat_attention",
]


@dataclass
class LeffaCapture:
    """What one Leffa layer hands to the loss, for the selected samples only: a plain record, read by
    ``leffa.losses.leffa_loss`` (and ``capture_flow``)."""

    query: torch.Tensor  # (b, heads, n, d) generative queries
    key: torch.Tensor  # (b, heads, h*w, d) reference keys
    register_key: torch.Tensor | None  # (b, heads, R, d) or None
    grid: tuple[int, int]  # (h, w) of the token grid


@dataclass
class ReferenceBank:
    """State shared by the processors of both UNets during one forward pass.

    ``features`` is filled by the Reference UNet and read by the Generative UNet; it is kept until
    the next reference pass, so gradient checkpointing can recompute blocks in backward and sampling
    can reuse it at every step. ``captures`` is filled for the rows in ``capture_rows`` at layers
    whose token grid is finer than ``theta_resolution`` of the image height.
    """

    features: dict[str, torch.Tensor] = field(default_factory=dict)
    latent_hw: tuple[int, int] | None = None
    image_hw: tuple[int, int] | None = None
    theta_resolution: float = 1.0 / 32
    capture_rows: torch.Tensor | None = None
    captures: dict[str, LeffaCapture] = field(default_factory=dict)

    def begin(self, latent_hw: tuple[int, int], image_hw: tuple[int, int] | None = None,
              rows: torch.Tensor | None = None) -> None:
        """Start a forward pass at latent size ``latent_hw``; Leffa captures are taken for the samples
        ``rows`` (none when None) at layers selected against the image height of ``image_hw``."""
        self.latent_hw, self.image_hw, self.capture_rows = tuple(latent_hw), image_hw, rows
        self.captures.clear()

    def grid_of(self, num_tokens: int) -> tuple[int, int]:
        if self.latent_hw is None:
            raise RuntimeError("ReferenceBank.latent_hw is unset: set it before running the UNets")
        return token_grid(num_tokens, self.latent_hw)

    def wants_capture(self, grid: tuple[int, int]) -> bool:
        if self.capture_rows is None or self.capture_rows.numel() == 0 or self.image_hw is None:
            return False
        # Sec. 3.3, attention layer selection: h / H > theta_resolution
        return grid[0] / self.image_hw[0] > self.theta_resolution


def token_grid(num_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) token grid of an attention layer, found by halving the latent size (ceil, as the
    UNet's stride-2 convolutions with padding 1 do) until h*w matches ``num_tokens``."""
    h, w = latent_hw
    while h * w > num_tokens:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != num_tokens:
        raise ValueError(f"{num_tokens} tokens is no downsampling of the latent grid {latent_hw}")
    return h, w


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    # (B, n, heads*d) -> (B, heads, n, d)
    batch, n, inner = x.shape
    return x.view(batch, n, heads, inner // heads).transpose(1, 2)


def _norm_width(norm: nn.Module) -> int | None:
    """The width a query/key norm normalises over (LayerNorm, diffusers' RMSNorm), None for others."""
    shape = getattr(norm, "normalized_shape", None)
    if shape is None and isinstance(getattr(norm, "dim", None), torch.Size):
        shape = norm.dim
    return shape[-1] if shape else None


def _heads(attn: Attention, project: nn.Module, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
    """``project(x)`` split into heads (B, heads, n, d), with the layer's query/key norm applied as
    diffusers' own processor does: per head, or over all heads (``*_across_heads``) before the split."""
    y = project(x)
    if norm is not None and attn.heads > 1 and _norm_width(norm) == y.shape[-1]:
        return _split_heads(norm(y), attn.heads)
    y = _split_heads(y, attn.heads)
    return norm(y) if norm is not None else y


def _finish(attn: Attention, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    # (B, heads, n, d) -> (B, n, heads*d), then the layer's output projection and dropout
    batch, heads, n, d = out.shape
    out = out.transpose(1, 2).reshape(batch, n, heads * d)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _check_plain_self_attention(attn: Attention, hidden_states: torch.Tensor) -> None:
    if hidden_states.ndim != 3 or attn.group_norm is not None or attn.spatial_norm is not None:
        raise ValueError("reference attention expects the (B, tokens, C) self-attention of a transformer block")


class ReferenceRecorder:
    """Reference UNet processor: records the layer's input, then runs plain self-attention."""

    def __init__(self, bank: ReferenceBank, name: str):
        self.bank, self.name = bank, name

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        _check_plain_self_attention(attn, hidden_states)
        self.bank.features[self.name] = hidden_states
        q = _heads(attn, attn.to_q, hidden_states, attn.norm_q)
        k = _heads(attn, attn.to_k, hidden_states, attn.norm_k)
        v = _heads(attn, attn.to_v, hidden_states, None)
        return _finish(attn, F.scaled_dot_product_attention(q, k, v), hidden_states)


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
        _check_plain_self_attention(attn, hidden_states)
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
        q = _heads(attn, attn.to_q, hidden_states, attn.norm_q)
        k = _heads(attn, attn.to_k, context, attn.norm_k)
        v = _heads(attn, attn.to_v, context, None)
        self._maybe_capture(q, k, n, reference.shape[1])
        return _finish(attn, F.scaled_dot_product_attention(q, k, v), hidden_states)

    def _maybe_capture(self, q: torch.Tensor, k: torch.Tensor, n: int, m: int) -> None:
        grid = self.bank.grid_of(m)
        if not self.bank.wants_capture(grid):
            return
        rows = self.bank.capture_rows
        # keys (B, heads, n + m + R, d) -> reference part (b, heads, m, d), registers (b, heads, R, d)
        register_key = k[rows, :, n + m:] if self.registers is not None else None
        self.bank.captures[self.name] = LeffaCapture(q[rows], k[rows, :, n:n + m], register_key, grid)


def _self_attention_layers(unet: nn.Module) -> dict[str, Attention]:
    """The self-attention (``attn1``) layers of a UNet's transformer blocks, by processor name."""
    return {
        name: unet.get_submodule(name.removesuffix(".processor"))
        for name in unet.attn_processors
        if name.endswith("attn1.processor")
    }


def attach_reference_attention(generative_unet: nn.Module, reference_unet: nn.Module,
                               num_registers: int = 0, bank: ReferenceBank | None = None) -> ReferenceBank:
    """Install :class:`ReferenceRecorder` in the Reference UNet and :class:`ConcatAttention` in the
    Generative UNet, layer by layer; returns the bank they share."""
    bank = bank or ReferenceBank()
    gen_layers, ref_layers = _self_attention_layers(generative_unet), _self_attention_layers(reference_unet)
    if gen_layers.keys() != ref_layers.keys():
        raise ValueError("the Generative and Reference UNets must have the same self-attention layers")
    # set_attn_processor wants every attention layer named; layers other than attn1 keep theirs
    reference_unet.set_attn_processor(
        {**reference_unet.attn_processors, **{n: ReferenceRecorder(bank, n) for n in ref_layers}}
    )
    generative_unet.set_attn_processor({
        **generative_unet.attn_processors,
        **{n: ConcatAttention(bank, n, layer.to_k.in_features, num_registers) for n, layer in gen_layers.items()},
    })
    return bank


class WidthConcatAttention:
    """Self-attention of a UNet whose input is ``[person | garment]`` along the latent width
    (``concat_unet``): plain self-attention over all tokens of the (h, 2w) grid. At layers selected
    for the Leffa loss it captures, for the bank's ``capture_rows``, the queries of the person
    half's h*w tokens and the keys of the garment half's h*w tokens, each row-major over its own
    (h, w) grid (a row of the concatenated grid is w person tokens, then w garment tokens). The
    selection uses the person half's grid against the image height, as :class:`ReferenceBank` does.
    """

    def __init__(self, bank: ReferenceBank, name: str):
        self.bank, self.name = bank, name

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        _check_plain_self_attention(attn, hidden_states)
        q = _heads(attn, attn.to_q, hidden_states, attn.norm_q)
        k = _heads(attn, attn.to_k, hidden_states, attn.norm_k)
        v = _heads(attn, attn.to_v, hidden_states, None)
        self._maybe_capture(q, k)
        return _finish(attn, F.scaled_dot_product_attention(q, k, v), hidden_states)

    def _maybe_capture(self, q: torch.Tensor, k: torch.Tensor) -> None:
        bank = self.bank
        if bank.capture_rows is None or bank.capture_rows.numel() == 0:
            return
        if bank.latent_hw is None:
            raise RuntimeError("ReferenceBank.latent_hw is unset: set it before running the UNet")
        h, w = bank.latent_hw  # the person's latent; the UNet sees (h, 2w)
        rows, width = token_grid(q.shape[2], (h, 2 * w))
        if not bank.wants_capture((rows, width // 2)):
            return
        if width % 2:
            raise UserError(f"concat_unet: the Leffa layer {self.name} has a {rows}x{width} token grid, whose "
                            f"person|garment seam falls inside a token; choose a data.width whose latent width "
                            f"({w}) halves evenly down to that layer")
        picked = bank.capture_rows

        def half(x: torch.Tensor, side: int) -> torch.Tensor:
            # (B, heads, rows*width, d) -> the side's (b, heads, rows*width/2, d), row-major
            x = x[picked].unflatten(2, (rows, 2, width // 2))[:, :, :, side]
            return x.flatten(2, 3)

        bank.captures[self.name] = LeffaCapture(half(q, 0), half(k, 1), None, (rows, width // 2))


def attach_width_concat_attention(unet: nn.Module, bank: ReferenceBank) -> ReferenceBank:
    """Install :class:`WidthConcatAttention` in every self-attention layer of ``unet``; returns ``bank``."""
    layers = _self_attention_layers(unet)
    unet.set_attn_processor({**unet.attn_processors, **{n: WidthConcatAttention(bank, n) for n in layers}})
    return bank
