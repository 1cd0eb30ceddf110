"""A CatVTON-style single UNet (Leffa paper Tab. 4: the Leffa loss on another model): one stock
diffusers ``UNet2DConditionModel`` (the SD1.5- or SDXL-inpainting layout, without text as
``leffa.unets`` builds it: CatVTON's code also keeps the blocks' cross-attention step as a
pass-through, our ``passthrough``; no Reference UNet) sees the person and the garment side by side along the latent width, so its own
self-attention relates them; the Leffa loss reads that attention (:class:`WidthConcatAttention`).

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
import torch.nn.functional as F
from torch import nn

from diffusers.models.attention_processor import Attention

from leffa.architectures.base import DenoiserSettings, ReferenceDenoiser
from leffa.attention import (
    LeffaCapture, ReferenceBank, check_plain_self_attention, finish_attention, project_qkv,
    set_self_attention_processors, token_grid,
)
from leffa.conditioning import LAYOUTS, PART_CHANNELS
from leffa.errors import UserError
from leffa.trainable import select_trainable
from leffa.unets import attention_levels, build_unet, halved, pretrained_input_channels

__all__ = ["ConcatUNet", "WidthConcatAttention"]

# what the garment half holds in each conditioning part: zeros for a mask, the garment latent for
# an image latent; layouts with other parts (pose images and latents) have no garment half
GARMENT_HALF = {"mask": "zeros", "masked_image": "garment"}


class ConcatUNet(ReferenceDenoiser):
    """One UNet over ``[person | garment]`` (``model.architecture: concat_unet``). It has no
    arguments of its own; from the shared settings: ``trainable: attention`` is CatVTON's recipe
    (every self-attention layer, plus ``conv_in`` when its input channels are new; the rest
    frozen; the concat configs set it), and the conditioning must be ``tryon``.
    """

    export_folders = {"unet": "unet"}

    def __init__(self, settings: DenoiserSettings):
        parts = LAYOUTS.get(settings.conditioning, ())
        if not parts or any(part not in GARMENT_HALF for part in parts):
            raise UserError(f"model.conditioning: concat_unet takes the try-on layout only (conditioning: tryon, "
                            f"mask and masked image), got {settings.conditioning!r}, which has no garment half")
        self.parts = parts
        in_channels = settings.in_channels
        self.unet = build_unet(settings.pretrained_model, settings.unet_config, in_channels, settings.cross_attention)
        self.bank = ReferenceBank(theta_resolution=settings.theta_resolution)
        set_self_attention_processors(self.unet, lambda name, layer: WidthConcatAttention(self.bank, name))
        # conv_in trains with the attention (or adapters) only when its input channels are new: an
        # SD1.5-inpainting UNet already takes these 9 (CatVTON then trains 49.57 M parameters)
        new_inputs = pretrained_input_channels(settings.pretrained_model, settings.unet_config) != in_channels
        select_trainable(self.components(), settings.trainable, settings.lora,
                         also_train=("unet.conv_in.",) if new_inputs else ())
        if settings.gradient_checkpointing:
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

    def leffa_grids(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, float]]:
        """Each self-attention layer, on the person half of the (h, 2w) grid halved as often as its
        level: its width is not a whole number where the seam falls inside a token."""
        grids = {}
        for name, level in attention_levels(self.unet).items():
            processor = self.unet.attn_processors[name]
            if isinstance(processor, WidthConcatAttention):
                rows, columns = halved((latent_hw[0], 2 * latent_hw[1]), level)
                grids[processor.name] = (rows, columns / 2)
        return grids


class WidthConcatAttention:
    """Self-attention of a UNet whose input is ``[person | garment]`` along the latent width
    (``concat_unet``): plain self-attention over all tokens of the (h, 2w) grid. At layers selected
    for the Leffa loss it captures, for the bank's ``capture_rows``, the queries of the person
    half's h*w tokens and the keys of the garment half's h*w tokens, each row-major over its own
    (h, w) grid (a row of the concatenated grid is w person tokens, then w garment tokens). The
    selection uses the person half's grid against the image height, as :class:`ReferenceBank` does.
    """

    def __init__(self, bank: ReferenceBank, name: str):
        self.bank, self.name = bank, name

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **kwargs) -> torch.Tensor:
        check_plain_self_attention(attn, hidden_states)
        q, k, v = project_qkv(attn, hidden_states)
        self._maybe_capture(q, k)
        return finish_attention(attn, F.scaled_dot_product_attention(q, k, v), hidden_states)

    def _maybe_capture(self, q: torch.Tensor, k: torch.Tensor) -> None:
        bank = self.bank
        if bank.capture_rows is None or bank.capture_rows.numel() == 0:
            return
        if bank.latent_hw is None:
            raise RuntimeError("ReferenceBank.latent_hw is unset: set it before running the UNet")
        h, w = bank.latent_hw  # the person's latent; the UNet sees (h, 2w)
        rows, width = token_grid(q.shape[2], (h, 2 * w))
        if not bank.wants_capture((rows, width // 2)):
            return
        if width % 2:
            raise UserError(f"concat_unet: the Leffa layer {self.name} has a {rows}x{width} token grid, whose "
                            f"person|garment seam falls inside a token; choose a data.width whose latent width "
                            f"({w}) halves evenly down to that layer")
        picked = bank.capture_rows

        def half(x: torch.Tensor, side: int) -> torch.Tensor:
            # (B, heads, rows*width, d) -> the side's (b, heads, rows*width/2, d), row-major
            x = x[picked].unflatten(2, (rows, 2, width // 2))[:, :, :, side]
            return x.flatten(2, 3)

        bank.captures[self.name] = LeffaCapture(half(q, 0), half(k, 1), None, (rows, width // 2))
