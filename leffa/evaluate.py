"""`leffa eval`: the evaluation protocols of the Leffa paper (Sec. 4.1, "Metrics.").

    try-on, paired    (--paired):      FID, KID vs the ground-truth folder; SSIM, LPIPS per pair
    try-on, unpaired  (default):       FID, KID vs the ground-truth folder
    pose transfer     (--fid-ref DIR): FID vs the training images in DIR; SSIM, LPIPS per pair

Predictions are named by sample key (`<key>.png`, as `leffa predict` writes them; grammar in
`leffa.schema`) or exactly like their ground truth. A key is paired with the ground truth named
by its target id (`leffa.metrics.match_pairs`); --paired refuses unpaired keys. Reference images
are resized to the prediction's size with LANCZOS when sizes differ, as VtonEval does; one of
another aspect ratio (beyond 1%: rounding) is refused unless --allow-aspect-change. KID is
reported x 1000 as VtonEval and the paper's tables do. --out never overwrites a file.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from leffa import metrics
from leffa.errors import UserError

PROTOCOL_METRICS = {
    "tryon_paired": ("fid", "kid_x1000", "ssim", "lpips"),
    "tryon_unpaired": ("fid", "kid_x1000"),
    "pose_transfer": ("fid", "ssim", "lpips"),
}


def evaluate(
    pred_dir: str | Path,
    gt_dir: str | Path,
    paired: bool = False,
    fid_ref: str | Path | None = None,
    inception: str | Path | torch.nn.Module | None = None,
    lpips_backbone: str | Path | None = None,
    lpips_net: str = "alex",
    batch_size: int = 16,
    device: str = "cpu",
    num_workers: int = 0,
    allow_aspect_change: bool = False,
) -> dict:
    """Run one protocol and return {"protocol", "metrics", "num_images", "settings"}.

    Args:
        pred_dir: generated images, one file per test sample.
        gt_dir: ground-truth test images.
        paired: try-on paired setting (adds SSIM and LPIPS against matched ground truth).
        fid_ref: pose transfer: FID against this folder of training images.
        inception: clean-fid's `inception-2015-12-05.pt` (file or folder; default
            `$LEFFA_INCEPTION_WEIGHTS`), or any module mapping (B, 3, 299, 299) floats in
            [0, 255] to (B, D) features (tests).
        lpips_backbone: torchvision ImageNet state dict for `lpips_net` (default
            `$LEFFA_LPIPS_BACKBONE`); "random" for tests only.
        lpips_net: LPIPS trunk: alex, vgg or squeeze (VtonEval uses squeeze).
        batch_size: images per batch for every network.
        device: torch device for all networks.
        num_workers: DataLoader workers for decoding and resizing.
        allow_aspect_change: resize (squash) ground truth and FID reference images whose aspect ratio
            differs from the predictions' by more than 1% (``metrics.ASPECT_TOLERANCE``); by
            default they are a UserError naming their count and one of them.
    """
    protocol = "pose_transfer" if fid_ref else ("tryon_paired" if paired else "tryon_unpaired")
    wanted = PROTOCOL_METRICS[protocol]

    # Everything that can fail fast (files, pairs, weights) before any long loop.
    pred_files, gt_files = metrics.list_images(pred_dir), metrics.list_images(gt_dir)
    ref_files = metrics.list_images(fid_ref) if fid_ref else gt_files
    size = metrics.common_size(pred_files)
    if "lpips" in wanted:
        metrics.check_lpips_size(size, lpips_net, pred_files[0])
    # an unreadable file is named now, not deep inside a loop
    sizes = {path: metrics.image_size(path) for path in gt_files + (ref_files if fid_ref else [])}
    squashed = metrics.aspect_mismatches(sizes, size)
    if squashed and not allow_aspect_change:
        w, h = sizes[squashed[0]]
        which = "ground-truth and --fid-ref" if fid_ref else "ground-truth"
        raise UserError(
            f"{len(squashed)} of {len(sizes)} {which} images have another aspect ratio than the predictions' "
            f"{size[0]}x{size[1]} (e.g. {squashed[0]} is {w}x{h}) and would be squashed to it; crop or pad them "
            "to the predictions' aspect ratio, or pass --allow-aspect-change to resize them anyway"
        )
    paired_keys_only = protocol == "tryon_paired"
    pairs = metrics.match_pairs(pred_files, gt_files, paired=paired_keys_only) if "ssim" in wanted else None
    if protocol == "tryon_paired":
        # FID/KID compare with the whole gt folder: a partial prediction set would bias them.
        used = {gt for _, gt in pairs}
        unused = [p.name for p in gt_files if p not in used]
        if unused:
            raise UserError(
                f"{len(unused)} ground-truth images in {gt_dir} have no prediction: "
                + ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else "")
            )
    if isinstance(inception, torch.nn.Module):
        feature_model, inception_setting = inception, f"custom {type(inception).__name__}"
    else:
        feature_model = metrics.load_inception(inception, device)
        inception_setting = str(inception or os.environ.get(metrics.INCEPTION_ENV))
    lpips_model = None
    if "lpips" in wanted:
        lpips_backbone = lpips_backbone or os.environ.get(metrics.LPIPS_ENV)
        lpips_model = metrics.load_lpips(lpips_net, lpips_backbone, device)

    loader_args = dict(batch_size=batch_size, device=device, num_workers=num_workers)
    features = {
        name: metrics.extract_features(files, feature_model, size, description=name, **loader_args)
        for name, files in (("pred", pred_files), ("ref", ref_files))
    }
    results = metrics.fid_kid(features["pred"], features["ref"], kid="kid_x1000" in wanted)
    if pairs is not None:
        results.update(metrics.ssim_lpips(pairs, lpips_model, **loader_args))

    return {
        "protocol": protocol,
        "metrics": results,
        "num_images": {
            "pred": len(pred_files),
            "gt": len(gt_files),
            "fid_ref": len(ref_files),
            "pairs": len(pairs) if pairs is not None else 0,
        },
        "settings": {
            "pred": str(pred_dir),
            "gt": str(gt_dir),
            "fid_ref": str(fid_ref) if fid_ref else None,
            "image_size_wh": list(size),
            "resize": "reference resized to the prediction size with LANCZOS if sizes differ (VtonEval)"
            + (f"; {len(squashed)} of another aspect ratio squashed (--allow-aspect-change)" if squashed else ""),
            "fid_kid": "clean-fid 'clean' mode; KID x 1000 (VtonEval, paper tables), numpy seed 0",
            "inception": inception_setting,
            "ssim": "torchmetrics, data_range 1.0, mean over images",
            "lpips": f"lpips v0.1 {lpips_net}, backbone {lpips_backbone}" if lpips_model else None,
            "batch_size": batch_size,
            "device": device,
        },
    }


def format_table(result: dict) -> str:
    """A small text table: one line per metric, with the protocol and counts above."""
    counts = result["num_images"]
    lines = [
        f"protocol {result['protocol']}: {counts['pred']} predictions, {counts['fid_ref']} FID "
        f"reference images, {counts['pairs']} pairs (KID is x 1000, as in VtonEval and the paper)",
        f"{'metric':<10} {'value':>10}",
    ]
    lines += [f"{name:<10} {value:>10.4f}" for name, value in result["metrics"].items()]
    backbone = result["settings"]["lpips"] or ""
    if backbone.endswith("random"):
        lines.append("WARNING: LPIPS used a random backbone; its value is for tests only")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leffa eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pred", required=True, help="folder of generated images")
    parser.add_argument("--gt", required=True, help="folder of ground-truth test images")
    parser.add_argument("--paired", action="store_true", help="try-on paired: add SSIM and LPIPS")
    parser.add_argument("--fid-ref", help="pose transfer: FID against this folder of training images")
    parser.add_argument(
        "--inception", help=f"clean-fid's {metrics.INCEPTION_FILE} (default ${metrics.INCEPTION_ENV})"
    )
    parser.add_argument(
        "--lpips-backbone",
        help=f"torchvision ImageNet state dict of the LPIPS trunk (default ${metrics.LPIPS_ENV}); "
        "'random' is for tests only",
    )
    parser.add_argument("--lpips-net", default="alex", choices=sorted(metrics.LPIPS_BACKBONE_URLS),
                        help="LPIPS trunk (VtonEval uses squeeze)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for decoding")
    parser.add_argument("--out", help="write the results as JSON here (a new file: an existing one is refused)")
    parser.add_argument("--allow-aspect-change", action="store_true",
                        help="resize ground truth of another aspect ratio than the predictions' (squashing it)"
                        " instead of refusing it")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    return parser


def check_new_results_file(out: Path) -> None:
    """``--out`` names no existing file or folder (an earlier run's results are never overwritten), and
    its nearest existing folder is a folder (else creating it would fail): a UserError naming it."""
    if out.exists() or out.is_symlink():
        raise UserError(f"--out {out} already exists and is not overwritten; choose a new file for the results")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, not a folder; choose another path for the results")


def eval_main(argv: list[str] | None = None) -> dict:
    """`leffa eval ...`: run the protocol the flags select, print a table, write JSON."""
    args = build_parser().parse_args(argv)
    if args.out:
        check_new_results_file(Path(args.out))  # before the long computation
    result = evaluate(
        args.pred, args.gt, paired=args.paired, fid_ref=args.fid_ref, inception=args.inception,
        lpips_backbone=args.lpips_backbone, lpips_net=args.lpips_net, batch_size=args.batch_size,
        device=args.device, num_workers=args.num_workers, allow_aspect_change=args.allow_aspect_change,
    )
    print(format_table(result))
    if args.out:
        out = Path(args.out)
        check_new_results_file(out)  # again: something may have appeared there meanwhile (the table is printed)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out)  # atomic: an earlier results file is never left half-written
    return result


if __name__ == "__main__":
    eval_main()
