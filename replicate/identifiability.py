"""What the data and Eq. 4 alone allow a token grid to learn, before any model is trained.

- ``end_point_error`` (``leffa.flow_pictures``): mean pixel distance between a token-grid flow, bilinearly
  upsampled as in Eq. 4 (``align_corners=True``), and the ground-truth flow, where that is defined.
- :func:`least_squares_floor`: the grid values whose upsampling fits the ground truth best (linear
  least squares inside the mask): the floor of a token grid. Token ``j`` sits at ``linspace(-1, 1)``,
  i.e. the first and last tokens on the image's border pixels, so the per-cell average of the
  ground truth (:func:`cell_average`, centred half a cell further in) is *not* that floor.
- :func:`free_query_fit`: one free query per token, fixed orthonormal keys, ``attention_flow`` with
  tau 2, from near-uniform attention, Adam on ``warp_loss`` only: how far Eq. 4 itself leads towards
  the ground truth on this data. :func:`gap_closed` turns it into the fraction of the gap between
  the centre guess (what uniform attention gives) and the floor that it closes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from leffa.flow_pictures import end_point_error
from leffa.losses import attention_flow, warp_loss

__all__ = ["end_point_error", "upsample_flow", "cell_average", "least_squares_floor", "centre_flow",
           "free_query_fit", "gap_closed"]


def upsample_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w, 2) -> (B, H, W, 2), bilinear with ``align_corners=True`` (Eq. 4's upsampling)."""
    up = F.interpolate(flow.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=True)
    return up.permute(0, 2, 3, 1)


def centre_flow(gt: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Every token points at the reference centre (uniform attention): zeros (B, h, w, 2)."""
    return gt.new_zeros(gt.shape[0], *grid, 2)


def cell_average(gt: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The ground truth averaged over each token's cell of pixels inside the mask (the reference
    centre where a cell has none), (B, h, w, 2). Not the best a grid can hold: see the module doc."""
    flow = gt.permute(0, 3, 1, 2)
    valid = (~torch.isnan(flow[:, :1])).float()
    total = F.interpolate(flow.nan_to_num(0.0) * valid, size=grid, mode="area")
    count = F.interpolate(valid, size=grid, mode="area")
    return (total / count.clamp_min(1e-6)).permute(0, 2, 3, 1)


def _upsampling_matrix(grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(H*W, h*w): column j is the upsampling of the grid's j-th unit value (row-major), so that
    ``matrix @ values`` is the bilinear, align_corners=True upsampling of a grid of values."""
    h, w = grid
    basis = torch.eye(h * w, dtype=torch.float64).view(h * w, 1, h, w)
    up = F.interpolate(basis, size=size, mode="bilinear", align_corners=True)
    return up.view(h * w, -1).T


def least_squares_floor(gt: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Grid values (B, h, w, 2) whose upsampling best fits ``gt`` (B, H, W, 2; NaN outside the mask)
    in the least-squares sense over the mask's pixels; tokens no masked pixel depends on get the
    minimum-norm value 0 (the reference centre)."""
    H, W = gt.shape[1:3]
    matrix = _upsampling_matrix(grid, (H, W))
    out = []
    for sample in gt.double():
        flat = sample.reshape(H * W, 2)
        valid = ~torch.isnan(flat[:, 0])
        if not valid.any():
            out.append(flat.new_zeros(grid[0] * grid[1], 2))
            continue
        # gelsd: minimum-norm solution, also when some tokens touch no masked pixel (rank deficient)
        out.append(torch.linalg.lstsq(matrix[valid], flat[valid], driver="gelsd").solution)
    return torch.stack(out).view(gt.shape[0], *grid, 2).to(gt.dtype)


def free_query_fit(batch: dict, grid: tuple[int, int], steps: int = 400, lr: float = 0.5, tau: float = 2.0,
                   seed: int = 0) -> tuple[torch.Tensor, list[float]]:
    """Optimise one free query per token (fixed orthonormal keys: the identity, one per reference
    token) on Eq. 4 only, from near-uniform attention. Returns the flow (B, h, w, 2) and the warp
    loss per step (mean over the batch)."""
    h, w = grid
    n, b = h * w, batch["ref"].shape[0]
    generator = torch.Generator().manual_seed(seed)
    keys = torch.eye(n).expand(b, 1, n, n)
    query = (1e-2 * torch.randn(b, 1, n, n, generator=generator)).requires_grad_(True)
    optimizer = torch.optim.Adam([query], lr=lr)
    ref, tgt, mask = batch["ref"].float(), batch["tgt"].float(), batch["mask"].float()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        flow = attention_flow(query, keys, grid, tau).view(b, h, w, 2)
        loss = warp_loss(flow, ref, tgt, mask).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        return attention_flow(query, keys, grid, tau).view(b, h, w, 2), losses


def gap_closed(start_epe: float, reached_epe: float, floor_epe: float) -> float:
    """The fraction of the gap between a start (the centre guess) and the floor that a flow closes:
    1 reaches the floor, 0 stays at the start, negative moves away."""
    gap = start_epe - floor_epe
    return (start_epe - reached_epe) / gap if gap > 0 else float("nan")
