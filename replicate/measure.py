"""Measures of a trained module on held-out batches, and its flow pictures.

Every call into the module's internals and ``leffa.flow_pictures`` lives in this file (``_flows`` and
``pictures``), so that a rename touches one place.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from leffa.flow_pictures import (
    QUERY_POINTS,
    capture_flows,
    end_point_error,
    flow_figure,
    flow_to_rgb,
    forward_at_timestep,
    head_averaged_attention,
    query_attention,
    warp,
)
from leffa.losses import coordinate_map, diffusion_loss, warp_loss
from leffa.pictures import save_png, to_unit

EVAL_TIMESTEPS = [100, 250, 400]  # all below theta_timestep = 500


def grid_name(grid: tuple[int, int]) -> str:
    return f"{grid[0]}x{grid[1]}"


def _flows(module, batch: dict, timestep: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Both UNets on ``batch`` noised to ``timestep``: (prediction, noise, {layer: capture and flow})."""
    prediction, noise = forward_at_timestep(module, batch, timestep=timestep, seed=timestep)
    return prediction, noise, capture_flows(module)


@torch.no_grad()
def evaluate(module, batches: list[dict]) -> dict:
    """Means over samples, timesteps and Leffa layers, and per token grid (``by_grid``)."""
    was_training = module.training
    module.eval()
    denoise, per_grid = [], {}
    for batch in batches:
        gt = batch["flow"]  # (B, H, W, 2), NaN outside the mask
        centre = torch.where(torch.isnan(gt), gt, torch.zeros_like(gt))  # the reference centre, same mask
        valid = ~torch.isnan(gt[..., 0])
        for t in EVAL_TIMESTEPS:
            prediction, noise, flows = _flows(module, batch, t)
            denoise.append(diffusion_loss(prediction, noise).mean().item())
            for item in flows.values():
                flow, capture = item["flow"], item["capture"]
                values = per_grid.setdefault(grid_name(capture.grid), {"epe_px": [], "warp_l2": [], "entropy": [],
                                                                         "spread_px": []})
                values["epe_px"].append(end_point_error(flow, gt))
                values["spread_px"].append(end_point_error(flow, centre))
                values["warp_l2"].append(warp_loss(flow, batch["ref"], batch["tgt"], batch["mask"]).mean().item())
                values["entropy"].append(attention_entropy(capture, module.hparams.tau, valid))
    module.train(was_training)
    by_grid = {g: {k: statistics.mean(v) for k, v in values.items()} for g, values in sorted(per_grid.items())}
    out = {k: statistics.mean(m[k] for m in by_grid.values()) for k in ("epe_px", "warp_l2", "entropy", "spread_px")}
    return {**out, "denoise": statistics.mean(denoise), "by_grid": by_grid}


def attention_entropy(capture, tau: float, valid: torch.Tensor) -> float:
    """Entropy of the head-averaged attention of the query tokens inside the mask (``valid``, at image
    size), over log(keys): 1 is uniform attention (the flow then points at the reference centre), 0 one-hot."""
    attn = head_averaged_attention(capture, tau)  # (B, n, keys)
    ent = -(attn * attn.clamp_min(1e-12).log()).sum(-1) / math.log(attn.shape[-1])
    inside = F.interpolate(valid[:, None].float(), size=capture.grid, mode="area").flatten(1) > 0.5
    return ent[inside].mean().item() if inside.any() else float("nan")


def guess_epe(batches: list[dict], guess: str) -> float:
    """EPE of a flow that knows nothing, for scale: ``identity`` (each pixel maps to the same place)
    or ``centre`` (every pixel maps to the reference centre: what uniform attention gives)."""
    errs = []
    for batch in batches:
        gt = batch["flow"]
        H, W = gt.shape[1:3]
        flow = coordinate_map(H, W).view(1, H, W, 2).expand_as(gt)
        errs.append(end_point_error(flow if guess == "identity" else torch.zeros_like(gt), gt))
    return statistics.mean(errs)


@torch.no_grad()
def pictures(modules: dict, batch: dict, out: Path, prefix: str, timestep: int = 250) -> list[Path]:
    """One PNG per module: the same held-out samples, one block of rows per Leffa layer (coarse grids
    first). Columns: target, reference, attention-flow colour, reference warped by the attention flow,
    attention of three query points, ground-truth flow colour, reference warped by the ground truth."""
    gt = batch["flow"].nan_to_num(0.0)
    extra = torch.stack([flow_to_rgb(gt), to_unit(warp(batch["ref"], gt))], dim=1)
    written = []
    for name, module in modules.items():
        module.eval()
        _, _, flows = _flows(module, batch, timestep)
        blocks = []
        for item in sorted(flows.values(), key=lambda i: i["capture"].grid[0]):
            attention = query_attention(item["capture"], QUERY_POINTS, module.hparams.tau)
            blocks.append(torch.cat([flow_figure(batch, item["flow"], attention), extra], dim=1))
        tiles = torch.cat(blocks)
        grid = make_grid(tiles.flatten(0, 1), nrow=tiles.shape[1], padding=2, pad_value=1.0)
        written.append(save_png(grid, out / f"{prefix}_{name}.png"))
    return written
