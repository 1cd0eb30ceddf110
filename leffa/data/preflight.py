"""Checks on the first sample of each shard source, made in ``LeffaDataModule.setup``.

A shard folder written without a member every sample needs (``densepose.png``, say) would
otherwise be found sample by sample inside the DataLoader workers: a thousand skips, then an
error with a traceback. Reading one sample per source in the main process finds it at once and
names the folder. The same sample tells whether ``data.hflip`` may mirror the source.
"""

import json
import os

from leffa.errors import UserError
from leffa.schema import COMMON_MEMBERS
from leffa.data.tar_samples import first_sample, is_local
from leffa.data.transforms import SIDED_POSE_SOURCES, sided_pose_refusal


def check_sources(name: str, sources: list[list[str]], hflip: bool = False) -> None:
    """Raise :class:`UserError` if the first sample of a source lacks a member, or carries a
    pose image with sides while ``hflip`` is on.

    Streamed shards (``pipe:``, URLs) and unreadable first samples are not checked here: the
    pipeline skips and counts what it cannot read.
    """
    for shards in sources:
        local = [s for s in shards if is_local(s)]
        raw = first_sample(local[0]) if local else None
        if raw is None:
            continue
        missing = [k for k in COMMON_MEMBERS if k not in raw]
        if missing:
            raise UserError(
                f"data.{name}_shards: shard folder '{os.path.dirname(local[0]) or '.'}': sample '{raw['__key__']}'"
                f" of {os.path.basename(local[0])} has no {', '.join(missing)} (every sample needs"
                f" {', '.join(COMMON_MEMBERS)}); write the shards again with data_prep"
            )
        if hflip:
            try:
                meta = json.loads(raw["json"])
            except (ValueError, RecursionError):  # unreadable: the pipeline skips and counts it
                continue
            if isinstance(meta, dict) and meta.get("pose_source") in SIDED_POSE_SOURCES:
                raise UserError(sided_pose_refusal(meta["pose_source"], f"shard '{local[0]}'"))
