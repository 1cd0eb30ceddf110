"""Images of the fidelity study and their scores inside the mask.

Every image is scored the way ``leffa eval`` scores files: written as 8-bit PNGs (prediction,
ground-truth target, mask) and read back by ``leffa.metrics.paired_scores``, whose ``psnr_mask`` and
``ssim_mask`` are the masked PSNR and SSIM. Every candidate is composited as ``leffa predict``'s
repaint does: the candidate inside the mask, the target outside.

The scale rows need no model:

- ``flat``: every masked pixel the reference's mean colour;
- ``paste``: the reference pasted unwarped;
- ``gt_warp_vae``: the reference warped by the ground-truth flow, then encoded and decoded by the
  VAE (posterior mode): the best this VAE lets a generator reach;
- ``vae_recon``: the target itself encoded and decoded by the VAE.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
from torchvision.utils import save_image

from leffa.losses import warp
from leffa.metrics import paired_scores
from leffa.sampling import SamplingConfig, key_generators, sample
from leffa.pictures import to_unit

SCALE_ROWS = ("flat", "paste", "gt_warp_vae", "vae_recon")
SCORES = ("psnr_mask", "ssim_mask", "psnr")


def composite(candidate: torch.Tensor, batch: dict) -> torch.Tensor:
    """The candidate (B, 3, H, W) in [-1, 1] inside the mask, the target outside (repaint)."""
    mask = batch["mask"]
    return candidate * mask + batch["tgt"] * (1 - mask)


@torch.no_grad()
def vae_roundtrip(vae, image: torch.Tensor) -> torch.Tensor:
    """Encode (posterior mode) and decode; (B, 3, H, W) in [-1, 1]."""
    return vae.decode(vae.encode(image).latent_dist.mode()).sample.clamp(-1, 1)


def scale_images(batch: dict, vae) -> dict[str, torch.Tensor]:
    """The four scale rows' images of one batch, composited."""
    ref = batch["ref"]
    flat = ref.mean(dim=(2, 3), keepdim=True).expand_as(ref)
    warped = composite(warp(ref, batch["flow"].nan_to_num(0.0)), batch)  # NaN outside the mask
    return {"flat": composite(flat, batch), "paste": composite(ref, batch),
            "gt_warp_vae": composite(vae_roundtrip(vae, warped), batch),
            "vae_recon": composite(vae_roundtrip(vae, batch["tgt"]), batch)}


@torch.no_grad()
def sampled_images(module, batches: list[dict], config: SamplingConfig) -> torch.Tensor:
    """``leffa predict``'s images of every held-out sample (each sample's noise from its key)."""
    module.eval()
    return torch.cat([sample(module, b, config, key_generators(b["key"], config.seed)) for b in batches])


def score(images: torch.Tensor, batches: list[dict]) -> dict:
    """Means over samples of ``SCORES`` and the per-sample masked PSNR, through ``paired_scores``."""
    targets = torch.cat([b["tgt"] for b in batches])
    masks = torch.cat([b["mask"] for b in batches])
    with tempfile.TemporaryDirectory() as tmp:
        pairs, mask_files = [], []
        for i, (image, target, mask) in enumerate(zip(images, targets, masks)):
            files = [Path(tmp) / f"{kind}_{i:04d}.png" for kind in ("pred", "gt", "mask")]
            save_image(to_unit(image[None])[0], files[0])
            save_image(to_unit(target[None])[0], files[1])
            save_image(to_unit(mask[None])[0], files[2])
            pairs.append((files[0], files[1]))
            mask_files.append(files[2])
        scores = paired_scores(pairs, None, mask_files)
    out = {name: statistics.mean(float(v) for v in scores[name]) for name in SCORES}
    out["psnr_mask_per_sample"] = [float(v) for v in scores["psnr_mask"]]
    return out


def scale_scores(batches: list[dict], vae) -> tuple[dict, dict[str, torch.Tensor]]:
    """({row: scores}, {row: images}) of the scale rows on the held-out batches."""
    images: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        for row, image in scale_images(batch, vae).items():
            images.setdefault(row, []).append(image)
    stacked = {row: torch.cat(parts) for row, parts in images.items()}
    return {row: score(stacked[row], batches) for row in SCALE_ROWS}, stacked
