"""A CPU-scale check of the Leffa paper's claim on the synthetic set, which has exact correspondence.

1. Train a baseline stage (diffusion loss only) with the tiny model.
2. From it, continue with the same steps and seed: without the Leffa loss, with it, and with the
   ablations (no head average, no flow upsampling, theta_timestep 1000), for each seed.
3. On held-out samples, at t < theta_timestep, measure per Leffa layer: the end-point error of the
   attention flow against the ground-truth flow (pixels, inside the mask), the warp L2 (Eq. 4) and
   the denoising loss; write ``report.md``, ``results.json`` and pictures.

    python replicate/run.py --out replicate            # the full run (make replicate)
    python replicate/run.py --out /tmp/r --smoke       # a handful of steps, for the test suite
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.__main__ import main as data_prep_main  # noqa: E402
from leffa.data import LeffaDataModule  # noqa: E402
from leffa.data.batch import to_model_batch  # noqa: E402
from leffa.flow_viz import (capture_flows, flow_figure, flow_to_rgb, head_averaged_attention,  # noqa: E402
                             layer_flows, noised_forward, query_attention, warp)
from leffa.losses import coordinate_map, diffusion_loss, warp_loss  # noqa: E402
from leffa.module import LeffaModule  # noqa: E402
from leffa.viz import save_png, to_unit  # noqa: E402
from leffa.visualize import QUERY_POINTS  # noqa: E402

# Continuations of the baseline: name -> module settings (on top of the shared ones below).
RUNS = {
    "no_leffa": dict(use_leffa_loss=False),
    "leffa": dict(use_leffa_loss=True),
    "leffa_per_head": dict(use_leffa_loss=True, average_heads=False),
    "leffa_no_upsample": dict(use_leffa_loss=True, upsample_flow=False),
    "leffa_all_timesteps": dict(use_leffa_loss=True, theta_timestep=1000),
    "leffa_lambda_x10": dict(use_leffa_loss=True, lambda_scale=10.0),
}
EVAL_TIMESTEPS = [100, 250, 400]  # all below theta_timestep = 500


def module_settings(lambda_leffa: float, learning_rate: float) -> dict:
    return dict(
        unet_config=ROOT / "configs/model/tiny_unet.yaml",
        vae_config=ROOT / "configs/model/tiny_vae.yaml",
        # "tryon": mask + masked-image latent. The synthetic DensePose colours each pixel by its
        # reference coordinate, i.e. it would hand the model the answer; try-on conditioning does not.
        conditioning="tryon",
        learning_rate=learning_rate,
        lambda_leffa=lambda_leffa,
        p_drop_ref=0.0,
    )


def train(module: LeffaModule, data: LeffaDataModule, steps: int, seed: int, root: Path, name: str = "") -> float:
    print(f"[replicate] {name or 'training'}: {steps} steps, seed {seed}", flush=True)
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=root)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return time.perf_counter() - start


def end_point_error(flow: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean distance in pixels between a token-grid flow (B, h, w, 2), bilinearly upsampled, and the
    ground truth (B, H, W, 2), over the pixels where the ground truth is defined (not NaN)."""
    H, W = gt.shape[1:3]
    up = F.interpolate(flow.permute(0, 3, 1, 2), size=(H, W), mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
    # normalised -> pixels: x spans W - 1 pixels over [-1, 1], y spans H - 1
    dx, dy = (up[..., 0] - gt[..., 0]) * (W - 1) / 2, (up[..., 1] - gt[..., 1]) * (H - 1) / 2
    return torch.sqrt(dx ** 2 + dy ** 2)[~torch.isnan(gt[..., 0])].mean().item()


def ground_truth_at_grid(batch: dict, grid: tuple[int, int]) -> torch.Tensor:
    """The ground-truth flow averaged over each token's pixels inside the mask (the reference centre
    where a token has none): the best a flow at that token grid can be, (B, h, w, 2)."""
    gt = batch["flow"].permute(0, 3, 1, 2)
    valid = (~torch.isnan(gt[:, :1])).float()
    total = F.interpolate(gt.nan_to_num(0.0) * valid, size=grid, mode="area")
    count = F.interpolate(valid, size=grid, mode="area")
    return (total / count.clamp_min(1e-6)).permute(0, 2, 3, 1)


def ground_truth_scale(batches: list[dict], grids: list[str]) -> dict:
    """Per Leffa token grid: EPE and warp L2 (Eq. 4) of the ground truth itself at that grid."""
    out = {}
    for name in grids:
        grid = tuple(int(v) for v in name.split("x"))
        flows = [(ground_truth_at_grid(b, grid), b) for b in batches]
        out[name] = {"epe_px": statistics.mean(end_point_error(f, b["flow"]) for f, b in flows),
                     "warp_l2": statistics.mean(warp_loss(f, b["ref"], b["tgt"], b["mask"]).mean().item()
                                                for f, b in flows)}
    return out


@torch.no_grad()
def evaluate(module: LeffaModule, batches: list[dict]) -> dict:
    """Mean over samples, timesteps and Leffa layers (and per layer resolution)."""
    module.eval()
    epe, warp, entropy, spread, denoise, per_grid = [], [], [], [], [], {}
    for batch in batches:
        gt = batch["flow"]  # (B, H, W, 2), NaN outside the mask
        centre = torch.where(torch.isnan(gt), gt, torch.zeros_like(gt))  # the reference centre, same mask
        valid = ~torch.isnan(gt[..., 0])
        for t in EVAL_TIMESTEPS:
            prediction, noise = noised_forward(module, batch, timestep=t, seed=t)
            denoise.append(diffusion_loss(prediction, noise).mean().item())
            for item in capture_flows(module).values():
                flow = item["flow"]
                err = end_point_error(flow, gt)
                epe.append(err)
                spread.append(end_point_error(flow, centre))
                per_grid.setdefault(f"{item['capture'].grid[0]}x{item['capture'].grid[1]}", []).append(err)
                warp.append(warp_loss(flow, batch["ref"], batch["tgt"], batch["mask"]).mean().item())
                entropy.append(attention_entropy(item["capture"], module.hparams.tau, valid))
    return {"epe_px": statistics.mean(epe), "warp_l2": statistics.mean(warp), "denoise": statistics.mean(denoise),
            "entropy": statistics.mean(entropy), "spread_px": statistics.mean(spread),
            "epe_px_by_grid": {k: statistics.mean(v) for k, v in sorted(per_grid.items())}}


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


def overfit_check(settings: dict, batch: dict, steps: int, lr: float) -> dict:
    """Can the Leffa loss alone, on one held-out batch at every timestep, pull the attention flow onto
    the ground truth? Adam on the Leffa loss only; metrics of that batch before and after."""
    torch.manual_seed(0)
    module = LeffaModule(**{**settings, "use_leffa_loss": True, "theta_timestep": 1000})
    module.setup("fit")
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    before, losses = evaluate(module, [batch]), []
    for _ in range(steps):
        module.train()
        optimizer.zero_grad(set_to_none=True)
        module.compute_loss(batch, torch.Generator().manual_seed(0), train=False)
        loss = module.leffa_loss(batch["ref"], batch["tgt"], batch["mask"]).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"steps": steps, "lr": lr, "leffa_first": losses[0], "leffa_last": losses[-1], "before": before,
            "after": evaluate(module, [batch])}


def pictures(modules: dict[str, LeffaModule], batch: dict, out: Path) -> list[Path]:
    """Flow pictures of the finest Leffa layer, baseline continuation vs Leffa, same samples."""
    written = []
    for name, module in modules.items():
        flows = layer_flows(module, batch, timestep=250)
        finest = max(flows, key=lambda n: flows[n]["capture"].grid[0])
        item = flows[finest]
        tiles = flow_figure(batch, item["flow"], query_attention(item["capture"], QUERY_POINTS, module.hparams.tau))
        gt = batch["flow"].nan_to_num(0.0)
        extra = torch.stack([flow_to_rgb(gt), to_unit(warp(batch["ref"], gt))], dim=1)
        grid = make_grid(torch.cat([tiles, extra], dim=1).flatten(0, 1), nrow=tiles.shape[1] + 2, padding=2,
                         pad_value=1.0)
        written.append(save_png(grid, out / f"flow_{name}.png"))
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "replicate"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--baseline-steps", type=int, default=800)
    p.add_argument("--steps", type=int, default=250, help="steps of each continuation")
    p.add_argument("--lambda-leffa", type=float, default=0.1)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="continuations to run")
    p.add_argument("--size", type=int, nargs=2, default=[64, 48], metavar=("H", "W"))
    p.add_argument("--train-samples", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--check-steps", type=int, default=200, help="steps of the Leffa-only overfit check")
    p.add_argument("--notes", type=Path, default=ROOT / "replicate/notes.md",
                   help="hand-written reading of the result, appended to the report when the file exists")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite report.md from the results.json already in --out (no training)")
    p.add_argument("--smoke", action="store_true", help="a handful of steps, to check the pipeline")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.baseline_steps, args.steps, args.check_steps = [0], 3, 2, 2
        args.train_samples, args.eval_samples, args.size = 8, 2, [64, 48]
        EVAL_TIMESTEPS[:] = [250]
    out = Path(args.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    h, w = args.size
    shards = out / "work" / "shards"
    if not (shards / "manifest.json").is_file():
        data_prep_main(["synthetic", "--out", str(shards), "--count", str(args.train_samples), "--split", "train",
                        "--height", str(h), "--width", str(w), "--shard-size", "64", "--seed", "0"])
        data_prep_main(["synthetic", "--out", str(shards), "--count", str(args.eval_samples), "--split", "test",
                        "--height", str(h), "--width", str(w), "--shard-size", "64", "--seed", "0"])
    data = LeffaDataModule(train_shards=str(shards), height=h, width=w, batch_size=args.batch_size,
                           num_workers=1, shuffle_buffer=64, hflip=False, val_batch_size=args.eval_samples)
    eval_data = LeffaDataModule(predict_shards=f"{shards}@test", height=h, width=w,
                                val_batch_size=args.batch_size, num_workers=0)
    eval_batches = [to_model_batch(b) for b in eval_data.predict_dataloader()]
    if args.report_only:  # the trained results as they are; the measures of the data and the text anew
        write_report(json.loads((out / "results.json").read_text()), args, eval_batches, out)
        return

    settings = module_settings(args.lambda_leffa, args.learning_rate)
    torch.manual_seed(0)
    baseline = LeffaModule(**settings, use_leffa_loss=False)
    seconds = {"baseline": train(baseline, data, args.baseline_steps, 0, out / "work", "baseline")}
    base_state = {k: v.clone() for k, v in baseline.state_dict().items()}
    results = {"baseline": [evaluate(baseline, eval_batches)]}
    finals = {}
    for name in args.runs:
        options = dict(RUNS[name])
        options["lambda_leffa"] = args.lambda_leffa * options.pop("lambda_scale", 1.0)
        results[name] = []
        for seed in args.seeds:
            module = LeffaModule(**{**settings, **options})
            module.load_state_dict(base_state)
            seconds[f"{name}/{seed}"] = train(module, data, args.steps, seed, out / "work", name)
            results[name].append(evaluate(module, eval_batches))
            finals.setdefault(name, module)
            print(f"{name} seed {seed}: {results[name][-1]}", flush=True)
    shown = {"baseline": baseline, **{name: finals[name] for name in ("no_leffa", "leffa") if name in finals}}
    written = pictures(shown, eval_batches[0], out / "figures")
    start = time.perf_counter()
    check = overfit_check(settings, eval_batches[0], args.check_steps, 1e-3)
    seconds["overfit_check"] = time.perf_counter() - start
    summary = {"settings": {k: str(v) for k, v in vars(args).items()}, "results": results, "overfit_check": check,
               "seconds": seconds, "figures": [str(f.relative_to(out)) for f in written]}
    write_report(summary, args, eval_batches, out)


def write_report(summary: dict, args, eval_batches: list[dict], out: Path) -> None:
    grids = list(summary["results"]["baseline"][0]["epe_px_by_grid"])
    summary.update(identity_epe_px=guess_epe(eval_batches, "identity"), centre_epe_px=guess_epe(eval_batches, "centre"),
                   ground_truth_at_grid=ground_truth_scale(eval_batches, grids))
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(report(summary, args, out))
    print(f"wrote {out / 'report.md'}")


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _row(name: str, runs: list[dict], grids: list[str]) -> str:
    cells = [_cell([r[key] for r in runs]) for key in ("epe_px", "warp_l2", "denoise", "entropy", "spread_px")]
    cells += [_cell([r["epe_px_by_grid"][g] for r in runs]) for g in grids]
    return f"| {name} | " + " | ".join(cells) + " |"


RUN_NOTES = {
    "baseline": "the starting point of every row below",
    "no_leffa": "diffusion loss only",
    "leffa": "+ Leffa loss (paper settings, lambda as stated)",
    "leffa_per_head": "Tab. 8: loss per head, no head average",
    "leffa_no_upsample": "Tab. 8: images downsampled to the flow instead",
    "leffa_all_timesteps": "Fig. 5: theta_timestep 1000",
    "leffa_lambda_x10": "Leffa with 10x lambda",
}


def report(summary: dict, args, out: Path) -> str:
    res = summary["results"]
    grids = list(res["baseline"][0]["epe_px_by_grid"])
    check = summary["overfit_check"]
    lines = [
        "# Leffa on the synthetic set, CPU scale",
        "",
        "Written by `make replicate` (`replicate/run.py`) together with `results.json` (every number, per seed) "
        "and `figures/`.",
        "",
        f"- Tiny model (`configs/model/tiny_unet.yaml`, `tiny_vae.yaml`; the VAE is random and frozen), "
        f"{args.size[0]}x{args.size[1]} synthetic samples ({args.train_samples} train, {args.eval_samples} held out), "
        f"batch {args.batch_size}, AdamW lr {args.learning_rate:g}, try-on conditioning (the synthetic DensePose "
        "colours each pixel by its reference coordinate, i.e. it would hand the model the answer).",
        f"- Baseline: {args.baseline_steps} steps with the diffusion loss only (seed 0). Each continuation then "
        f"trains {args.steps} more steps from it with seeds {args.seeds} (mean ± standard deviation over seeds).",
        f"- Leffa settings: the paper's tau 2.0, theta_resolution 1/32 and theta_timestep 500; lambda_leffa "
        f"{args.lambda_leffa:g} instead of the paper's 1e-3, because a continuation is {args.steps} steps rather "
        "than the paper's 10k+.",
        f"- Measured on the held-out samples at t in {list(EVAL_TIMESTEPS)} (all below theta_timestep), every Leffa "
        f"layer (token grids {', '.join(grids)}): EPE = mean end-point error in pixels between the head-averaged "
        "attention flow (bilinearly upsampled) and the ground-truth flow, inside the mask; warp L2 = Eq. 4; "
        "denoise = epsilon MSE; entropy = entropy of the head-averaged attention of the masked query tokens over "
        "log(number of keys) (1 = uniform attention, 0 = one-hot); flow reach = mean distance in pixels of the "
        f"attention flow from the reference centre (the ground truth's is {summary['centre_epe_px']:.2f} px).",
        f"- For scale, flows that know nothing: the identity map has an EPE of {summary['identity_epe_px']:.2f} px; "
        f"pointing every pixel at the reference centre (what uniform attention gives) {summary['centre_epe_px']:.2f} px.",
        "- The ground truth itself, averaged over each token's pixels (the best flow a token grid can hold): "
        + "; ".join(f"{g}: EPE {v['epe_px']:.2f} px, warp L2 {v['warp_l2']:.4f}"
                    for g, v in summary["ground_truth_at_grid"].items()) + ".",
        "",
        "| run | attention-flow EPE (px) | warp L2 | denoising loss | attention entropy | flow reach (px) |"
        + "".join(f" EPE {g} |" for g in grids) + " what it is |",
        "|---|---|---|---|---|---|" + "---|" * len(grids) + "---|",
    ]
    lines += [_row(name, runs, grids) + f" {RUN_NOTES.get(name, '')} |" for name, runs in res.items()]
    b, a = check["before"], check["after"]
    lines += [
        "",
        f"Leffa-only overfit check (one held-out batch, every timestep, Adam lr {check['lr']:g}, {check['steps']} "
        f"steps on the Leffa loss alone, from random weights): Leffa loss {check['leffa_first']:.3f} -> "
        f"{check['leffa_last']:.3f}; warp L2 {b['warp_l2']:.4f} -> {a['warp_l2']:.4f}; attention-flow EPE "
        f"{b['epe_px']:.2f} -> {a['epe_px']:.2f} px; attention entropy {b['entropy']:.3f} -> {a['entropy']:.3f}; flow "
        f"reach {b['spread_px']:.2f} -> {a['spread_px']:.2f} px.",
        "",
        "Pictures (finest Leffa layer, t = 250, the same held-out samples; columns: target, reference, "
        "attention-flow colour, reference warped by the attention flow, attention of three query points, "
        "ground-truth flow colour, reference warped by the ground truth):",
        "",
    ]
    lines += [f"**{Path(f).stem.removeprefix('flow_')}**\n\n![{Path(f).stem}]({f})\n" for f in summary["figures"]]
    lines += ["Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()), ""]
    if args.notes and Path(args.notes).is_file():
        lines += [Path(args.notes).read_text()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
