"""What :class:`leffa.module.LeffaModule` needs of an architecture: a denoiser with reference
attention, and the one settings object every architecture is built from.

The module owns everything around it (VAE, noise schedule, losses, the random stream, EMA,
optimizer, logging); an architecture owns its networks, how the reference reaches them, their
attention processors, which of their parameters train, how they are sharded, where their weights
go in an export and in the authors' released files. A new architecture is one class that
subclasses :class:`ReferenceDenoiser` (in a file of its own, anywhere importable) and a config that
names it::

    model:
      architecture:
        class_path: my_package.my_file.MyDenoiser
        init_args: {my_setting: 3}     # its own arguments only; the parser checks them

Its ``__init__`` takes the :class:`DenoiserSettings` first, then its own keyword arguments.

Per forward pass the module calls, in order: ``bank.begin(...)`` (the latent size and which
samples' Leffa captures to take), ``encode_reference(ref_latent, timesteps)``, then
``denoise(noisy_latent, timesteps, conditioning)``; the Leffa loss reads ``bank.captures``
(queries of the generated image against keys of the reference, per selected attention layer).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from leffa.attention import ReferenceBank
from leffa.conditioning import conditioning_channels
from leffa.trainable import LoraSettings

__all__ = ["DenoiserSettings", "ReferenceDenoiser", "DenoiserFactory"]


@dataclasses.dataclass(frozen=True)
class DenoiserSettings:
    """The settings every architecture shares (``model.*`` keys of the same names; the module
    builds this once and hands it to the architecture).

    Args:
        pretrained_model: the backbone: a local SD1.5(-inpainting) or SDXL(-inpainting) diffusers
            folder, or None to build from ``unet_config``.
        unet_config: ``UNet2DConditionModel`` config used when no folder is given.
        latent_channels: channels of the VAE's latent (the noisy latent, the reference latent).
        conditioning: the conditioning layout (``leffa.conditioning``).
        cross_attention: ``passthrough`` or ``removed`` (``leffa.unets.set_cross_attention``).
        theta_resolution: Leffa layer selection, Sec. 3.3.
        trainable: which parameters train (``leffa.trainable``).
        lora: the adapters of ``trainable: lora``.
        gradient_checkpointing: recompute network blocks in backward.
    """

    pretrained_model: str | None
    unet_config: dict | None
    latent_channels: int
    conditioning: str
    cross_attention: str = "passthrough"
    theta_resolution: float = 1.0 / 32
    trainable: str = "all"
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    gradient_checkpointing: bool = False

    @property
    def in_channels(self) -> int:
        """Input channels of a denoiser that takes the noisy latent and the conditioning channels."""
        return self.latent_channels + conditioning_channels(self.conditioning)


class ReferenceDenoiser(ABC):
    """A latent denoiser whose attention sees a reference image (try-on garment, pose source)."""

    #: shared state of one forward pass: reference features, Leffa layer selection, captures
    bank: ReferenceBank
    #: the folders of a ``leffa export`` and the component each holds (recorded in the export's
    #: ``leffa.json``)
    export_folders: ClassVar[dict[str, str]]
    #: the authors' released ``.pth`` layout: key prefix -> component (None: no such layout)
    released_components: ClassVar[dict[str, str] | None] = None
    #: own arguments that name files on this machine: a resume may change them, an export drops them
    local_args: ClassVar[tuple[str, ...]] = ()
    #: own arguments that change what the weights are: validate, test and predict compare them with
    #: the checkpoint's (a resume compares every argument but ``local_args``)
    weight_args: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def components(self) -> dict[str, nn.Module]:
        """The trainable networks by name; the module registers them under these names, which are
        the prefixes of their weights in checkpoints. Every parameter that requires a gradient
        must get one from the loss (DDP runs without ``find_unused_parameters``): freeze the rest."""

    @abstractmethod
    def encode_reference(self, ref_latent: torch.Tensor, timesteps: torch.Tensor) -> None:
        """Make the reference latent (B, C, h, w) available to the next ``denoise`` calls (all of
        them: sampling may encode it once and denoise many times)."""

    @abstractmethod
    def denoise(self, noisy_latent: torch.Tensor, timesteps: torch.Tensor,
                conditioning: torch.Tensor) -> torch.Tensor:
        """Epsilon prediction (B, C, h, w) for ``noisy_latent`` with the conditioning channels
        (``leffa.conditioning``) and the encoded reference."""

    def leffa_grids(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, float]]:
        """Every attention layer that can capture for the Leffa loss, by its capture name, with its
        (h, w) token grid at this latent size (``leffa.leffa_layers`` selects among them; a width
        that is not a whole number is refused there). None by default: no Leffa layer."""
        return {}

    def shard(self, mesh: DeviceMesh, param_dtype: torch.dtype | None) -> None:
        """Shard the networks over the 1-D data-parallel ``mesh`` with FSDP2: by default each
        component, block by block (``leffa.parallel.shard_modules``)."""
        from leffa.parallel import shard_modules

        shard_modules(self.components().values(), mesh, param_dtype)

    @classmethod
    def export_args(cls, folder: Path) -> dict:
        """Own arguments that rebuild the denoiser from a ``leffa export`` folder (whose ``unet``
        folder is the backbone, ``pretrained_model``); none by default."""
        return {}


#: what ``model.architecture`` holds once parsed: called with the shared settings
DenoiserFactory = Callable[[DenoiserSettings], ReferenceDenoiser]
