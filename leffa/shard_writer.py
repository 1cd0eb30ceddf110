"""Atomic shard writing on top of webdataset's own `wds.ShardWriter`.

Shards are `<out>/<split>-%06d.tar`. `ShardWriter` opens each shard through our `opener`
as `.<name>.tmp` and calls `post` once the shard is complete (webdataset.writer.ShardWriter,
arguments `opener` and `post`). Nothing gets a final name until `commit()`: then all temporary
shards are renamed (os.replace, atomic on one file system) and shards of the split that this
run did not produce again are deleted. An interrupted run therefore leaves the previous shards
and manifest as they were, and no partial shard under a `.tar` name. `finish()` completes the
shards without renaming them, so that the caller can write the manifest (to its own temporary
name) before `commit()`: see data_prep/__main__.py and leffa/cache_latents.py.

A failed write (a full disk, no permission) is one `UserError` that names the file (`write_error`);
the temporaries are removed all the same.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import webdataset as wds

from leffa.errors import UserError

# A fixed member mtime makes a re-run byte-identical. PAX allows member names over 100
# characters (webdataset's default USTAR does not), which DeepFashion pair keys need.
TAR_OPTIONS = {"encoder": False, "mtime": 0, "format": "PAX_FORMAT"}


def shard_pattern(split: str) -> re.Pattern:
    """Final shard names of one split: `<split>-NNNNNN.tar`."""
    return re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")


def split_shards(out_dir: Path, split: str) -> list[Path]:
    """Final-named shards of `split` now in `out_dir` (none when the folder does not exist), sorted."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    pattern = shard_pattern(split)
    return sorted(p for p in out_dir.iterdir() if pattern.fullmatch(p.name))


def temp_path(final: Path) -> Path:
    """Hidden name under which a shard is written until commit."""
    return final.with_name(f".{final.name}.tmp")


def write_error(err: OSError, path: Path | str) -> UserError:
    """The one-line report of `err`, met while writing `path` in the output folder."""
    if err.errno == errno.ENOSPC:
        return UserError(f"no space left on the device writing {path}; free some space or choose another --out")
    if err.errno == errno.EDQUOT:
        return UserError(f"disk quota exceeded writing {path}; free some space or choose another --out")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {path}: {err.strerror}; choose another --out")
    return UserError(f"cannot write {path}: {err.strerror or err}")


@contextmanager
def reporting_write_errors(path: Path | str) -> Iterator[None]:
    """An OSError inside the block becomes `write_error(err, path)`."""
    try:
        yield
    except OSError as err:
        raise write_error(err, path) from err


class AtomicShardWriter:
    """Writes one split's samples into shards of `shard_size` samples, visible only after commit().

    Use as a context manager: leaving the block by an exception removes the temporary shards.

    Args:
        out_dir: output folder (created if needed).
        split: split name; it prefixes the shard names.
        shard_size: samples per shard.
    """

    def __init__(self, out_dir: Path, split: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.shard_size = shard_size
        self._final_pattern = shard_pattern(split)
        with reporting_write_errors(self.out_dir):
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._remove_leftover_temps()
        self._writer: wds.ShardWriter | None = None  # opened on the first sample: no empty shard
        self._stream: BinaryIO | None = None
        self._temps: list[Path] = []  # every temporary file opened by this writer
        self._finished: list[str] = []  # final names of complete shards, in order
        self._counts: dict[str, int] = {}  # final name -> samples
        self._records: list[dict] | None = None  # set by finish()

    # Hooks handed to wds.ShardWriter
    def _open(self, fname: str) -> BinaryIO:
        path = temp_path(Path(fname))
        self._temps.append(path)
        self._stream = open(path, "wb")
        return self._stream

    def _post(self, fname: str) -> None:
        # TarWriter does not close a stream it did not open, so the shard is flushed here.
        assert self._stream is not None
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        self._stream = None
        self._finished.append(Path(fname).name)

    def _shard_being_written(self) -> Path:
        """Final name of the shard now written (the folder before the first), for error messages."""
        if not self._temps:
            return self.out_dir
        temp = self._temps[-1]
        return temp.with_name(temp.name[1 : -len(".tmp")])

    def write(self, sample: dict) -> None:
        """Append one encoded sample (all values bytes)."""
        if self._records is not None:
            raise RuntimeError("write() after finish()")
        try:
            if self._writer is None:  # its constructor opens the first shard
                pattern = str(self.out_dir / f"{self.split}-%06d.tar")
                self._writer = wds.ShardWriter(
                    pattern, maxcount=self.shard_size, opener=self._open, post=self._post, verbose=0, **TAR_OPTIONS
                )
            self._writer.write(sample)
        except OSError as err:
            raise write_error(err, self._shard_being_written()) from err
        name = Path(self._writer.fname).name
        self._counts[name] = self._counts.get(name, 0) + 1

    def finish(self) -> list[dict]:
        """Complete the last shard (flushed and fsynced) and return the shard records, still under
        their temporary names; `commit()` renames them. Calling it again returns the same records."""
        if self._records is None:
            if self._writer is not None:
                try:
                    self._writer.close()
                except OSError as err:
                    raise write_error(err, self._shard_being_written()) from err
                self._writer = None
            records = []
            for name in self._finished:
                size = temp_path(self.out_dir / name).stat().st_size  # the same file once renamed
                records.append({"name": name, "size_bytes": size, "num_samples": self._counts[name]})
            self._records = records
        return self._records

    def commit(self) -> list[dict]:
        """Give the shards their final names, delete stale shards of the split; return shard records."""
        records = self.finish()
        with reporting_write_errors(self.out_dir):
            for name in self._finished:
                final = self.out_dir / name
                os.replace(temp_path(final), final)
            produced = set(self._finished)
            for stale in self.existing_shards():
                if stale.name not in produced:
                    stale.unlink()
        self._temps.clear()
        return records

    def abort(self) -> None:
        """Drop everything this writer wrote; shards from earlier runs stay untouched.

        Never raises: it runs while another error (often a full disk) propagates, and on a full
        disk closing the streams fails again, so every step is tried and the temporaries deleted.
        """
        tar = getattr(self._writer, "tarstream", None)
        if tar is not None:
            # Close the open tar first (it flushes into the temporary file), or its finaliser
            # would later write to a closed file.
            try:
                tar.close()
            except (OSError, ValueError):
                pass  # e.g. disk full: the file is deleted below anyway
        if self._stream is not None:
            try:
                self._stream.close()  # its flush fails on a full disk; the file is closed all the same
            except (OSError, ValueError):
                pass
            self._stream = None
        self._writer = None
        for path in self._temps:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass  # e.g. the folder became read-only: nothing more can be done here
        self._temps.clear()

    def existing_shards(self) -> list[Path]:
        """Final-named shards of this split now in the folder, sorted."""
        return split_shards(self.out_dir, self.split)

    def _remove_leftover_temps(self) -> None:
        # A killed run (SIGKILL, power loss) cannot clean up; its hidden temporaries go here.
        for path in self.out_dir.iterdir():
            name = path.name
            if name.startswith(".") and name.endswith(".tmp") and self._final_pattern.fullmatch(name[1:-4]):
                path.unlink()

    def __enter__(self) -> AtomicShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._writer is not None or self._temps:  # failed, or never committed
            self.abort()
