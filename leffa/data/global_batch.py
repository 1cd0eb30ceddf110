"""The paper's global batch, split over devices and gradient accumulation at start-up."""

from __future__ import annotations

from leffa.errors import UserError

__all__ = ["split_global_batch"]


def split_global_batch(global_batch: int, world_size: int, max_per_device: int) -> tuple[int, int]:
    """(per-device batch, accumulation steps) with per_device * accumulation * world_size == global_batch.

    Takes the fewest accumulation steps whose per-device batch is at most ``max_per_device``.
    Raises ValueError showing the arithmetic when no exact split exists.
    """
    if global_batch % world_size:
        raise UserError(
            f"global batch {global_batch} does not split over {world_size} devices "
            f"({global_batch} / {world_size} = {global_batch / world_size:.2f}); choose a world size that divides it"
        )
    per_rank = global_batch // world_size
    for accumulation in range(1, per_rank + 1):
        if per_rank % accumulation == 0 and per_rank // accumulation <= max_per_device:
            return per_rank // accumulation, accumulation
    raise UserError(f"global batch {global_batch} / {world_size} devices: cannot reach it with data.batch_size "
                     f"{max_per_device} (max_per_device must be >= 1)")
