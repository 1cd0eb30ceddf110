"""Architectures behind ``model.architecture``: denoisers with reference attention. ``base`` holds
the seam (:class:`ReferenceDenoiser`, :class:`DenoiserSettings`), ``registry`` turns a config's
name or ``class_path`` into one; ``dual_unet`` is the paper's, ``concat_unet`` a CatVTON-style
single UNet."""

from leffa.architectures.base import DenoiserFactory, DenoiserSettings, ReferenceDenoiser
from leffa.architectures.concat_unet import ConcatUNet
from leffa.architectures.dual_unet import DualUNet
from leffa.architectures.registry import (
    SHORT_NAMES, ArchitectureName, architecture_class, architecture_record, build_denoiser, comparable_record,
    upgrade_settings,
)

__all__ = ["ReferenceDenoiser", "DenoiserSettings", "DenoiserFactory", "DualUNet", "ConcatUNet", "SHORT_NAMES",
           "ArchitectureName", "architecture_class", "architecture_record", "build_denoiser", "comparable_record",
           "upgrade_settings"]
