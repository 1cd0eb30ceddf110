"""``leffa visualize``: attention-flow pictures of a checkpoint on a few samples, as PNG files.

    leffa visualize --ckpt runs/vton_1024_leffa/checkpoints/last.ckpt --shards shards/vitonhd@test \\
        --out pictures/ [--num-samples 4] [--timestep 250] [--height 1024 --width 768]

Writes one PNG per Leffa layer (rows: samples; columns: target, reference, flow colour, the
ground-truth flow's colour where the shards carry ``flow.npy``, reference warped by the flow,
attention of three query points).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.utils import make_grid

from leffa.module import LeffaModule
from leffa.viz import save_png

__all__ = ["layer_pictures", "visualize_main", "QUERY_POINTS"]

QUERY_POINTS = [(0.35, 0.5), (0.55, 0.35), (0.7, 0.6)]  # (y, x) relative: chest, left, lower right


def layer_pictures(module, batch: dict, timestep: int = 250, flows: dict | None = None) -> dict[str, torch.Tensor]:
    """Layer name -> (3, H', W') picture in [0, 1]; ``flows``: those of ``leffa.flow_viz.layer_flows``
    for this batch when already computed."""
    from leffa.flow_viz import flow_figure, layer_flows, query_attention

    pictures = {}
    flows = layer_flows(module, batch, timestep) if flows is None else flows
    for name, item in flows.items():
        attention = query_attention(item["capture"], QUERY_POINTS, module.hparams.tau)
        tiles = flow_figure(batch, item["flow"], attention)
        pictures[name.removesuffix(".processor")] = make_grid(tiles.flatten(0, 1), nrow=tiles.shape[1], padding=2,
                                                              pad_value=1.0)
    return pictures


def visualize_main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="leffa visualize", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True,
                   help="a Lightning checkpoint of LeffaModule, a sharded checkpoint folder or an export")
    p.add_argument("--shards", required=True, help="shards to take samples from (folder[@split], glob, braces)")
    p.add_argument("--out", default="pictures")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--timestep", type=int, default=250)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--weights", default="ema", choices=["ema", "live"])
    args = p.parse_args(argv)

    from leffa.data import LeffaDataModule
    from leffa.data.batch import to_model_batch

    module = LeffaModule.from_checkpoint(args.ckpt, args.weights).eval()
    data = LeffaDataModule(predict_shards=args.shards, height=args.height, width=args.width,
                           val_batch_size=args.num_samples, num_workers=0)
    batch = to_model_batch(next(iter(data.predict_dataloader())))
    written = []
    for name, picture in layer_pictures(module, batch, args.timestep).items():
        written.append(save_png(picture, Path(args.out) / f"{name}.png"))
    print(f"wrote {len(written)} pictures to {args.out}")
    return written
