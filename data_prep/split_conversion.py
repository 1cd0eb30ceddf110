"""One split of one dataset: enumerate sample specs, load + encode them (optionally in a process
pool), write them through the atomic shard writer, and report counts and skipped samples."""

from __future__ import annotations

import logging
import multiprocessing
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType

from tqdm import tqdm

from data_prep.load import take_conversions
from data_prep.sample import SampleError
from leffa.manifest import check_out_dir
from leffa.shard_writer import AtomicShardWriter

log = logging.getLogger(__name__)


@dataclass
class SplitReport:
    """What one split conversion did; `num_samples_in == num_written + num_skipped`."""

    num_samples_in: int = 0
    num_written: int = 0
    pairings: list[str] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    # images of the written samples that the reader converted, per conversion (data_prep.load)
    image_conversions: Counter = field(default_factory=Counter)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def manifest_entry(self) -> dict:
        entry = {
            "pairings": self.pairings,
            "num_samples_in": self.num_samples_in,
            "num_written": self.num_written,
            "num_skipped": self.num_skipped,
            "shards": self.shards,
        }
        if self.image_conversions:  # only when the reader changed an image
            entry["image_conversions"] = dict(sorted(self.image_conversions.items()))
        return entry


def load_or_reason(load_sample: Callable, spec) -> tuple[dict | None, str | None, list[str]]:
    """Run a converter's `load_sample(spec)` -> (sample, None, what the image reader converted);
    a missing or corrupt file gives (None, reason, [])."""
    take_conversions()  # forget those of an earlier sample that failed
    try:
        return load_sample(spec), None, take_conversions()
    except SampleError as err:
        return None, str(err), []


def _loaded(load_sample: Callable, specs: list, workers: int) -> Iterator[tuple[dict | None, str | None, list[str]]]:
    job = partial(load_or_reason, load_sample)
    if workers <= 0:
        yield from map(job, specs)
        return
    # imap keeps the input order, so the shards do not depend on the number of workers.
    with multiprocessing.Pool(workers) as pool:
        yield from pool.imap(job, specs, chunksize=4)


def convert_split(
    converter: ModuleType,
    specs: Iterable,
    out_dir: Path,
    split: str,
    shard_size: int,
    workers: int = 0,
    before_commit: Callable[[SplitReport], None] | None = None,
) -> SplitReport:
    """Load, encode and write `specs` (each has `.key`, `.source`, `.pairing`) as `<split>-%06d.tar`.

    A folder that holds another dataset's shards is refused (UserError) before anything is written.
    `before_commit(report)` runs once every shard is complete but still under its temporary name
    (`report` is final): if it raises, no shard is renamed and the temporaries are removed.
    """
    check_out_dir(out_dir, converter.DATASET, [split])
    specs = list(specs)
    report = SplitReport(num_samples_in=len(specs))
    report.pairings = sorted({spec.pairing for spec in specs})
    seen: set[str] = set()
    unique = []
    for spec in specs:
        if spec.key in seen:
            report.skipped.append(
                {"key": spec.key, "source": spec.source, "reason": "duplicate key (repeated pair line)"}
            )
            log.warning("skipping %s: duplicate key (repeated pair line)", spec.key)
            continue
        seen.add(spec.key)
        unique.append(spec)
    with AtomicShardWriter(out_dir, split, shard_size) as writer:
        results = _loaded(converter.load_sample, unique, workers)
        progress = tqdm(
            zip(unique, results, strict=True),
            total=len(unique),
            desc=f"{converter.DATASET} {split}",
            unit="sample",
            disable=None,
        )
        try:
            for spec, (sample, reason, conversions) in progress:
                if sample is None:
                    log.warning("skipping %s: %s", spec.key, reason)
                    report.skipped.append({"key": spec.key, "source": spec.source, "reason": reason})
                    continue
                writer.write(sample)
                report.num_written += 1
                report.image_conversions.update(conversions)
        finally:
            results.close()  # stops the worker pool now, also when writing failed
        report.shards = writer.finish()
        if before_commit is not None:
            before_commit(report)
        writer.commit()
    return report
