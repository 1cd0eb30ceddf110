"""Architectures behind ``model.architecture``: denoisers with reference attention (see
``base.ReferenceDenoiser`` for the seam, ``dual_unet`` for the paper's, ``concat_unet`` for a
CatVTON-style single UNet)."""

from leffa.architectures.base import ReferenceDenoiser
from leffa.architectures.concat_unet import ConcatUNet
from leffa.architectures.dual_unet import LATENT_CHANNELS, DualUNet

from leffa.errors import UserError

__all__ = ["ARCHITECTURES", "LATENT_CHANNELS", "ReferenceDenoiser", "DualUNet", "ConcatUNet", "architecture_class"]

ARCHITECTURES: dict[str, type] = {"dual_unet": DualUNet, "concat_unet": ConcatUNet}


def architecture_class(name: str) -> type:
    """The class behind ``model.architecture: name``; an unknown name is one line listing the valid ones."""
    if name not in ARCHITECTURES:
        raise UserError(f"model.architecture: unknown {name!r}; valid: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]
