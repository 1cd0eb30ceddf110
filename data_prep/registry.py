"""Dataset name -> converter module. A converter module provides DATASET, SPLITS,
add_arguments(parser), list_samples(args, split) -> specs and load_sample(spec) -> sample."""

from __future__ import annotations

from types import ModuleType

from data_prep import deepfashion, dresscode, folder, synthetic, vitonhd

CONVERTERS: dict[str, ModuleType] = {m.DATASET: m for m in (vitonhd, dresscode, deepfashion, synthetic, folder)}


def get_converter(name: str) -> ModuleType:
    """The converter for `name`; an unknown name raises ValueError listing the valid ones."""
    if name not in CONVERTERS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(CONVERTERS)}")
    return CONVERTERS[name]
