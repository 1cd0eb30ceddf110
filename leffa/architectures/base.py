"""What :class:`leffa.module.LeffaModule` needs of an architecture: a denoiser with reference
attention.

The module owns everything around it (VAE, noise schedule, losses, the random stream, EMA,
optimizer, logging); an architecture owns its networks and how the reference reaches them. A new
architecture is one new file in this package that implements :class:`ReferenceDenoiser` and one
entry in ``leffa.architectures.ARCHITECTURES``.

Per forward pass the module calls, in order: ``bank.begin(...)`` (the latent size and which
samples' Leffa captures to take), ``encode_reference(ref_latent, timesteps)``, then
``denoise(noisy_latent, timesteps, conditioning)``; the Leffa loss reads ``bank.captures``
(queries of the generated image against keys of the reference, per selected attention layer).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from leffa.attention import ReferenceBank

__all__ = ["ReferenceDenoiser"]


class ReferenceDenoiser(Protocol):
    """A latent denoiser whose attention sees a reference image (try-on garment, pose source)."""

    #: shared state of one forward pass: reference features, Leffa layer selection, captures
    bank: ReferenceBank
    #: the folders of a ``leffa export`` and the component each holds (a class attribute, so an
    #: export can be read without building the networks)
    export_folders: dict[str, str]

    def components(self) -> dict[str, nn.Module]:
        """The trainable networks by name; the module registers them under these names, which are
        the prefixes of their weights in checkpoints. Every parameter that requires a gradient
        must get one from the loss (DDP runs without ``find_unused_parameters``): freeze the rest."""
        ...

    def encode_reference(self, ref_latent: torch.Tensor, timesteps: torch.Tensor) -> None:
        """Make the reference latent (B, 4, h, w) available to the next ``denoise`` calls (all of
        them: sampling may encode it once and denoise many times)."""
        ...

    def denoise(self, noisy_latent: torch.Tensor, timesteps: torch.Tensor,
                conditioning: torch.Tensor) -> torch.Tensor:
        """Epsilon prediction (B, 4, h, w) for ``noisy_latent`` with the conditioning channels
        (``leffa.conditioning``) and the encoded reference."""
        ...

    def shard(self, mesh: DeviceMesh, param_dtype: torch.dtype | None) -> None:
        """Shard the networks over the 1-D data-parallel ``mesh`` with FSDP2 (``leffa.parallel``);
        ``param_dtype``: the dtype parameters are gathered and computed in."""
        ...
