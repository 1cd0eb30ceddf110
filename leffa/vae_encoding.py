"""Images to the scaled latents the denoiser works on, through the frozen VAE or its cached moments."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from leffa.speed import autocast_on, pinned_copy

__all__ = ["encode_latent"]


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
