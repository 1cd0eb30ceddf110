"""Shared fixtures over leffa.testing (tiny random-initialised diffusers configs and batches; no download, CPU)."""

import os

# One torch thread in this process and in the subprocesses tests start (unless set): the tiny
# models run as fast so, and the suite degrades to its fair share beside other busy processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from data_prep.__main__ import main as data_prep_main  # noqa: E402
from leffa.testing import make_batch  # noqa: E402
from leffa.testing import tiny_configs as _tiny_configs  # noqa: E402


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


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """8 synthetic samples per split at 64x48 in shards of 4, for the tiny config's runs (read only)."""
    out = tmp_path_factory.mktemp("shards")
    data_prep_main(["synthetic", "--out", str(out), "--count", "8", "--split", "all", "--shard-size", "4",
                    "--height", "64", "--width", "48"])
    return out
