"""The fidelity study's jobs: one training run of ``make demo``'s protocol, measured; the scale rows.

The protocol is read from the demo's own configs, so that the study follows them:
``configs/tiny_synthetic.yaml`` (tiny UNet, trained tiny VAE, conditioning, lambda_leffa, AdamW
settings, steps, EMA decay, batch, size) and, for ``concat_unet``, ``configs/concat/concat_unet.yaml``
on top (try-on conditioning, ``trainable: attention``, pass-through cross-attention). Each run
starts from random weights seeded by its seed; only ``use_leffa_loss`` differs between the two arms.
Runs execute in one-thread worker processes (``replicate.jobs.init_worker``) and return plain data.
"""

from __future__ import annotations

import functools
import importlib
import time
from pathlib import Path

import torch
import yaml

import leffa
from leffa.data import LeffaDataModule
from leffa.ema import TrainableEMA
from leffa.module import LeffaModule
from leffa.sampling import SamplingConfig
from replicate import fidelity_scores, jobs, measure

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "tiny_synthetic.yaml"
CONCAT = ROOT / "configs" / "concat" / "concat_unet.yaml"


def _class(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def demo_protocol() -> dict:
    """What the study takes from ``make demo``'s config: steps, batch, size, EMA decay, optimizer."""
    demo = yaml.safe_load(DEMO.read_text())
    ema = next(c["init_args"]["decay"] for c in demo["trainer"]["callbacks"] if c["class_path"].endswith("TrainableEMA"))
    optimizer = demo["model"]["optimizer"]
    return {"steps": demo["trainer"]["max_steps"], "batch_size": demo["data"]["batch_size"],
            "size": [demo["data"]["height"], demo["data"]["width"]], "ema_decay": ema,
            "optimizer": optimizer["class_path"], "optimizer_args": optimizer["init_args"],
            "seed_everything": demo["seed_everything"]}


def module_settings(architecture: str, use_leffa_loss: bool) -> dict:
    """``LeffaModule`` keywords of the demo's model section (paths resolved against configs/)."""
    model = dict(yaml.safe_load(DEMO.read_text())["model"])
    if architecture == "concat_unet":
        model.update(yaml.safe_load(CONCAT.read_text())["model"])
    elif architecture != "dual_unet":
        raise ValueError(f"architecture: dual_unet or concat_unet, got {architecture!r}")
    optimizer = model.pop("optimizer")
    args = optimizer["init_args"]
    model.update(
        architecture=architecture,
        unet_config=DEMO.parent / model["unet_config"],
        vae_pretrained=str((DEMO.parent / model["vae_pretrained"]).resolve()),
        use_leffa_loss=use_leffa_loss,
        learning_rate=args["lr"],
        optimizer=functools.partial(_class(optimizer["class_path"]), **args),
    )
    return model


def training_run(architecture: str, family: str, use_leffa_loss: bool, seed: int, steps: int, folder: str,
                 size: tuple[int, int], batch_size: int, ema_decay: float, sampling: dict, work: str) -> dict:
    """Train from random weights (seed ``seed``) with the EMA, then measure the averaged weights on the
    held-out split: the sampled images' scores, the flow EPE per token grid, the denoising loss."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    module = LeffaModule(**module_settings(architecture, use_leffa_loss))
    data = LeffaDataModule(train_shards=folder, height=size[0], width=size[1], batch_size=batch_size,
                           num_workers=0, shuffle_buffer=64, hflip=False, seed=seed)
    arm = "leffa" if use_leffa_loss else "no_leffa"
    print(f"[fidelity] {architecture} {family} {arm} seed {seed}: {steps} steps", flush=True)
    jobs.train(module, data, [steps], seed, Path(work), None, callbacks=[TrainableEMA(decay=ema_decay)])
    trained = time.perf_counter() - start
    batches = jobs.held_out(Path(folder), size, batch_size)  # the EMA weights are in place after fit
    flows = measure.evaluate(module, batches)
    images = fidelity_scores.sampled_images(module, batches, SamplingConfig(**sampling))
    return {"architecture": architecture, "family": family, "run": arm, "seed": seed,
            **fidelity_scores.score(images, batches),
            "epe_px": {grid: m["epe_px"] for grid, m in flows["by_grid"].items()},
            "entropy": {grid: m["entropy"] for grid, m in flows["by_grid"].items()},
            "denoise": flows["denoise"], "images": images, "train_seconds": trained,
            "seconds": time.perf_counter() - start}


def scale_run(family: str, folder: str, size: tuple[int, int], batch_size: int) -> dict:
    """The scale rows of one family's held-out samples (the demo's VAE), with their images."""
    module = LeffaModule(**module_settings("dual_unet", False))
    batches = jobs.held_out(Path(folder), size, batch_size)
    scores, images = fidelity_scores.scale_scores(batches, module.vae)
    return {"family": family, "scores": scores, "images": images, "leffa_package": str(Path(leffa.__file__).parent),
            "reference": torch.cat([b["ref"] for b in batches]), "target": torch.cat([b["tgt"] for b in batches]),
            "flow_guess_epe_px": {g: measure.guess_epe(batches, g) for g in ("identity", "centre")}}
