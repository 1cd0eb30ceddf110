"""Skip corrupt samples, count them per worker, and hand the count to the next batch.

``webdataset``'s own handlers (``warn_and_continue``) skip but do not count, so the pipeline
uses one ``SkipCounter`` per worker: the tar-reading stages report through ``counter.handler``
and the decode stage through ``skip_corrupt``; the batching stage takes the count into
``batch["skipped"]``. Each DataLoader worker holds its own copy of the pipeline, hence its own
counter.
"""

import logging
import zlib
from collections.abc import Callable, Iterable, Iterator

from PIL import Image

log = logging.getLogger(__name__)

# Errors that bad bytes raise while a sample is read or decoded (RecursionError: json of a sample
# nested too deeply for the parser). Anything else (TypeError, AttributeError, ...) is a bug in the
# code and propagates.
DATA_ERRORS = (OSError, ValueError, KeyError, EOFError, SyntaxError, zlib.error, Image.DecompressionBombError,
               RecursionError)  # fmt: skip


class SkipCounter:
    """Counts skipped samples of one worker since the last batch.

    Args:
        max_consecutive: raise after this many skips in a row with no good sample in between,
            so that a dataset that is entirely unreadable fails instead of looping forever.
        max_logged: log the first ``max_logged`` skips of a worker as warnings, then stay quiet.
    """

    def __init__(self, max_consecutive: int = 1000, max_logged: int = 10):
        self.max_consecutive = max_consecutive
        self.max_logged = max_logged
        self.pending = 0
        self.consecutive = 0
        self.total = 0

    def skip(self, what: str, exn: BaseException) -> None:
        """Record one skipped sample (or unreadable shard)."""
        self.pending += 1
        self.total += 1
        self.consecutive += 1
        if self.total <= self.max_logged:
            log.warning("skipping corrupt data %s: %s: %s", what, type(exn).__name__, exn)
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self.consecutive} corrupt samples in a row, none readable; last: {what}: {exn!r}"
            ) from exn

    def ok(self) -> None:
        """Record one good sample."""
        self.consecutive = 0

    def take(self) -> int:
        """The number of skips since the previous call, and reset it."""
        n, self.pending = self.pending, 0
        return n

    def handler(self, exn: Exception) -> bool:
        """A webdataset ``handler``: count the error and continue (return True)."""
        self.skip("while reading a shard", exn)
        return True


def skip_corrupt(
    samples: Iterable[dict], fn: Callable[[dict], dict], counter: SkipCounter
) -> Iterator[dict]:
    """Pipeline stage: ``fn(sample)`` for each sample; a sample whose bytes fail is skipped and counted."""
    for sample in samples:
        try:
            out = fn(sample)
        except DATA_ERRORS as exn:
            counter.skip(f"sample '{sample.get('__key__')}' in {sample.get('__url__')}", exn)
            continue
        counter.ok()
        yield out
