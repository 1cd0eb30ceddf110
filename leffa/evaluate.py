"""`leffa eval`: the evaluation protocols of the Leffa paper (Sec. 4.1, "Metrics.").

    try-on, paired    (--paired):      FID, KID vs the ground-truth folder; PSNR, SSIM, LPIPS per pair
    try-on, unpaired  (default):       FID, KID vs the ground-truth folder
    pose transfer     (--fid-ref DIR): FID vs the training images in DIR; PSNR, SSIM, LPIPS per pair

With --masks DIR or --masks-from-shards SHARDS@split the paired metrics are also computed inside
each sample's mask (psnr_mask, ssim_mask, lpips_mask: ``metrics.paired_scores``). Predictions named
by DressCode keys are also scored per category (upper_body, lower_body, dresses), beside the pooled
metrics of all images and the mean of the categories. --exclude FILE leaves out listed test images.
The results record the protocol: setting, sizes, implementations and versions, weights, counts.

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
import sys
from pathlib import Path

import numpy as np
import torch

from leffa import metrics
from leffa.errors import UserError
from leffa.schema import KEY_CATEGORIES

PROTOCOL_METRICS = {
    "tryon_paired": ("fid", "kid_x1000", "psnr", "ssim", "lpips"),
    "tryon_unpaired": ("fid", "kid_x1000"),
    "pose_transfer": ("fid", "psnr", "ssim", "lpips"),
}
# DressCode's categories in the order of its tables (the keys carry them, leffa.schema)
CATEGORIES = KEY_CATEGORIES["dresscode"]
POOLING = (
    "metrics: all evaluated images pooled (FID and KID between the union of all categories' predictions "
    "and the union of their ground truth; PSNR, SSIM and LPIPS averaged over all pairs), as the Leffa "
    "paper's Tab. 2 'all garment categories' row (its FID is below every per-category FID of Tab. 5, "
    "which a mean of them cannot be); category_mean: the unweighted mean of the per-category values"
)
SHOWN = 5  # names shown in a message or the results before '...'


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
    exclude: str | Path | None = None,
    masks: str | Path | None = None,
    masks_from_shards: str | None = None,
) -> dict:
    """Run one protocol and return {"protocol", "metrics", "num_images", "counts", "settings"}, with
    "per_category" and "category_mean" when the predictions are DressCode keys.

    Args:
        pred_dir: generated images, one file per test sample.
        gt_dir: ground-truth test images.
        paired: try-on paired setting (adds PSNR, SSIM and LPIPS against matched ground truth).
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
        allow_aspect_change: resize (squash) ground truth, FID reference images and masks whose aspect
            ratio differs from the predictions' by more than 1% (``metrics.ASPECT_TOLERANCE``); by
            default they are a UserError naming their count and one of them.
        exclude: a text file of image names or sample keys to leave out (``metrics.read_exclude_list``):
            the predictions and ground-truth images of those target ids (not the --fid-ref images).
        masks: a folder of masks (white = the generated region) named like the predictions or their
            ground truth: adds psnr_mask, ssim_mask, lpips_mask (``metrics.paired_scores``).
        masks_from_shards: the same from the shards' mask.png (``SHARDS@split``, default split test).
    """
    protocol = "pose_transfer" if fid_ref else ("tryon_paired" if paired else "tryon_unpaired")
    wanted = PROTOCOL_METRICS[protocol]
    has_pairs = "ssim" in wanted
    if masks and masks_from_shards:
        raise UserError("give --masks or --masks-from-shards, not both")
    if (masks or masks_from_shards) and not has_pairs:
        raise UserError("the masked metrics compare each prediction with its ground truth: add --paired "
                        "(try-on) or --fid-ref (pose transfer), or drop --masks / --masks-from-shards")

    # Everything that can fail fast (files, pairs, masks, weights) before any long loop.
    found_pred, found_gt = metrics.list_images(pred_dir), metrics.list_images(gt_dir)
    exclusion = None
    pred_files, gt_files = found_pred, found_gt
    if exclude:
        entries = metrics.read_exclude_list(exclude)
        names = set().union(*entries.values())
        pred_files = [p for p in found_pred if not metrics.is_excluded(p, names)]
        gt_files = [p for p in found_gt if not metrics.is_excluded(p, names)]
        present = {p.stem for p in found_pred + found_gt}
        present |= {key.target for p in found_pred if (key := metrics.prediction_key(p)) is not None}
        unmatched = sorted(entry for entry, leaves_out in entries.items() if not leaves_out & present)
        exclusion = {
            "file": str(exclude), "listed": len(entries),
            "pred": len(found_pred) - len(pred_files), "gt": len(found_gt) - len(gt_files),
            "listed_unmatched": len(unmatched), "unmatched_examples": unmatched[:SHOWN],
        }  # fmt: skip
        for files, folder, found in ((pred_files, pred_dir, found_pred), (gt_files, gt_dir, found_gt)):
            if not files:
                raise UserError(f"--exclude {exclude} leaves out all {len(found)} images in {folder}")

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
    pairs = metrics.match_pairs(pred_files, gt_files, paired=paired_keys_only) if has_pairs else None
    if protocol == "tryon_paired":
        # FID/KID compare with the whole gt folder: a partial prediction set would bias them.
        used = {gt for _, gt in pairs}
        unused = [p.name for p in gt_files if p not in used]
        if unused:
            raise UserError(
                f"{len(unused)} ground-truth images in {gt_dir} have no prediction: "
                + ", ".join(unused[:SHOWN]) + (", ..." if len(unused) > SHOWN else "")
            )
    mask_sources, mask_sizes = None, {}
    if masks or masks_from_shards:
        if masks:
            mask_sources = metrics.masks_from_folder(masks, pairs)
        else:
            mask_sources = metrics.masks_from_shards(masks_from_shards, pairs)
        mask_sizes = {source: metrics.mask_size(source) for source in mask_sources}
        stretched = metrics.aspect_mismatches(mask_sizes, size)
        if stretched and not allow_aspect_change:
            w, h = mask_sizes[stretched[0]]
            raise UserError(
                f"{len(stretched)} of {len(mask_sizes)} masks have another aspect ratio than the predictions' "
                f"{size[0]}x{size[1]} (e.g. {stretched[0]} is {w}x{h}) and would be squashed to it; crop or pad "
                "them, or pass --allow-aspect-change to resize them anyway"
            )
    categories = _categories(pred_files) if protocol != "pose_transfer" else {}

    if isinstance(inception, torch.nn.Module):
        feature_model, inception_path = inception, None
        extractor = f"custom module {type(inception).__name__} (tests only: not comparable with the paper)"
    else:
        feature_model = metrics.load_inception(inception, device)
        given = inception or os.environ.get(metrics.INCEPTION_ENV)
        inception_path = Path(given) / metrics.INCEPTION_FILE if given and Path(given).is_dir() else given
        inception_path = str(inception_path) if inception_path else None
        extractor = (f"clean-fid InceptionV3W ({metrics.INCEPTION_FILE}, TorchScript, 2048-d pool features), "
                     "mode 'clean': PIL bicubic resize to 299x299 in float")
    lpips_model = None
    if "lpips" in wanted:
        lpips_backbone = lpips_backbone or os.environ.get(metrics.LPIPS_ENV)
        lpips_model = metrics.load_lpips(lpips_net, lpips_backbone, device)

    loader_args = dict(batch_size=batch_size, device=device, num_workers=num_workers)
    features = {
        name: metrics.extract_features(files, feature_model, size, description=name, **loader_args)
        for name, files in (("pred", pred_files), ("ref", ref_files))
    }
    kid = "kid_x1000" in wanted
    results = metrics.fid_kid(features["pred"], features["ref"], kid=kid)
    scores = {}
    if pairs is not None:
        scores = metrics.paired_scores(pairs, lpips_model, mask_sources, **loader_args)
        results.update(metrics.mean_scores(scores))
    empty_masks = int(np.isnan(scores["psnr_mask"]).sum()) if "psnr_mask" in scores else 0
    if empty_masks:
        print(f"warning: {empty_masks} of {len(pairs)} masks are empty at the predictions' size: their "
              "pairs are left out of the masked metrics", file=sys.stderr)

    per_category, category_counts = {}, {}
    pred_index = {path: i for i, path in enumerate(pred_files)}
    ref_index = {path: i for i, path in enumerate(ref_files)}
    for category, members in categories.items():
        targets = {metrics.prediction_key(path).target for path in members}
        category_gt = [path for path in gt_files if path.stem in targets]
        values = dict.fromkeys(("fid", "kid_x1000") if kid else ("fid",))
        if min(len(members), len(category_gt)) >= 2:  # a covariance needs two images
            values.update(metrics.fid_kid(features["pred"][[pred_index[p] for p in members]],
                                          features["ref"][[ref_index[g] for g in category_gt]], kid=kid))
        selection = []
        if pairs is not None:
            chosen = set(members)
            selection = [i for i, (pred, _) in enumerate(pairs) if pred in chosen]
            values.update(metrics.mean_scores(scores, selection))
        per_category[category] = values
        category_counts[category] = {"pred": len(members), "gt": len(category_gt), "pairs": len(selection)}
    category_mean = {
        name: (None if any(values[name] is None for values in per_category.values())
               else float(np.mean([values[name] for values in per_category.values()])))
        for name in results
    } if per_category else None  # fmt: skip

    versions = metrics.library_versions()
    result = {
        "protocol": protocol,
        "metrics": results,
        "num_images": {
            "pred": len(pred_files),
            "gt": len(gt_files),
            "fid_ref": len(ref_files),
            "pairs": len(pairs) if pairs is not None else 0,
        },
        "counts": {
            "found": {"pred": len(found_pred), "gt": len(found_gt)},
            "evaluated": {
                "pred": len(pred_files), "gt": len(gt_files), "fid_ref": len(ref_files),
                "pairs": len(pairs) if pairs is not None else 0,
                "masked_pairs": len(pairs) - empty_masks if mask_sources is not None else None,
            },
            "excluded": exclusion,
            "empty_masks": empty_masks if mask_sources is not None else None,
            "per_category": category_counts or None,
            # ground truth no categorised prediction names: in the pooled FID/KID, in no category's
            "gt_without_category": (len(gt_files) - sum(c["gt"] for c in category_counts.values())
                                    if category_counts else None),
        },  # fmt: skip
        "settings": {
            "task": "pose_transfer" if protocol == "pose_transfer" else "tryon",
            "setting": "unpaired" if protocol == "tryon_unpaired" else "paired",
            "pred": str(pred_dir),
            "gt": str(gt_dir),
            "fid_ref": str(fid_ref) if fid_ref else None,
            "exclude": str(exclude) if exclude else None,
            "masks": (str(masks) if masks else f"shards {masks_from_shards}" if masks_from_shards else None),
            "image_size_wh": list(size),
            "native_sizes_wh": {
                "gt": _size_counts(sizes[p] for p in gt_files),
                "fid_ref": _size_counts(sizes[p] for p in ref_files) if fid_ref else None,
                "masks": _size_counts(mask_sizes.values()) if mask_sources is not None else None,
            },
            "resize": "reference resized to the prediction size with LANCZOS if sizes differ (VtonEval)"
            + (f"; {len(squashed)} of another aspect ratio squashed (--allow-aspect-change)" if squashed else ""),
            "fid_kid": "clean-fid 'clean' mode; KID x 1000 (VtonEval, paper tables), numpy seed 0",
            "feature_extractor": extractor,
            "inception": inception_path if inception_path else extractor,
            "psnr": "per image 10 log10(1 / MSE) on [0, 1] RGB (data range 1), mean over images" if has_pairs else None,
            "ssim": "torchmetrics structural_similarity_index_measure, data_range 1.0, Gaussian 11x11 sigma 1.5, "
                    "mean over images" if has_pairs else None,
            "lpips": f"lpips v0.1 {lpips_net}, backbone {lpips_backbone}" if lpips_model else None,
            "masked": (f"white (grey >= {metrics.MASK_THRESHOLD}) = generated region, mask resized nearest to the "
                       "prediction; psnr_mask: MSE over the mask's pixels; ssim_mask: SSIM map averaged over them; "
                       "lpips_mask: LPIPS spatial map averaged over them; mean over images with a non-empty mask")
            if mask_sources is not None else None,
            "implementations": {
                "fid": f"clean-fid {versions['clean-fid']} fid_from_feats",
                "kid": f"clean-fid {versions['clean-fid']} kernel_distance x 1000" if kid else None,
                "psnr": f"torch {versions['torch']} (per image)" if has_pairs else None,
                "ssim": f"torchmetrics {versions['torchmetrics']}" if has_pairs else None,
                "lpips": f"lpips {versions['lpips']} v0.1, net {lpips_net}" if lpips_model else None,
            },
            "libraries": versions,
            "weights": {
                "inception": inception_path,
                "lpips_backbone": str(lpips_backbone) if lpips_model else None,
                "lpips_linear": metrics.lpips_linear_weights(lpips_net) if lpips_model else None,
            },
            "pooling": POOLING if per_category else None,
            "batch_size": batch_size,
            "device": device,
        },
    }
    if per_category:
        result["per_category"] = per_category
        result["category_mean"] = category_mean
    return result


def _categories(pred_files: list[Path]) -> dict[str, list[Path]]:
    """The predictions of each DressCode category present, in the tables' order; {} when no prediction
    is named by a key that carries a category. Some with a category and some without is an error."""
    category = {path: getattr(metrics.prediction_key(path), "category", None) for path in pred_files}
    without = [path.name for path, value in category.items() if value is None]
    if len(without) == len(pred_files):
        return {}
    if without:
        raise UserError(
            f"{len(without)} of {len(pred_files)} predictions are not named by a sample key with a DressCode "
            f"category (e.g. {without[0]}) while the others are: name every prediction by its key "
            "(as leffa predict writes them) to get the per-category metrics, or evaluate them apart"
        )
    return {c: [p for p in pred_files if category[p] == c] for c in CATEGORIES if c in category.values()}


def _size_counts(sizes) -> dict[str, int]:
    """{"WxH": number of images} of (width, height) sizes, most frequent first."""
    counts: dict[str, int] = {}
    for width, height in sizes:
        counts[f"{width}x{height}"] = counts.get(f"{width}x{height}", 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(result: dict) -> str:
    """A small text table: one line per metric, with the protocol and counts above; per category
    (and pooled, and the mean of the categories) when there are categories."""
    counts = result["num_images"]
    lines = [
        f"protocol {result['protocol']}: {counts['pred']} predictions, {counts['fid_ref']} FID "
        f"reference images, {counts['pairs']} pairs (KID is x 1000, as in VtonEval and the paper)",
    ]
    excluded = result.get("counts", {}).get("excluded")
    if excluded:
        lines.append(
            f"left out by --exclude: {excluded['pred']} predictions, {excluded['gt']} ground-truth images "
            f"({excluded['listed']} names listed, {excluded['listed_unmatched']} of them matched no image)"
        )
    lines.append(f"{'metric':<12} {'value':>10}")
    lines += [f"{name:<12} {_cell(value):>10}" for name, value in result["metrics"].items()]
    if result.get("per_category"):
        names = list(result["metrics"])
        lines.append("per category (pooled: all images at once, as the paper's DressCode table; "
                     "mean: of the categories):")
        lines.append(f"{'':<12} " + " ".join(f"{name:>10}" for name in names))
        rows = [*result["per_category"].items(), ("pooled", result["metrics"]), ("mean", result["category_mean"])]
        lines += [f"{row:<12} " + " ".join(f"{_cell(values[n]):>10}" for n in names) for row, values in rows]
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
                        help="resize ground truth (and masks) of another aspect ratio than the predictions' "
                        "(squashing it) instead of refusing it")
    parser.add_argument("--exclude", metavar="FILE",
                        help="text file of test image names or sample keys to leave out, one a line (their target "
                        "ids' predictions and ground truth); the counts left out are in the results")
    masks = parser.add_mutually_exclusive_group()
    masks.add_argument("--masks", metavar="DIR",
                       help="masks (white = generated region) named like the predictions or their ground truth: "
                       "adds psnr_mask, ssim_mask, lpips_mask")
    masks.add_argument("--masks-from-shards", metavar="SHARDS@split",
                       help="the same from the shards' mask.png (default split test)")
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
        exclude=args.exclude, masks=args.masks, masks_from_shards=args.masks_from_shards,
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
