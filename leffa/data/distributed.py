"""Who am I in the job: data-parallel rank and DataLoader worker, and the seeds derived from them.

Rank and world size are read once, in the main process, when a dataloader is built (after
Lightning has initialised torch.distributed), and handed to the pipeline stages; a DataLoader
worker then only has to ask torch which worker it is. This works whatever the worker start
method (fork or spawn), because a spawned worker would not see the process group.
"""

import os
from collections.abc import Iterable, Iterator
from itertools import islice

import torch
import torch.utils.data

from leffa.errors import UserError


def node_info() -> tuple[int, int]:
    """Data-parallel (rank, world_size) of this process.

    From torch.distributed when it is initialised; otherwise from the environment variables
    RANK and WORLD_SIZE (torchrun and Lightning's launchers set them); otherwise (0, 1).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise UserError(f"environment RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    return rank, world_size


def worker_info() -> tuple[int, int]:
    """(worker id, number of workers) of the current DataLoader worker; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return 0, 1
    return info.id, info.num_workers


def stream_seed(seed: int, rank: int, start_step: int = 0) -> int:
    """A seed distinct for every (seed, rank, worker, start_step), reproducible across runs.

    Each rank and worker draws its own random stream (shard choice, shuffle, flips); folding in
    the step the stream starts at means a resumed run draws fresh samples instead of replaying
    the ones it saw right after the start.
    """
    worker, _ = worker_info()
    # Plain integer arithmetic (not hash()) so the value is the same in every process.
    return (((seed * 1_000_003 + rank) * 1_009 + worker) * 1_000_033 + start_step) % (2**63)


def split_by_rank_then_worker(
    shards: Iterable[dict], rank: int, world_size: int
) -> Iterator[dict]:
    """Pipeline stage: keep this rank's, then this worker's, share of a shard stream.

    Shard i goes to rank i % world_size; within a rank, its j-th shard goes to worker
    j % num_workers. Every shard is read by exactly one (rank, worker), so with no resampling
    every sample is seen exactly once across the job.
    """
    worker, num_workers = worker_info()
    mine = islice(shards, rank, None, world_size)
    yield from islice(mine, worker, None, num_workers)
