"""Images to the scaled latents the denoiser works on, through the frozen VAE or its cached moments."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from leffa.conditioning import build_conditioning, encoded_images
from leffa.pretrained import vae_scale_factor
from leffa.speed import autocast_on, pinned_copy

__all__ = ["encode_latent", "posterior_moments"]


@torch.no_grad()
def encode_latent(vae, image: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None,
                  moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled VAE latent (B, C, H/f, W/f).

    With a generator, a sample of the VAE's posterior drawn from it on the CPU (so a run's
    randomness stays in the module's own generator), or from one generator per sample (each draws
    its own sample's noise); without, the posterior mode.

    With ``moments``, the image's cached posterior ``(mean, std)`` (``leffa cache-latents``;
    ``batch["moments"]``) stand for the VAE, which does not run: the same latent, drawn the same
    way (the mean is the mode; the sample is ``mean + std * noise``, with the same draw).
    """
    if moments is None:
        dist = vae.encode(image.to(vae.dtype)).latent_dist
        moments = dist.mode(), dist.std
    # float32 also from a VAE stored in bf16 (model.speed.frozen_bf16)
    latent = moments[0].float()
    if generator is not None:
        noise = randn_tensor(latent.shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        latent = latent + moments[1].float() * pinned_copy(noise, latent.device)
    # float32 under autocast (bf16-mixed) and in float32 runs; under bf16-true (no autocast, every
    # weight in bf16) the UNets take the VAE's own dtype
    dtype = torch.float32 if autocast_on(latent.device) else vae.dtype
    return (latent * vae.config.scaling_factor).to(dtype)


@torch.no_grad()
def posterior_moments(vae, conditioning: str, batch: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The VAE posterior's ``(mean, std)`` (float32, (B, C, h, w)) of every image a training step
    of layout ``conditioning`` encodes (``leffa.conditioning.encoded_images``: the target, the
    reference, and the conditioning's images as ``build_conditioning`` makes them): what ``leffa
    cache-latents`` stores and ``batch["moments"]`` carries."""
    images = {"tgt": batch["tgt"], "ref": batch["ref"]}
    factor = vae_scale_factor(vae)
    height, width = batch["tgt"].shape[-2:]
    latent_hw = (height // factor, width // factor)

    def take(image: torch.Tensor, name: str) -> torch.Tensor:
        images[name] = image
        return image.new_zeros(image.shape[0], vae.config.latent_channels, *latent_hw)

    build_conditioning(conditioning, batch, take, latent_hw)
    assert tuple(images) == encoded_images(conditioning), (tuple(images), conditioning)
    moments = {}
    for name, image in images.items():
        posterior = vae.encode(image.to(vae.dtype)).latent_dist
        moments[name] = (posterior.mode().float(), posterior.std.float())
    return moments
