"""Dataset name -> converter module. Every converter module provides the same interface, so that
`python -m data_prep` (`__main__.py`) dispatches to it without knowing any dataset:

- DATASET: its name; SPLITS: the splits it converts;
- SOURCE_OPTIONS: the options that name folders of source files (--out must lie outside them);
- add_arguments(parser): its options, --src included (the dataset root folder, or ignored);
- list_samples(args, split) -> specs, each with .key, .source and .pairing (cheap: no image read);
- no_samples_reason(args) -> why a split lists no sample, in the user's terms;
- load_sample(spec) -> the encoded sample (`data_prep.sample.build_sample`), or SampleError to skip it.
"""

from __future__ import annotations

from types import ModuleType

from data_prep import deepfashion, dresscode, own_photos, synthetic, vitonhd

CONVERTERS: dict[str, ModuleType] = {m.DATASET: m for m in (vitonhd, dresscode, deepfashion, synthetic, own_photos)}


def get_converter(name: str) -> ModuleType:
    """The converter for `name`; an unknown name raises ValueError listing the valid ones."""
    if name not in CONVERTERS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(CONVERTERS)}")
    return CONVERTERS[name]
