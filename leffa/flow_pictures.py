"""What the attention does: each Leffa layer's attention flow (paper Eq. 3) as pictures.

For a batch at a chosen timestep: the flow field as a colour image (x -> red, y -> green, the
colouring of the synthetic set's DensePose), the reference warped by the flow next to the target
(the idea of the paper's Fig. 6 and Fig. 8), and the attention of a few query points over the
reference (mean over heads). Where the batch carries the ground-truth flow (``flow``, as the
synthetic shards do), its colour is shown beside the attention flow's, and
:func:`end_point_error` measures how far the attention flow is from it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

from leffa.losses import capture_flow, warp
from leffa.pictures import to_unit

__all__ = ["flow_to_rgb", "warp", "end_point_error", "forward_at_timestep", "capture_flows", "layer_flows",
           "head_averaged_attention", "query_attention", "flow_figure", "layer_pictures", "QUERY_POINTS"]

QUERY_POINTS = [(0.35, 0.5), (0.55, 0.35), (0.7, 0.6)]  # (y, x) relative: chest, left, lower right


def flow_to_rgb(flow: torch.Tensor) -> torch.Tensor:
    """(B, h, w, 2) grid_sample coordinates -> (B, 3, h, w) in [0, 1]: R = (x+1)/2, G = (y+1)/2, B = 0.5."""
    rgb = torch.cat([(flow + 1) / 2, torch.full_like(flow[..., :1], 0.5)], dim=-1)
    return rgb.permute(0, 3, 1, 2).clamp(0, 1)


def end_point_error(flow: torch.Tensor, ground_truth: torch.Tensor) -> float:
    """Mean distance in pixels between a token-grid flow (B, h, w, 2), upsampled bilinearly to the
    image as in Eq. 4, and the ground truth (B, H, W, 2), over the pixels where the ground truth is
    defined (not NaN). NaN when it is defined nowhere."""
    H, W = ground_truth.shape[1:3]
    up = F.interpolate(flow.permute(0, 3, 1, 2).float(), size=(H, W), mode="bilinear", align_corners=True)
    up = up.permute(0, 2, 3, 1).to(ground_truth.device)
    # normalised -> pixels: x spans W - 1 pixels over [-1, 1], y spans H - 1
    dx, dy = (up[..., 0] - ground_truth[..., 0]) * (W - 1) / 2, (up[..., 1] - ground_truth[..., 1]) * (H - 1) / 2
    return torch.sqrt(dx**2 + dy**2)[~torch.isnan(ground_truth[..., 0])].float().mean().item()


@torch.no_grad()
def forward_at_timestep(module, batch: dict, timestep: int = 250, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``module.noised_forward`` at one ``timestep`` for every sample (noise and VAE sample from
    ``seed``), every sample's Leffa layers captured; returns (prediction, noise)."""
    b = batch["tgt"].shape[0]
    return module.noised_forward(batch, torch.Generator().manual_seed(seed), torch.full((b,), timestep),
                                 capture_rows=torch.arange(b, device=module.device))


@torch.no_grad()
def capture_flows(module) -> dict:
    """Per Leffa layer captured by the last forward: its capture and head-averaged flow (B, h, w, 2)."""
    return {name: {"capture": cap, "flow": capture_flow(cap, module.hparams.tau)} for name, cap in module.bank.captures.items()}


def layer_flows(module, batch: dict, timestep: int = 250, seed: int = 0) -> dict:
    """Run both UNets on ``batch`` noised to ``timestep`` and return, per Leffa layer, its capture and
    head-averaged flow (B, h, w, 2). Layers are those of the module's theta_resolution."""
    forward_at_timestep(module, batch, timestep, seed)
    return capture_flows(module)


def head_averaged_attention(capture, tau: float, rows: list[int] | None = None) -> torch.Tensor:
    """``softmax(Q K^T / sqrt(d) / tau)`` over the reference tokens, mean over heads: (B, n, h*w)
    for the query tokens ``rows`` (all when None). Register keys are left out."""
    q = capture.query.float() if rows is None else capture.query[:, :, rows].float()
    logits = q @ capture.key.float().transpose(-1, -2) / math.sqrt(q.shape[-1]) / tau
    return torch.softmax(logits, dim=-1).mean(1)


def query_attention(capture, points: list[tuple[float, float]], tau: float) -> torch.Tensor:
    """Attention over the reference grid of query tokens at relative positions ``points`` ((y, x) in
    [0, 1]), mean over heads: (B, P, h, w). Only P rows of the attention matrix are formed."""
    h, w = capture.grid
    rows = [min(int(y * h), h - 1) * w + min(int(x * w), w - 1) for y, x in points]
    return head_averaged_attention(capture, tau, rows).view(-1, len(points), h, w)


def flow_figure(batch: dict, flow: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """One row per sample: target | reference | flow colour | [ground-truth flow colour] | warped
    reference | query attentions. The ground-truth column comes when the batch has ``flow``
    (black where it is undefined, outside the garment region).

    Returns (B, C, 3, H, W) tiles in [0, 1], C = 4 + P (5 + P with the ground truth); make_grid
    them with nrow = C.
    """
    H, W = batch["tgt"].shape[-2:]
    up = lambda x: F.interpolate(x, size=(H, W), mode="nearest")  # noqa: E731
    attn = attention / attention.flatten(2).amax(-1).clamp_min(1e-12)[..., None, None]  # each map to [0, 1]
    tiles = [to_unit(batch["tgt"]), to_unit(batch["ref"]), up(flow_to_rgb(flow))]
    if "flow" in batch:
        truth = batch["flow"].float()
        defined = ~torch.isnan(truth[..., :1]).permute(0, 3, 1, 2)
        tiles.append(flow_to_rgb(truth.nan_to_num(0.0)) * defined)
    tiles.append(to_unit(warp(batch["ref"].float(), flow)))
    tiles += [up(attn[:, p:p + 1]).expand(-1, 3, -1, -1) for p in range(attn.shape[1])]
    return torch.stack([t.cpu().float() for t in tiles], dim=1)


def layer_pictures(module, batch: dict, timestep: int = 250, flows: dict | None = None) -> dict[str, torch.Tensor]:
    """Layer name -> (3, H', W') picture in [0, 1] (``leffa visualize``'s files, the ``FlowPictures``
    callback's images); ``flows``: those of :func:`layer_flows` for this batch when already computed."""
    pictures = {}
    flows = layer_flows(module, batch, timestep) if flows is None else flows
    for name, item in flows.items():
        attention = query_attention(item["capture"], QUERY_POINTS, module.hparams.tau)
        tiles = flow_figure(batch, item["flow"], attention)
        pictures[name.removesuffix(".processor")] = make_grid(tiles.flatten(0, 1), nrow=tiles.shape[1], padding=2,
                                                              pad_value=1.0)
    return pictures
