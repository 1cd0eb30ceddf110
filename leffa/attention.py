"""What every architecture's attention processors share (Leffa paper, Sec. 3.1-3.3): the
:class:`ReferenceBank` that carries one forward pass's reference features and Leffa captures, the
:class:`LeffaCapture` record a Leffa layer hands to the loss, :func:`token_grid`, and the helpers
that compute a diffusers ``Attention`` layer's heads and output as its own processor does.

The processors themselves belong to their architecture: ``leffa.architectures.dual_unet_attention``
(the paper's Reference/Generative UNet pair) and ``leffa.architectures.concat_unet`` (one UNet over
person and garment side by side).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention
from torch import nn


__all__ = ["ReferenceBank", "LeffaCapture", "token_grid", "project_heads", "finish_attention",
           "check_plain_self_attention", "project_qkv", "self_attention_layers",
           "set_self_attention_processors"]


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

    def release(self) -> None:
        """Drop the pass's reference features and captures (after a training step's backward: they
        would otherwise stay in memory through the optimizer step, 0.29 GiB at SDXL 1024x768)."""
        self.features.clear()
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


def project_heads(attn: Attention, project: nn.Module, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
    """``project(x)`` split into heads (B, heads, n, d), with the layer's query/key norm applied as
    diffusers' own processor does: per head, or over all heads (``*_across_heads``) before the split."""
    y = project(x)
    if norm is not None and attn.heads > 1 and _norm_width(norm) == y.shape[-1]:
        return _split_heads(norm(y), attn.heads)
    y = _split_heads(y, attn.heads)
    return norm(y) if norm is not None else y


def project_qkv(attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's queries of ``hidden_states`` and keys and values of ``context`` (default: the same
    tokens, plain self-attention), each (B, heads, n, d)."""
    context = hidden_states if context is None else context
    return (project_heads(attn, attn.to_q, hidden_states, attn.norm_q),
            project_heads(attn, attn.to_k, context, attn.norm_k),
            project_heads(attn, attn.to_v, context, None))


def finish_attention(attn: Attention, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    # (B, heads, n, d) -> (B, n, heads*d), then the layer's output projection and dropout
    batch, heads, n, d = out.shape
    out = out.transpose(1, 2).reshape(batch, n, heads * d)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def check_plain_self_attention(attn: Attention, hidden_states: torch.Tensor) -> None:
    if hidden_states.ndim != 3 or attn.group_norm is not None or attn.spatial_norm is not None:
        raise ValueError("reference attention expects the (B, tokens, C) self-attention of a transformer block")


def self_attention_layers(unet: nn.Module) -> dict[str, Attention]:
    """The self-attention (``attn1``) layers of a UNet's transformer blocks, by processor name."""
    return {
        name: unet.get_submodule(name.removesuffix(".processor"))
        for name in unet.attn_processors
        if name.endswith("attn1.processor")
    }


def set_self_attention_processors(unet: nn.Module, make) -> dict[str, Attention]:
    """Give every self-attention layer of ``unet`` the processor ``make(name, layer)``; the other
    attention layers keep theirs. Returns the layers by processor name."""
    layers = self_attention_layers(unet)
    # set_attn_processor wants every attention layer named
    unet.set_attn_processor({**unet.attn_processors, **{n: make(n, layer) for n, layer in layers.items()}})
    return layers
