"""The committed tiny VAE (assets/tiny_vae_synthetic) reconstructs held-out synthetic images."""

import json
from pathlib import Path

import pytest
import torch

from data_prep.synthetic_textures import TEXTURES
from replicate.train_tiny_vae import PSNR_FILE, psnr, reconstruct, synthetic_images
from leffa.pretrained import load_vae_folder

FOLDER = Path(__file__).resolve().parents[1] / "assets" / "tiny_vae_synthetic"
# measured on these 6 images per family (64x48): periodic 18.5, ramp 22.1, smooth 22.0, prints 18.3,
# mixed 20.6 dB (16 held-out samples: 17.7, 21.9, 21.8, 18.5, 20.9 dB, in held_out_psnr.json); less 2 dB.
# A VAE with random weights gives about 10 dB.
MIN_PSNR_DB = {"periodic": 16.5, "ramp": 20.0, "smooth": 20.0, "prints": 16.3, "mixed": 18.5}


@pytest.mark.parametrize("family", list(TEXTURES))
def test_committed_vae_reconstructs_held_out_images(family, one_thread):
    vae = load_vae_folder(FOLDER)
    images = synthetic_images(family, "test", 3, 64, 48)  # targets and references of 3 held-out samples
    assert psnr(reconstruct(vae, images), images).mean().item() > MIN_PSNR_DB[family]


def test_scaled_latents_have_about_unit_standard_deviation(one_thread):
    vae = load_vae_folder(FOLDER)
    images = torch.cat([synthetic_images(family, "test", 2, 64, 48) for family in TEXTURES])
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor
    assert 0.7 < latents.std().item() < 1.4
    # the PSNR table written with the weights covers every family
    assert set(json.loads((FOLDER / PSNR_FILE).read_text())) == set(TEXTURES)
