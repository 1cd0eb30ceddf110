"""Architectures behind ``model.architecture``: denoisers with reference attention (see
``base.ReferenceDenoiser`` for the seam, ``dual_unet`` for the paper's, ``concat_unet`` for a
CatVTON-style single UNet)."""

from leffa.architectures.base import ReferenceDenoiser
from leffa.architectures.concat_unet import ConcatUNet
from leffa.architectures.dual_unet import LATENT_CHANNELS, DualUNet

__all__ = ["ARCHITECTURES", "LATENT_CHANNELS", "ReferenceDenoiser", "DualUNet", "ConcatUNet"]

ARCHITECTURES: dict[str, type] = {"dual_unet": DualUNet, "concat_unet": ConcatUNet}
