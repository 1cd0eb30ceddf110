"""Tiny models and data for tests and benchmarks: random-initialised diffusers configs and batches of the
batch contract (docs/design.md, "Batch contract"). Shards of data_prep's synthetic set are made by
``data_prep.synthetic_shards``.

Nothing here downloads; everything runs on a CPU in seconds. ``tests/conftest.py`` turns these into
fixtures; tests and benchmarks import them from here (never from ``conftest``).
"""

from __future__ import annotations

import torch

__all__ = [
    "TINY_UNET", "TINY_SDXL_UNET", "TINY_VAE", "tiny_configs", "make_batch", "FixedBatches", "batch_loader",
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
