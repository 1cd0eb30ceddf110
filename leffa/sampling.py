"""Reverse diffusion for any architecture behind ``model.architecture``, with classifier-free
guidance over the reference.

The unconditional branch is the zero reference latent, the same as reference dropout in training
(for ``concat_unet``: the garment half zeroed). A diffusers scheduler does the stepping (DDIM by
default, any by name). With ``reference_timestep`` set, the reference is encoded once at that
timestep and serves every step (for ``dual_unet``, the Reference UNet runs once: "reference
acceleration", as the released inference code does at ``"middle"``, the sampling schedule's
middle timestep).

``configs/predict_released.yaml`` sets what the released pipeline does: DDPM with the training
schedule, 50 steps, guidance 2.5 followed by the guidance rescale at the guidance scale (2.5: their
code passes the one as the other), the Reference UNet at every step, no repaint.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import diffusers
import torch
from diffusers.utils.torch_utils import randn_tensor

from leffa.errors import UserError

__all__ = ["SamplingConfig", "make_scheduler", "key_generators", "sample"]

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@dataclass
class SamplingConfig:
    """How to sample: ``model.sampling`` of ``leffa predict``, also what the ``SampleGrid`` pictures use.

    Args:
        scheduler: diffusers scheduler by name (``ddim``, ``ddpm``, ``dpm++``, ``euler``, ``euler_a``, ``unipc``).
        num_steps: denoising steps.
        guidance_scale: classifier-free guidance over the reference (released code: 2.5); 1 turns it off
            and halves the cost.
        guidance_rescale: rescale of Lin et al. 2023 (0: off).
        reference_timestep: run the Reference UNet once at this timestep and reuse it at every step;
            ``middle``: at the sampling schedule's middle timestep, ``timesteps[num_steps // 2]``, as
            the released code's acceleration does (481 for DDPM's 50 steps over 1000); None
            recomputes it at every step with that step's timestep (the released default).
        repaint: paste the unmasked region of the person back onto the result.
        seed: added to each sample's own seed, which comes from its key (see :func:`key_generators`),
            so a sample's image depends on its key and this seed, not on the batch size, the order
            or the number of devices.
    """

    scheduler: str = "ddim"
    num_steps: int = 50
    guidance_scale: float = 2.5
    guidance_rescale: float = 0.0
    reference_timestep: int | Literal["middle"] | None = 500
    repaint: bool = True
    seed: int = 0


def make_scheduler(name: str, training_scheduler) -> diffusers.SchedulerMixin:
    """A sampling scheduler by name, sharing the training scheduler's noise schedule."""
    if name not in SCHEDULERS:
        raise UserError(f"model.sampling.scheduler: unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(training_scheduler.config)


def key_generators(keys: Sequence[str], seed: int = 0) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from its key: the first 8 bytes of the key's SHA-256
    plus ``seed`` (modulo 2**64). The same key and seed give the same noise in any batch."""
    generators = []
    for key in keys:
        key_seed = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "little")
        generators.append(torch.Generator().manual_seed((key_seed + seed) % 2**64))
    return generators


def rescale_noise_cfg(eps_guided: torch.Tensor, eps_cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Sec. 3.4 of Lin et al. 2023 (arXiv 2305.08891): match the guided prediction's per-sample std to
    the conditional one's, then mix by ``rescale``. (diffusers has it only in a module that needs
    ``transformers``, which this project does not install.)"""
    dims = tuple(range(1, eps_cond.ndim))
    rescaled = eps_guided * (eps_cond.std(dim=dims, keepdim=True) / eps_guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * eps_guided


@torch.no_grad()
def sample(
    module,
    batch: dict,
    config: SamplingConfig | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Generate the target images of ``batch`` as ``config`` says; returns (B, 3, H, W) in [-1, 1].

    The one sampler of ``leffa predict`` (``model.sampling``) and of the ``SampleGrid`` pictures.

    Args:
        module: a ``LeffaModule`` (its VAE, denoiser, conditioning layout and training scheduler,
            whose noise schedule the sampling scheduler shares).
        batch: ``tgt`` (the source person; only its unmasked part is seen), ``ref``, ``mask``,
            ``densepose`` as in training.
        config: scheduler, steps, guidance, guidance rescale, reference timestep, repaint (see
            :class:`SamplingConfig`; its ``seed`` is the caller's to use for ``generator``).
        generator: CPU generator for the initial noise and the steps of stochastic schedulers; or
            one generator per sample (see :func:`key_generators`), each drawing all of its sample's
            noise, so that a sample's result does not depend on the batch it is in. Its draws, in
            order: the posterior samples of the conditioning and the reference where the layout
            takes them (``LeffaModule.encode_inputs``), the initial noise, the scheduler's steps.
    """
    config = config or SamplingConfig()
    scheduler = make_scheduler(config.scheduler, module.scheduler)
    num_steps, guidance_scale, reference_timestep = config.num_steps, config.guidance_scale, config.reference_timestep
    device = batch["tgt"].device
    b = batch["tgt"].shape[0]
    if generator is not None and not isinstance(generator, torch.Generator):
        generator = list(generator)
        if len(generator) != b:
            raise ValueError(f"{len(generator)} generators for a batch of {b} samples; give one per sample")
    ref_latent, conditioning = module.encode_inputs(batch, generator)
    latent_hw = tuple(ref_latent.shape[-2:])
    guided = guidance_scale != 1.0
    if guided:
        # (2B, ...): unconditional (zero reference) first, conditional second
        ref_latent = torch.cat([torch.zeros_like(ref_latent), ref_latent])
        conditioning = torch.cat([conditioning, conditioning])

    module.bank.begin(latent_hw)  # no Leffa captures while sampling
    # deterministic schedulers (UniPC) take no generator
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scheduler.set_timesteps(num_steps, device=device)
    # diffusers' randn_tensor draws a sample's slice from its own generator when given a list, as
    # the stochastic schedulers' step() does with the same list
    x = randn_tensor((b, ref_latent.shape[1], *latent_hw), generator=generator, device=torch.device("cpu"))
    x = x.to(device, ref_latent.dtype)
    x = x * scheduler.init_noise_sigma
    if reference_timestep == "middle":
        reference_timestep = scheduler.timesteps[num_steps // 2]
    elif isinstance(reference_timestep, str):
        raise UserError(f"model.sampling.reference_timestep: an integer timestep, 'middle' or null, "
                        f"got {reference_timestep!r}")
    if reference_timestep is not None:
        module.run_reference(ref_latent, torch.full((ref_latent.shape[0],), int(reference_timestep), device=device))

    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        timesteps = t.expand(x_in.shape[0]).to(device)
        if reference_timestep is None:
            module.run_reference(ref_latent, timesteps)
        eps = module.denoise(x_in, timesteps, conditioning)
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            if config.guidance_rescale > 0:
                eps = rescale_noise_cfg(eps, eps_cond, config.guidance_rescale)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample

    image = module.vae.decode(x / module.vae.config.scaling_factor).sample.clamp(-1, 1)
    if config.repaint:
        image = image * batch["mask"] + batch["tgt"] * (1 - batch["mask"])
    return image
