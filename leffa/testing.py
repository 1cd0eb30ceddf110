"""Tiny models and data for tests and benchmarks: random-initialised diffusers configs, batches of the
batch contract (docs/design.md, "Batch contract"), and shards from data_prep's synthetic generator.

Nothing here downloads; everything runs on a CPU in seconds. ``tests/conftest.py`` turns these into
fixtures; tests and benchmarks import them from here (never from ``conftest``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = [
    "TINY_UNET", "TINY_SDXL_UNET", "TINY_VAE", "tiny_configs", "make_batch", "FixedBatches", "batch_loader",
    "synthetic_shards", "synthetic_sample", "write_samples",
]

# Two resolution levels with attention at 1/8 and 1/16 of the image, and a mid block at 1/16.
TINY_UNET = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
# SDXL's layout in small: no attention at the first level, two transformer layers per block at the
# second, linear projections, the text_time added embedding (dropped when the model is built).
TINY_SDXL_UNET = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    cross_attention_dim=32,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
    norm_num_groups=8,
)
# Four levels: downsampling factor 8, like SD's VAE.
TINY_VAE = dict(
    block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=4,
)


def tiny_configs() -> dict:
    """``unet_config`` and ``vae_config`` keyword arguments of ``LeffaModule`` (fresh copies)."""
    return dict(unet_config=dict(TINY_UNET), vae_config=dict(TINY_VAE))


def make_batch(batch_size: int = 2, height: int = 64, width: int = 48, seed: int = 0,
               device: str | torch.device = "cpu") -> dict:
    """A random batch of the float contract: images in [-1, 1], mask in {0, 1} over the centre half;
    drawn on the CPU (the same values on every device), its tensors then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch_size, 1, height, width)
    mask[:, :, height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1.0
    return {
        "tgt": (torch.rand(batch_size, 3, height, width, generator=g) * 2 - 1).to(device),
        "ref": (torch.rand(batch_size, 3, height, width, generator=g) * 2 - 1).to(device),
        "densepose": (torch.rand(batch_size, 3, height, width, generator=g) * 2 - 1).to(device),
        "mask": mask.to(device),
        "key": [f"test_{i}" for i in range(batch_size)],
    }


class FixedBatches(torch.utils.data.IterableDataset):
    """The same few batches again and again (already collated), for Trainer tests."""

    def __init__(self, count: int = 2, **kwargs):
        self.batches = [make_batch(seed=i, **kwargs) for i in range(count)]

    def __iter__(self):
        while True:
            yield from self.batches


def batch_loader(count: int = 2, **kwargs) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(FixedBatches(count, **kwargs), batch_size=None)


def synthetic_shards(
    folder: str | Path,
    count: int,
    height: int,
    width: int,
    split: str = "train",
    texture: str = "periodic",
    shard_size: int | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write ``count`` samples per split of data_prep's synthetic set into ``folder``.

    Runs ``python -m data_prep synthetic`` in this process (``split`` is ``train``, ``test`` or
    ``all``); ``shard_size`` defaults to ``count`` (one shard per split).

    Returns:
        The shard paths written, sorted.
    """
    from data_prep.__main__ import main as data_prep_main

    folder = Path(folder)
    data_prep_main([
        "synthetic", "--out", str(folder), "--count", str(count), "--split", split,
        "--shard-size", str(shard_size or max(count, 1)), "--height", str(height), "--width", str(width),
        "--texture", texture, "--seed", str(seed),
    ])  # fmt: skip
    splits = ("train", "test") if split == "all" else (split,)
    return sorted(p for s in splits for p in folder.glob(f"{s}-*.tar"))


def synthetic_sample(
    index: int = 0, height: int = 32, width: int = 24, split: str = "train", texture: str = "periodic", seed: int = 0
) -> dict:
    """One encoded sample of data_prep's synthetic set, as a shard holds it (``{"__key__", "tgt.jpg", ...}``)."""
    from data_prep.synthetic import DATASET, SyntheticSpec, load_sample
    from leffa.schema import build_key

    key = build_key(DATASET, split, "paired", f"{index:06d}")
    return load_sample(SyntheticSpec(key, "test", split, "paired", index, seed, height, width, texture))


def write_samples(folder: str | Path, split: str, samples: Iterable[dict], shard_size: int,
                  dataset: str = "synthetic") -> list[Path]:
    """Write encoded ``samples`` (e.g. altered :func:`synthetic_sample` outputs) with data_prep's
    shard writer and manifest, as a conversion would; returns the shard paths."""
    from leffa.manifest import update_manifest
    from leffa.shard_writer import AtomicShardWriter

    folder = Path(folder)
    samples = list(samples)
    with AtomicShardWriter(folder, split, shard_size) as writer:
        for sample in samples:
            writer.write(sample)
        records = writer.commit()
    entry = {"pairings": ["paired"], "num_samples_in": len(samples), "num_written": len(samples),
             "num_skipped": 0, "shards": records}  # fmt: skip
    update_manifest(folder, dataset, split, entry, [], None, "leffa.testing.write_samples")
    return [folder / record["name"] for record in records]
