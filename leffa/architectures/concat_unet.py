"""A CatVTON-style single UNet (Leffa paper Tab. 4: the Leffa loss on another model): one stock
diffusers ``UNet2DConditionModel`` (the SD1.5- or SDXL-inpainting layout, without text as
``leffa.unets`` builds it: CatVTON's code also keeps the blocks' cross-attention step as a
pass-through, our ``passthrough``; no Reference UNet) sees the person and the garment side by side along the latent width, so its own
self-attention relates them; the Leffa loss reads that attention (``leffa.attention.WidthConcatAttention``).

Layout of the UNet input, (B, 4 + conditioning channels, h, 2w), left half the person, right half
the garment:

- noisy-latent slot: ``[noisy person latent | garment latent]``;
- mask slot: ``[mask | zeros]``;
- masked-image slot: ``[masked person latent | garment latent]``.

The garment half is given clean, in both slots, at every timestep (as the Reference UNet of
``dual_unet`` sees the clean reference at timestep t), and only the person half of the prediction is
returned: ``denoise`` gives (B, 4, h, w) like ``dual_unet``, so the module's diffusion loss, noise
and random stream are unchanged. The one deliberate difference from CatVTON, which noises and
predicts both halves.

Reference dropout and the unconditional branch of guidance zero the reference latent before
``encode_reference``; here that zeroes the garment half in both slots, CatVTON's rule.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from leffa.attention import ReferenceBank, attach_width_concat_attention
from leffa.conditioning import LAYOUTS, PART_CHANNELS
from leffa.errors import UserError
from leffa.parallel import shard_unets
from leffa.trainable import LoraSettings, select_trainable
from leffa.unets import build_unet, pretrained_input_channels

__all__ = ["ConcatUNet"]

# what the garment half holds in each conditioning part: zeros for a mask, the garment latent for
# an image latent; layouts with other parts (pose images and latents) have no garment half
GARMENT_HALF = {"mask": "zeros", "masked_image": "garment"}


class ConcatUNet:
    """One UNet over ``[person | garment]`` (a :class:`~leffa.architectures.base.ReferenceDenoiser`).

    Args:
        pretrained_model: local SD1.5- or SDXL-inpainting folder for the UNet (None: ``unet_config``).
        reference_pretrained_model: must be None (there is no Reference UNet).
        unet_config: ``UNet2DConditionModel`` config used when no folder is given.
        in_channels: the UNet's input channels (latent + conditioning).
        num_registers: must be 0 (no register tokens in this architecture).
        theta_resolution: Leffa layer selection, Sec. 3.3, on the person half's token grid.
        freeze_reference: must be False (there is no Reference UNet).
        gradient_checkpointing: recompute UNet blocks in backward.
        trainable: which parameters train (``leffa.trainable``): ``attention`` is CatVTON's recipe
            (every self-attention layer, plus ``conv_in`` when its input channels are new; the rest
            frozen; the concat configs set it), ``all`` or ``lora``.
        lora: the adapters of ``trainable="lora"``.
        conditioning: the conditioning layout (``leffa.conditioning``); ``tryon`` only.
        cross_attention: ``passthrough`` or ``removed`` (``leffa.unets.set_cross_attention``).
    """

    #: ``leffa export`` folder -> component
    export_folders = {"unet": "unet"}

    def __init__(self, pretrained_model: str | None, reference_pretrained_model: str | None, unet_config: dict | None,
                 in_channels: int, num_registers: int = 0, theta_resolution: float = 1.0 / 32,
                 freeze_reference: bool = False, gradient_checkpointing: bool = False, trainable: str = "attention",
                 lora: LoraSettings | None = None, conditioning: str = "tryon", cross_attention: str = "passthrough"):
        _refuse_dual_unet_settings(reference_pretrained_model, num_registers, freeze_reference)
        parts = LAYOUTS.get(conditioning, ())
        if not parts or any(part not in GARMENT_HALF for part in parts):
            raise UserError(f"model.conditioning: concat_unet takes the try-on layout only (conditioning: tryon, "
                            f"mask and masked image), got {conditioning!r}, which has no garment half")
        self.parts = parts
        self.unet = build_unet(pretrained_model, unet_config, in_channels, cross_attention)
        self.bank = attach_width_concat_attention(self.unet, ReferenceBank(theta_resolution=theta_resolution))
        # conv_in trains with the attention (or adapters) only when its input channels are new: an
        # SD1.5-inpainting UNet already takes these 9 (CatVTON then trains 49.57 M parameters)
        new_inputs = pretrained_input_channels(pretrained_model, unet_config) != in_channels
        select_trainable(self.unet, None, trainable, lora, train_conv_in=new_inputs)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.garment: torch.Tensor | None = None

    def components(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    def encode_reference(self, ref_latent: torch.Tensor, timesteps: torch.Tensor) -> None:
        """Keep the garment latent (B, 4, h, w) for the next ``denoise`` calls; no network runs, and
        the garment is clean whatever the timestep."""
        self.garment = ref_latent

    def concat_input(self, noisy_latent: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        """The UNet input (B, 4 + conditioning channels, h, 2w): ``[person | garment]`` (module docstring)."""
        garment = self.garment
        if garment is None:
            raise RuntimeError("no garment latent: call encode_reference before denoise")
        if garment.shape != noisy_latent.shape:
            raise ValueError(f"garment latent {tuple(garment.shape)} and noisy latent {tuple(noisy_latent.shape)} "
                             "must have one shape")
        garment = garment.to(noisy_latent.dtype)
        b, _, h, w = garment.shape
        garment_side = [garment] + [
            garment if GARMENT_HALF[part] == "garment" else garment.new_zeros(b, PART_CHANNELS[part], h, w)
            for part in self.parts
        ]
        person = torch.cat([noisy_latent, conditioning.to(noisy_latent.dtype)], dim=1)
        return torch.cat([person, torch.cat(garment_side, dim=1)], dim=3)

    def denoise(self, noisy_latent: torch.Tensor, timesteps: torch.Tensor,
                conditioning: torch.Tensor) -> torch.Tensor:
        """The UNet on ``[person | garment]``; the person half of its epsilon prediction (B, 4, h, w)."""
        width = noisy_latent.shape[-1]
        prediction = self.unet(self.concat_input(noisy_latent, conditioning), timesteps,
                               encoder_hidden_states=None).sample
        return prediction[..., :width]

    def shard(self, mesh: DeviceMesh, param_dtype: torch.dtype | None) -> None:
        """FSDP2 over the UNet: each block, then the UNet (see ``leffa.parallel``)."""
        shard_unets(self.unet, None, mesh, param_dtype)


def _refuse_dual_unet_settings(reference_pretrained_model, num_registers: int, freeze_reference: bool) -> None:
    if reference_pretrained_model:
        raise UserError("model.reference_pretrained_model: concat_unet has no Reference UNet; leave it unset")
    if num_registers:
        raise UserError(f"model.num_registers: concat_unet has no register tokens; set it to 0, got {num_registers}")
    if freeze_reference:
        raise UserError("model.freeze_reference_unet: concat_unet has no Reference UNet; leave it false")
