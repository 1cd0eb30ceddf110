"""The Leffa paper's architecture (Sec. 3.1): a Generative UNet and a Reference UNet, both stock
diffusers ``UNet2DConditionModel``s without text (``leffa.unets``); each Generative UNet
self-attention layer attends over its own tokens and the matching Reference UNet layer's input
(``leffa.attention``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from leffa.attention import ReferenceBank, attach_reference_attention
from leffa.parallel import freeze_unused_reference_parameters, shard_unets
from leffa.trainable import LoraSettings, select_trainable
from leffa.unets import build_unet

__all__ = ["DualUNet", "LATENT_CHANNELS"]

LATENT_CHANNELS = 4


class DualUNet:
    """Generative + Reference UNet (a :class:`~leffa.architectures.base.ReferenceDenoiser`).

    Args:
        pretrained_model: local SD1.5(-inpainting) or SDXL(-inpainting) folder for both UNets (None:
            ``unet_config``).
        reference_pretrained_model: another folder for the Reference UNet.
        unet_config: ``UNet2DConditionModel`` config used when no folder is given.
        in_channels: the Generative UNet's input channels (latent + conditioning).
        num_registers: learnable register tokens per self-attention layer.
        theta_resolution: Leffa layer selection, Sec. 3.3.
        freeze_reference: freeze the Reference UNet (Tab. 9 ablation).
        gradient_checkpointing: recompute UNet blocks in backward.
        trainable: which parameters train: ``all``, ``attention`` or ``lora`` (``leffa.trainable``).
        lora: the adapters of ``trainable="lora"``.
        conditioning: the conditioning layout (``leffa.conditioning``); its channels are all this
            architecture needs of it (``in_channels``).
        cross_attention: ``passthrough`` or ``removed`` (``leffa.unets.set_cross_attention``).
    """

    #: ``leffa export`` folder -> component
    export_folders = {"unet": "generative_unet", "reference_unet": "reference_unet"}

    def __init__(self, pretrained_model: str | None, reference_pretrained_model: str | None, unet_config: dict | None,
                 in_channels: int, num_registers: int = 0, theta_resolution: float = 1.0 / 32,
                 freeze_reference: bool = False, gradient_checkpointing: bool = False, trainable: str = "all",
                 lora: LoraSettings | None = None, conditioning: str = "tryon", cross_attention: str = "passthrough"):
        self.generative_unet = build_unet(pretrained_model, unet_config, in_channels, cross_attention)
        self.reference_unet = build_unet(reference_pretrained_model or pretrained_model, unet_config, LATENT_CHANNELS,
                                         cross_attention)
        self.bank = attach_reference_attention(self.generative_unet, self.reference_unet, num_registers,
                                               ReferenceBank(theta_resolution=theta_resolution))
        self.freeze_reference = freeze_reference
        if freeze_reference:
            self.reference_unet.requires_grad_(False)
        select_trainable(self.generative_unet, self.reference_unet, trainable, lora)
        # the Reference UNet's head (after its last recorded self-attention input) feeds no loss:
        # frozen here, so every strategy (DDP without find_unused_parameters, FSDP, one device),
        # the optimizer and the EMA see the same trainable set, each of which gets a gradient
        self.unused_reference_parameters = freeze_unused_reference_parameters(self.reference_unet, self.bank)
        if gradient_checkpointing:
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

    def shard(self, mesh: DeviceMesh, param_dtype: torch.dtype | None) -> None:
        """FSDP2 over both UNets (see ``leffa.parallel``)."""
        shard_unets(self.generative_unet, self.reference_unet, mesh, param_dtype)
