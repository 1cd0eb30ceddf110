"""Shared fixtures over leffa.testing (tiny random-initialised diffusers configs and batches; no download, CPU)."""

import os

import pytest
import torch

from leffa.testing import TINY_UNET, TINY_VAE, batch_loader, make_batch, tiny_configs as _tiny_configs  # noqa: F401

# TINY_UNET, TINY_VAE, batch_loader and make_batch live in leffa.testing; they are also importable
# from here only for test files written before it existed (import them from leffa.testing).


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
    return _tiny_configs()


@pytest.fixture
def tiny_batch():
    return make_batch()
