"""``leffa visualize``: attention-flow pictures of a checkpoint on a few samples, as PNG files.

    leffa visualize --ckpt runs/vton_1024_leffa/checkpoints/last.ckpt --shards shards/vitonhd@test \\
        --out pictures/ [--num-samples 4] [--timestep 250] [--height 1024 --width 768]

Writes one PNG per Leffa layer (rows: samples; columns: target, reference, flow colour, the
ground-truth flow's colour where the shards carry ``flow.npy``, reference warped by the flow,
attention of three query points). ``--out`` is a new (or empty) folder: one that holds something, an
earlier run's pictures say, is refused. A model whose ``theta_resolution`` selects no layer at this
``--height`` is an error (there would be no picture).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from leffa.errors import UserError
from leffa.flow_pictures import layer_pictures
from leffa.module import LeffaModule
from leffa.pictures import save_png

__all__ = ["visualize_main", "check_new_folder"]


def check_new_folder(out: Path) -> None:
    """``out`` is a folder to write into that holds nothing yet (or does not exist, and can be made):
    else a UserError naming it, so that an earlier run's pictures are never overwritten."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"--out {out} is a file, not a folder; choose a new folder for the pictures")
        if any(out.iterdir()):
            raise UserError(f"--out {out} already exists and is not empty (an earlier run's pictures?); nothing is "
                            "overwritten: choose a new folder")
        return
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, not a folder; choose a new folder for the pictures")


def visualize_main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="leffa visualize", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True,
                   help="a Lightning checkpoint of LeffaModule, a sharded checkpoint folder or an export")
    p.add_argument("--shards", required=True, help="shards to take samples from (folder[@split], glob, braces)")
    p.add_argument("--out", default="pictures", help="a new or empty folder for the pictures")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--timestep", type=int, default=250)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--weights", default="ema", choices=["ema", "live"])
    args = p.parse_args(argv)

    from leffa.data import LeffaDataModule
    from leffa.data.batch import to_model_batch

    out = Path(args.out)
    check_new_folder(out)
    module = LeffaModule.from_checkpoint(args.ckpt, args.weights).eval()
    data = LeffaDataModule(predict_shards=args.shards, height=args.height, width=args.width,
                           val_batch_size=args.num_samples, num_workers=0)
    batch = to_model_batch(next(iter(data.predict_dataloader())))
    pictures = layer_pictures(module, batch, args.timestep)
    if not pictures:
        theta = module.hparams.theta_resolution
        raise UserError(f"no Leffa layer to draw: this model's theta_resolution {theta:g} selects the attention "
                        f"layers whose token grid height h has h / {args.height} > {theta:g}, and at --height "
                        f"{args.height} none of its layers has; nothing written")
    check_new_folder(out)  # again, right before writing: nothing appeared there meanwhile
    written = [save_png(picture, out / f"{name}.png") for name, picture in pictures.items()]
    print(f"wrote {len(written)} pictures to {args.out}")
    return written
