"""Architectures behind ``model.architecture``: denoisers with reference attention (see
``base.ReferenceDenoiser`` for the seam, ``dual_unet`` for the paper's)."""

from leffa.architectures.base import ReferenceDenoiser
from leffa.architectures.dual_unet import LATENT_CHANNELS, DualUNet

__all__ = ["ARCHITECTURES", "LATENT_CHANNELS", "ReferenceDenoiser", "DualUNet"]

ARCHITECTURES: dict[str, type] = {"dual_unet": DualUNet}
