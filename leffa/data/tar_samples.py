"""Random access to the samples of a local tar shard: count them, read a range of them.

webdataset reads a tar as a stream, so reaching sample 900 of a shard means reading the bytes of
the 899 before it. The exactly-once evaluation split (``eval_split``) gives each rank and worker
a range of samples that may start inside a shard; here the tar's headers are scanned (a seek
per member, no data read) and only the wanted members are read. Samples are grouped exactly as
webdataset groups them (``webdataset.tariterators.base_plus_ext``: consecutive members with the
same key; suffixes lower-cased; ``__`` metadata members ignored), and come out in webdataset's
raw form ``{"__key__", "__url__", "<suffix>": bytes}``.
"""

import os
import tarfile
from collections.abc import Callable, Iterator

from webdataset.tariterators import base_plus_ext

Index = list[tuple[str, list[tuple[str, tarfile.TarInfo]]]]


def is_local(shard: str) -> bool:
    """Whether ``shard`` is a file here (not a ``pipe:`` or URL that webdataset streams)."""
    return os.path.isfile(shard)


def index_samples(tar: tarfile.TarFile) -> Index:
    """``[(key, [(suffix, member), ...]), ...]`` in tar order; a truncated tar yields what it has."""
    index: Index = []
    try:
        for member in tar:
            key, suffix = base_plus_ext(member.name) if member.isfile() else (None, None)
            if key is None or os.path.basename(member.name).startswith("__"):
                continue
            if not index or index[-1][0] != key:
                index.append((key, []))
            index[-1][1].append((suffix.lower(), member))
    except tarfile.ReadError:
        pass  # truncated: the members read so far; reading them reports the damage
    return index


def count_samples(shard: str) -> int:
    """Number of samples in a local tar shard (0 when it cannot be opened)."""
    try:
        with tarfile.open(shard) as tar:
            return len(index_samples(tar))
    except (tarfile.TarError, OSError):
        return 0


def read_samples(shard: str, start: int, stop: int, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """Raw samples ``start`` to ``stop`` (exclusive) of a local shard; unreadable ones go to ``handler``."""
    try:
        with tarfile.open(shard) as tar:
            for key, members in index_samples(tar)[start:stop]:
                try:
                    sample = {"__key__": key, "__url__": shard}
                    for suffix, member in members:
                        sample[suffix] = tar.extractfile(member).read()
                except (tarfile.TarError, OSError) as exn:
                    handler(exn)
                    continue
                yield sample
    except (tarfile.TarError, OSError) as exn:
        handler(exn)


def first_sample(shard: str) -> dict | None:
    """The first raw sample of a local shard, or None if it has none or cannot be read."""
    return next(read_samples(shard, 0, 1, handler=lambda exn: True), None)
