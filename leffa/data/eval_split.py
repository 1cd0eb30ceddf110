"""Which samples each rank and DataLoader worker reads in an exactly-once pass, and in what batches.

The samples of all shards, concatenated in shard order, are cut into one contiguous range per
rank, sized to within one sample of each other (the first ``total % world_size`` ranks get one
more). Every rank makes the *same* number of batches: ``ceil(ceil(total / world_size) / batch_size)``,
filled greedily (full batches first, then smaller ones so that no batch is empty). Equal batch
counts matter because a forward pass can be a collective (FSDP gathers parameters in every
forward, DDP may broadcast buffers): a rank with one more batch would wait forever. No sample is
repeated to pad a rank, so metrics see each sample exactly once.

Within a rank, worker ``w`` of ``W`` reads a contiguous block of those batches. The split needs
the sample count of every shard, not a minimum number of shards: 3 shards serve 4 ranks x 2
workers as well as 300 do.
"""

from leffa.errors import UserError


def batches_per_rank(total: int, world_size: int, batch_size: int, name: str = "eval_shards") -> int:
    """The number of batches every rank makes; a :class:`UserError` when no exact split exists."""
    most, least = -(-total // world_size), total // world_size
    n_batches = -(-most // batch_size)
    if total < 1:
        raise UserError(f"data.{name}: no samples to evaluate (the shards are empty)")
    if least < 1:  # a rank without samples
        raise UserError(f"data.{name}: {total} samples for {world_size} ranks, which leaves a rank without any;"
                        f" evaluate on at most {total} devices")
    if n_batches > least:  # only batch size 1 with a remainder: ranks of one sample more make one batch more
        raise UserError(
            f"data.{name}: {total} samples cannot be split into the same number of batches on {world_size}"
            f" ranks with batch size {batch_size}; use a val_batch_size of 2 or more, or evaluate on a number of"
            f" devices that divides {total}"
        )
    return n_batches


def greedy_sizes(n_samples: int, n_batches: int, batch_size: int) -> list[int]:
    """``n_batches`` batch sizes summing to ``n_samples``, each in [1, batch_size], full ones first."""
    sizes = []
    for i in range(n_batches):
        size = min(batch_size, n_samples - (n_batches - 1 - i))
        sizes.append(size)
        n_samples -= size
    return sizes


def rank_plan(
    counts: list[int], rank: int, world_size: int, worker: int, num_workers: int, batch_size: int
) -> tuple[list[tuple[int, int, int]], list[int]]:
    """What one (rank, worker) reads: ``([(shard index, start, stop), ...], batch sizes)``.

    Args:
        counts: samples per shard, in shard order.
    """
    total = sum(counts)
    n_batches = batches_per_rank(total, world_size, batch_size)
    base, extra = divmod(total, world_size)
    rank_start = rank * base + min(rank, extra)
    sizes = greedy_sizes(base + (rank < extra), n_batches, batch_size)
    first, last = worker * n_batches // num_workers, (worker + 1) * n_batches // num_workers
    start = rank_start + sum(sizes[:first])
    stop = start + sum(sizes[first:last])
    return _pieces(counts, start, stop), sizes[first:last]


def _pieces(counts: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """The global sample range [start, stop) as (shard index, start, stop) ranges inside shards."""
    pieces, offset = [], 0
    for shard, count in enumerate(counts):
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            pieces.append((shard, lo - offset, hi - offset))
        offset += count
    return pieces
