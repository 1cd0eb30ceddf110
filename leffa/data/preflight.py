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


def check_sources(name: str, sources: list[list[str]], hflip: bool = False,
                  specs: list[str] | None = None) -> None:
    """Raise :class:`UserError` if a source of local shards has no readable sample at all, or if
    the first readable sample of a source lacks a member, or carries a pose image with sides while
    ``hflip`` is on. ``specs``: the source specifications as given, to name them.

    Shards are read in order until one yields a sample (usually the first). Streamed shards
    (``pipe:``, URLs) are not checked here: the pipeline skips and counts what it cannot read.
    """
    for index, shards in enumerate(sources):
        local = [s for s in shards if is_local(s)]
        shard, raw = next(((s, r) for s in local if (r := first_sample(s)) is not None), (None, None))
        if raw is None:
            if shards and len(local) == len(shards):
                where = specs[index] if specs and index < len(specs) else os.path.dirname(shards[0]) or "."
                raise UserError(
                    f"data.{name}_shards: nothing readable in {where}: {len(shards)} shard"
                    f"{'s' if len(shards) > 1 else ''}, none with a sample that can be read (empty, damaged or"
                    f" not tar files); write the shards again with data_prep or point data.{name}_shards elsewhere"
                )
            continue
        missing = [k for k in COMMON_MEMBERS if k not in raw]
        if missing:
            raise UserError(
                f"data.{name}_shards: shard folder '{os.path.dirname(shard) or '.'}': sample '{raw['__key__']}'"
                f" of {os.path.basename(shard)} has no {', '.join(missing)} (every sample needs"
                f" {', '.join(COMMON_MEMBERS)}); write the shards again with data_prep"
            )
        if hflip:
            try:
                meta = json.loads(raw["json"])
            except (ValueError, RecursionError):  # unreadable: the pipeline skips and counts it
                continue
            if isinstance(meta, dict) and meta.get("pose_source") in SIDED_POSE_SOURCES:
                raise UserError(sided_pose_refusal(meta["pose_source"], f"shard '{shard}'"))
