"""Train the tiny VAE of the synthetic world: a diffusers ``AutoencoderKL`` (the architecture of
configs/model/tiny_vae.yaml, 8x downsampling, 4 latent channels) fitted to the synthetic set's
target and reference images of every texture family, so that the tiny model's sample grids decode
to pictures instead of noise.

    python -m replicate.train_tiny_vae --out assets/tiny_vae_synthetic [--steps 600] [--threads 1]

(about 5 minutes on one CPU core; the committed folder was written by exactly this command)

Images come from the synthetic generator (``data_prep.synthetic``, no download): the ``train``
split at 64x48 and random 64x48 crops of the ``train`` split at 128x96 (the same content at twice
the scale); the held-out set is the ``test`` split at both sizes. Loss: mean squared error of the
reconstruction of a posterior sample, plus ``--kl-weight`` times the KL divergence per latent value
(small: the latent keeps the detail, the KL only keeps it bounded). The saved config's
``scaling_factor`` is 1 / (standard deviation of the training images' latents), so that the scaled
latents the diffusion model sees have unit standard deviation.

Writes ``<out>/config.json``, ``<out>/diffusion_pytorch_model.safetensors`` (``save_pretrained``)
and ``<out>/held_out_psnr.json`` (reconstruction PSNR in dB per family and size, posterior mode).
The folder is written under a temporary name beside ``--out`` and renamed when complete; an
existing non-empty ``--out`` is refused.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import yaml
from diffusers import AutoencoderKL
from PIL import Image

from data_prep.synthetic import SyntheticSpec, load_sample
from data_prep.synthetic_textures import TEXTURES
from leffa.errors import UserError, user_errors_as_one_line

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "model" / "tiny_vae.yaml"
PSNR_FILE = "held_out_psnr.json"
SIZES = ((64, 48), (128, 96))  # (height, width); training crops are 64x48
CROP = SIZES[0]


def synthetic_images(family: str, split: str, count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Targets and references of ``count`` synthetic samples of ``family``: (2 * count, 3, H, W) in [-1, 1],
    decoded from the JPEGs the shards hold (what the model sees)."""
    images = []
    for index in range(count):
        spec = SyntheticSpec(f"vae_{index:06d}", f"seed {seed} {split} #{index}", split, "paired", index, seed,
                             height, width, family)
        sample = load_sample(spec)
        for name in ("tgt.jpg", "ref.jpg"):
            with Image.open(io.BytesIO(sample[name])) as image:
                images.append(np.asarray(image.convert("RGB"), dtype=np.float32))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1


def psnr(reconstruction: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1], measured on [0, 1]: (B,)."""
    error = ((reconstruction.clamp(-1, 1) - image) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / error.clamp_min(1e-10))


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Decode of the posterior mode, batch by batch."""
    vae.eval()
    parts = [vae.decode(vae.encode(chunk).latent_dist.mode()).sample for chunk in images.split(batch_size)]
    return torch.cat(parts)


@torch.no_grad()
def held_out_psnr(vae: AutoencoderKL, count: int = 16, seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean reconstruction PSNR (dB) of ``count`` held-out samples (targets and references) per family and size."""
    table: dict[str, dict[str, float]] = {}
    for family in TEXTURES:
        for height, width in SIZES:
            images = synthetic_images(family, "test", count, height, width, seed)
            table.setdefault(family, {})[f"{height}x{width}"] = psnr(reconstruct(vae, images), images).mean().item()
    return table


@torch.no_grad()
def latent_std(vae: AutoencoderKL, image_sets: list[torch.Tensor], batch_size: int = 64) -> float:
    """Standard deviation of the posterior modes (unscaled) of all images of ``image_sets``."""
    vae.eval()
    latents = [vae.encode(chunk).latent_dist.mode().flatten()
               for images in image_sets for chunk in images.split(batch_size)]
    return torch.cat(latents).std().item()


def training_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per family ``count`` samples at 64x48 and ``count // 2`` at 128x96 (train split): two tensors."""
    small = torch.cat([synthetic_images(f, "train", count, *SIZES[0], seed) for f in TEXTURES])
    large = torch.cat([synthetic_images(f, "train", count // 2, *SIZES[1], seed) for f in TEXTURES])
    return small, large


def random_batch(small: torch.Tensor, large: torch.Tensor, batch_size: int, g: torch.Generator) -> torch.Tensor:
    """Half whole 64x48 images, half random 64x48 crops of 128x96 images, each maybe mirrored."""
    half = batch_size // 2
    whole = small[torch.randint(len(small), (batch_size - half,), generator=g)]
    picks = torch.randint(len(large), (half,), generator=g)
    tops = torch.randint(large.shape[-2] - CROP[0] + 1, (half,), generator=g)
    lefts = torch.randint(large.shape[-1] - CROP[1] + 1, (half,), generator=g)
    crops = torch.stack([large[i, :, t:t + CROP[0], l:l + CROP[1]] for i, t, l in zip(picks, tops, lefts)])
    batch = torch.cat([whole, crops])
    flip = torch.rand(len(batch), generator=g) < 0.5
    return torch.where(flip[:, None, None, None], batch.flip(-1), batch)


def train(steps: int, batch_size: int, lr: float, kl_weight: float, count: int, seed: int,
          log_every: int = 50) -> AutoencoderKL:
    """The trained VAE (its ``scaling_factor`` set from the training latents)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    small, large = training_images(count, seed)
    vae = AutoencoderKL(**yaml.safe_load(CONFIG.read_text()))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch = random_batch(small, large, batch_size, g)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(g)).sample
        mse = (reconstruction - batch).pow(2).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            print(f"step {step}/{steps}  mse {mse.item():.4f}  kl/value {kl.item():.2f}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    std = latent_std(vae, [small, large])
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae.eval()


def save(vae: AutoencoderKL, table: dict, out: Path) -> Path:
    """Write the VAE folder and its PSNR table under a temporary name, then rename it to ``out``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not empty; remove it or give a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    try:
        vae.save_pretrained(staging, safe_serialization=True)
        (staging / PSNR_FILE).write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m replicate.train_tiny_vae", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="new folder for the diffusers AutoencoderKL")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4, help="weight of the KL divergence per latent value")
    p.add_argument("--count", type=int, default=200, help="training samples per family at 64x48 (half at 128x96)")
    p.add_argument("--held-out", type=int, default=16, help="held-out samples per family and size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2 or args.count < 2 or args.held_out < 1:
        raise UserError("need --steps >= 1, --batch-size >= 2, --count >= 2 and --held-out >= 1")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):  # before the long run
        raise UserError(f"--out {args.out} already exists and is not empty; remove it or give a new folder")
    torch.set_num_threads(args.threads)
    vae = train(args.steps, args.batch_size, args.lr, args.kl_weight, args.count, args.seed)
    table = held_out_psnr(vae, args.held_out, args.seed)
    save(vae, table, args.out)
    print(f"scaling_factor {vae.config.scaling_factor:.4f}; held-out reconstruction PSNR (dB):")
    for family, row in table.items():
        print(f"  {family:9s} " + "  ".join(f"{size} {value:5.2f}" for size, value in row.items()))
    print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    user_errors_as_one_line(main)
