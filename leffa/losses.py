"""Losses of the Leffa paper: Eq. 1 (diffusion) and Eq. 2-4 (Leffa: learning flow fields in attention).

Every loss returns one value per sample, shape (B,); the LightningModule selects, weights and reduces.
Coordinates follow ``grid_sample``'s convention with ``align_corners=True``: (x, y), top-left -1,
bottom-right +1. docs/design.md ("Conventions", "The Leffa loss, fused") sets the formulas side by side.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

__all__ = ["coordinate_map", "attention_flow", "warp", "warp_loss", "diffusion_loss", "capture_flow", "leffa_loss",
           "float32_region"]


def coordinate_map(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The normalised coordinate map C of Eq. 3, (h*w, 2) in row-major token order, values (x, y).

    Token (0, 0) is (-1, -1) and token (h-1, w-1) is (1, 1).
    """
    ys = torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    # (h, w, 2) -> (h*w, 2): row-major, like the flattened token sequence of a transformer block
    return torch.stack([grid_x, grid_y], dim=-1).reshape(h * w, 2)


def attention_flow(
    query: torch.Tensor,
    key: torch.Tensor,
    ref_size: tuple[int, int],
    temperature: float = 2.0,
    average_heads: bool = True,
    register_key: torch.Tensor | None = None,
    pad_values: bool = True,
) -> torch.Tensor:
    """Eq. 2-3 of the Leffa paper: the flow field ``softmax(Q K^T / sqrt(d) / tau) @ C``.

    Computed as one fused attention call with the coordinate map C as the values, so the
    (n_q x n_k) attention matrix is never materialised; the mean over heads (the paper's A-hat)
    commutes with the product by C, so it is taken on the (.., 2) output.

    Args:
        query: (B, heads, n_q, d) generative queries.
        key: (B, heads, h*w, d) reference keys, row-major over the reference token grid.
        ref_size: (h, w) of the reference token grid.
        temperature: tau of Eq. 2.
        average_heads: return the head-averaged flow (B, n_q, 2); else per head (B, heads, n_q, 2).
        register_key: optional (B, heads, R, d) keys of learnable register tokens. Registers take part
            in the softmax (they absorb attention, as in Darcet et al. 2024) but carry coordinate 0,
            so attention on them pulls the flow towards the centre of the reference and the Leffa
            loss teaches the queries to attend to the reference instead where it matters.
        pad_values: zero-pad C (2 wide) to the head dimension d. Fused SDPA kernels want equal
            q/k/v head dims; with a 2-wide C, PyTorch falls back to the math path, which
            materialises the (n_q x n_k) matrix (measured on CPU: 2.6x slower and 5.7x the peak
            memory at 6144 tokens; see benchmarks/leffa_overhead.py). The zero columns cost
            d/2 times the value work, which is small next to Q K^T.
    """
    batch, heads, _, d = query.shape
    h, w = ref_size
    if key.shape[-2] != h * w:
        raise ValueError(f"key has {key.shape[-2]} tokens but ref_size {ref_size} needs h*w = {h * w}")
    # (h*w, 2) -> (B, heads, h*w, 2): the values of the attention call
    values = coordinate_map(h, w, query.device, query.dtype).expand(batch, heads, h * w, 2)
    if register_key is not None:
        key = torch.cat([key, register_key], dim=2)
        values = torch.cat([values, values.new_zeros(batch, heads, register_key.shape[2], 2)], dim=2)
    if pad_values and d > 2:
        values = F.pad(values, (0, d - 2))
    scale = 1.0 / (math.sqrt(d) * temperature)
    # (B, heads, n_q, 2 or d) -> keep (x, y)
    flow = F.scaled_dot_product_attention(query, key, values, scale=scale)[..., :2]
    # (B, heads, n_q, 2) -> (B, n_q, 2): mean over heads
    return flow.mean(dim=1) if average_heads else flow


def warp(ref_image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``ref_image`` (B, C, H, W) warped by ``flow`` (B, h, w, 2), the flow bilinearly upsampled to
    (H, W) (``align_corners=True``) first when its grid is coarser: the warp of Eq. 4."""
    grid = flow
    if tuple(flow.shape[1:3]) != tuple(ref_image.shape[-2:]):
        # (B, h, w, 2) -> (B, 2, h, w) -> (B, 2, H, W) -> (B, H, W, 2)
        grid = F.interpolate(flow.permute(0, 3, 1, 2), size=ref_image.shape[-2:], mode="bilinear", align_corners=True)
        grid = grid.permute(0, 2, 3, 1)
    return F.grid_sample(ref_image, grid, mode="bilinear", align_corners=True)


def warp_loss(
    flow: torch.Tensor,
    ref_image: torch.Tensor,
    target_image: torch.Tensor,
    mask: torch.Tensor,
    upsample: bool = True,
) -> torch.Tensor:
    """Eq. 4 of the Leffa paper for one layer: ``|| I_tgt * I_m - warp(I_ref, F) * I_m ||^2``, per sample.

    Args:
        flow: (B, h, w, 2) grid_sample coordinates into the reference.
        ref_image, target_image: (B, 3, H, W).
        mask: (B, 1, H, W) in {0, 1}, 1 where the model generates.
        upsample: bilinearly upsample the flow to (H, W) (the paper); False is the Tab. 8 ablation,
            which instead resizes images (area) and mask (nearest) down to (h, w).

    Returns:
        (B,) mean over (3, H, W) of the squared masked difference.
    """
    _, h, w, _ = flow.shape
    dtype = flow.dtype
    ref, tgt, m = ref_image.to(dtype), target_image.to(dtype), mask.to(dtype)
    if not upsample:
        ref = F.interpolate(ref, size=(h, w), mode="area")
        tgt = F.interpolate(tgt, size=(h, w), mode="area")
        m = F.interpolate(m, size=(h, w), mode="nearest")
    warped = warp(ref, flow)
    return ((tgt * m - warped * m) ** 2).mean(dim=(1, 2, 3))


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 1 of the Leffa paper (epsilon prediction, as SD): per-sample mean squared error, shape (B,)."""
    return ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))


def float32_region(device: torch.device):
    """A region computed in float32 also under bf16 autocast: autocast off on ``device``. (On the
    meta device, where a copy of the module counts FLOPs, there is no autocast to turn off.)"""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def capture_flow(capture, tau: float, average_heads: bool = True) -> torch.Tensor:
    """The attention flow (Eq. 2-3) of one Leffa layer's capture (a record with ``query`` (b, heads,
    n, d), ``key`` (b, heads, h*w, d), ``register_key`` (b, heads, R, d) or None and ``grid`` (h, w),
    as ``leffa.attention.LeffaCapture`` holds them), in float32 also under bf16 autocast (coordinates
    need the precision): (b, h, w, 2), or per head (b, heads, h, w, 2)."""
    h, w = capture.grid
    with float32_region(capture.query.device):
        register = None if capture.register_key is None else capture.register_key.float()
        flow = attention_flow(capture.query.float(), capture.key.float(), capture.grid, tau, average_heads,
                              register_key=register)
    return flow.view(*flow.shape[:-2], h, w, 2)


def leffa_loss(captures: Iterable, ref_image: torch.Tensor, tgt_image: torch.Tensor, mask: torch.Tensor, *,
               tau: float, average_heads: bool = True, upsample: bool = True) -> torch.Tensor:
    """The Leffa loss of the selected samples: Eq. 4 of every captured layer's flow (Eq. 2-3), summed
    over the layers; (b,), float32 also under bf16 autocast. ``average_heads=False`` is Tab. 8's
    per-head ablation (one loss per head, then their mean); ``upsample=False`` compares at the
    flow's resolution (Tab. 8)."""
    total = tgt_image.new_zeros(tgt_image.shape[0], dtype=torch.float32)
    with float32_region(tgt_image.device):
        for capture in captures:
            flow = capture_flow(capture, tau, average_heads)
            if average_heads:
                loss = warp_loss(flow, ref_image, tgt_image, mask, upsample)
            else:
                # (b, heads, h, w, 2) -> (b*heads, h, w, 2): one loss per head, then the mean over heads
                heads = flow.shape[1]
                loss = warp_loss(
                    flow.flatten(0, 1), ref_image.repeat_interleave(heads, 0),
                    tgt_image.repeat_interleave(heads, 0), mask.repeat_interleave(heads, 0), upsample,
                ).view(-1, heads).mean(1)
            total = total + loss
    return total
