"""Shared fixtures: tiny random-initialised diffusers configs and batches (no download, CPU)."""

import os

import pytest
import torch

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
# Four levels: downsampling factor 8, like SD's VAE.
TINY_VAE = dict(
    block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=4,
)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: the tiny model runs fastest so, and two threads beside
    another busy process can be 100x slower (OpenMP threads waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def own_process_group():
    """For a Trainer with a parallel strategy in this process: afterwards, no process group and
    none of the variables the strategy set (MASTER_ADDR/PORT, ...) for the tests that follow."""
    environment = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environment)


@pytest.fixture
def tiny_configs():
    return dict(unet_config=dict(TINY_UNET), vae_config=dict(TINY_VAE))


def make_batch(batch_size=2, height=64, width=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch_size, 1, height, width)
    mask[:, :, height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1.0
    return {
        "tgt": torch.rand(batch_size, 3, height, width, generator=g) * 2 - 1,
        "ref": torch.rand(batch_size, 3, height, width, generator=g) * 2 - 1,
        "densepose": torch.rand(batch_size, 3, height, width, generator=g) * 2 - 1,
        "mask": mask,
        "key": [f"test_{i}" for i in range(batch_size)],
    }


@pytest.fixture
def tiny_batch():
    return make_batch()


class FixedBatches(torch.utils.data.IterableDataset):
    """The same few batches again and again (already collated), for Trainer tests."""

    def __init__(self, count=2, **kwargs):
        self.batches = [make_batch(seed=i, **kwargs) for i in range(count)]

    def __iter__(self):
        while True:
            yield from self.batches


def batch_loader(count=2, **kwargs):
    return torch.utils.data.DataLoader(FixedBatches(count, **kwargs), batch_size=None)
