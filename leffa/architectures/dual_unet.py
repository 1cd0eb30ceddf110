"""The Leffa paper's architecture (Sec. 3.1): a Generative UNet and a Reference UNet, both stock
diffusers ``UNet2DConditionModel``s without text (``leffa.unets``); each Generative UNet
self-attention layer attends over its own tokens and the matching Reference UNet layer's input
(its processors: ``leffa.architectures.dual_unet_attention``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from leffa.architectures.base import DenoiserSettings, ReferenceDenoiser
from leffa.architectures.dual_unet_attention import (
    ConcatAttention, attach_reference_attention, freeze_unused_reference_parameters,
)
from leffa.attention import ReferenceBank
from leffa.trainable import select_trainable
from leffa.unets import attention_levels, build_unet, halved

__all__ = ["DualUNet"]


class DualUNet(ReferenceDenoiser):
    """Generative + Reference UNet (``model.architecture: dual_unet``).

    Args:
        settings: the shared settings (backbone, conditioning, trainable set, ...).
        num_registers: learnable register tokens per self-attention layer (0: off; see
            :class:`~leffa.architectures.dual_unet_attention.ConcatAttention`).
        freeze_reference_unet: freeze the Reference UNet (Tab. 9 ablation; the paper trains both).
        reference_pretrained_model: another folder for the Reference UNet (default: the backbone's).
    """

    export_folders = {"unet": "generative_unet", "reference_unet": "reference_unet"}
    #: the authors' released files hold these two networks as ``unet.*`` and ``unet_encoder.*``
    released_components = {"unet": "generative_unet", "unet_encoder": "reference_unet"}
    local_args = ("reference_pretrained_model",)
    weight_args = ("num_registers",)

    def __init__(self, settings: DenoiserSettings, num_registers: int = 0, freeze_reference_unet: bool = False,
                 reference_pretrained_model: str | None = None):
        self.generative_unet = build_unet(settings.pretrained_model, settings.unet_config, settings.in_channels,
                                          settings.cross_attention)
        self.reference_unet = build_unet(reference_pretrained_model or settings.pretrained_model,
                                         settings.unet_config, settings.latent_channels, settings.cross_attention)
        self.bank = attach_reference_attention(self.generative_unet, self.reference_unet, num_registers,
                                               ReferenceBank(theta_resolution=settings.theta_resolution))
        self.freeze_reference = freeze_reference_unet
        if freeze_reference_unet:
            self.reference_unet.requires_grad_(False)
        select_trainable(self.components(), settings.trainable, settings.lora, also_train=("generative_unet.conv_in.",))
        # the Reference UNet's head (after its last recorded self-attention input) feeds no loss:
        # frozen here, so every strategy (DDP without find_unused_parameters, FSDP, one device),
        # the optimizer and the EMA see the same trainable set, each of which gets a gradient
        freeze_unused_reference_parameters(self.reference_unet, self.bank)
        if settings.gradient_checkpointing:
            self.generative_unet.enable_gradient_checkpointing()
            self.reference_unet.enable_gradient_checkpointing()

    def components(self) -> dict[str, nn.Module]:
        return {"generative_unet": self.generative_unet, "reference_unet": self.reference_unet}

    def encode_reference(self, ref_latent: torch.Tensor, timesteps: torch.Tensor) -> None:
        """Run the Reference UNet; its processors record every self-attention input in the bank."""
        self.bank.features.clear()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_reference):
            self.reference_unet(ref_latent, timesteps, encoder_hidden_states=None)

    def denoise(self, noisy_latent: torch.Tensor, timesteps: torch.Tensor,
                conditioning: torch.Tensor) -> torch.Tensor:
        """Generative UNet on ``[noisy latent ; conditioning]`` with the recorded reference features."""
        x = torch.cat([noisy_latent, conditioning.to(noisy_latent.dtype)], dim=1)
        return self.generative_unet(x, timesteps, encoder_hidden_states=None).sample

    def leffa_grids(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, float]]:
        """Each Generative UNet self-attention layer, on the latent halved as often as its level."""
        grids = {}
        for name, level in attention_levels(self.generative_unet).items():
            processor = self.generative_unet.attn_processors[name]
            if isinstance(processor, ConcatAttention):
                rows, columns = halved(latent_hw, level)
                grids[processor.name] = (rows, float(columns))
        return grids

    @classmethod
    def export_args(cls, folder: Path) -> dict:
        """The Reference UNet from the export's ``reference_unet`` folder."""
        reference = Path(folder) / "reference_unet"
        return {"reference_pretrained_model": str(reference)} if reference.is_dir() else {}
