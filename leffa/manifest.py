"""`manifest.json`: what a shard folder holds, how it was made, and which samples were skipped.

One manifest per output folder (one dataset). Writing a split replaces that split's entry and
its skipped list and keeps the other splits, so `--split train` then `--split test` build it up.
The file is replaced atomically. A conversion writes it in two steps around the renaming of its
shards (`stage_manifest`, then `publish_manifest`; see data_prep/__main__.py for why).

`check_out_dir` runs before a conversion writes anything: an existing manifest must describe
the same dataset and schema version, and shards of the splits to be written are never replaced
when there is no manifest to say which dataset made them (a folder of foreign or hand-copied
shards, or a first run killed in the moment between renaming its shards and renaming its manifest:
move them away or delete them, then convert again).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from leffa.shard_writer import reporting_write_errors, split_shards
from leffa.errors import UserError
from leffa.schema import MANIFEST_NAME, SCHEMA_VERSION


def read_manifest(out_dir: Path) -> dict | None:
    """The folder's manifest, or None when there is none yet; an unreadable one is a UserError."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    # ValueError: bad JSON or bytes that are not UTF-8; RecursionError: JSON nested too deeply
    except (OSError, ValueError, RecursionError) as err:
        raise UserError(f"{path} is not a readable manifest ({err}); fix or remove it, or use another --out") from err
    if not isinstance(manifest, dict):
        raise UserError(f"{path} is not a readable manifest (not a JSON object); fix or remove it")
    return manifest


def _check_fits(path: Path, manifest: dict, dataset: str) -> None:
    if manifest.get("dataset") != dataset:
        raise UserError(
            f"{path} describes dataset {manifest.get('dataset')!r}, not {dataset!r}; "
            "use one output folder per dataset"
        )
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UserError(
            f"{path} has schema_version {manifest.get('schema_version')}, expected {SCHEMA_VERSION}; "
            "convert into a new folder"
        )


def check_out_dir(out_dir: Path, dataset: str, splits: Iterable[str]) -> None:
    """Refuse (UserError) to convert `dataset`'s `splits` into `out_dir` if that could replace
    shards of another dataset, of another schema version, or of unknown origin. Writes nothing."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is not None:
        _check_fits(out_dir / MANIFEST_NAME, manifest, dataset)
        return
    unknown = sorted(shard for split in splits for shard in split_shards(out_dir, split))
    if unknown:
        more = f" and {len(unknown) - 1} more shards" if len(unknown) > 1 else ""
        raise UserError(
            f"{unknown[0]}{more} would be replaced, but {out_dir} has no {MANIFEST_NAME} to say which dataset "
            "made them; move them away or choose another --out"
        )


def staged_manifest_path(out_dir: Path) -> Path:
    """The temporary name under which the next manifest is written until `publish_manifest`."""
    return Path(out_dir) / f".{MANIFEST_NAME}.tmp"


def update_manifest(out_dir: Path, *entry) -> dict:
    """Merge one split's results into `<out_dir>/manifest.json` and return the new manifest:
    `stage_manifest(out_dir, *entry)`, then `publish_manifest` (for writers of a single split)."""
    manifest = stage_manifest(out_dir, *entry)
    publish_manifest(out_dir)
    return manifest


def discard_staged_manifest(out_dir: Path) -> None:
    """Remove a staged manifest that was not published (nothing when there is none)."""
    try:
        staged_manifest_path(out_dir).unlink(missing_ok=True)
    except OSError:
        pass  # called while another error propagates; a leftover is overwritten by the next run


def publish_manifest(out_dir: Path) -> None:
    """Rename the staged manifest onto `manifest.json` (atomic)."""
    with reporting_write_errors(Path(out_dir) / MANIFEST_NAME):
        os.replace(staged_manifest_path(out_dir), Path(out_dir) / MANIFEST_NAME)


def stage_manifest(
    out_dir: Path,
    dataset: str,
    split: str,
    split_entry: dict,
    skipped: list[dict],
    source: str | None,
    command: str,
) -> dict:
    """Merge one split's results into the manifest and write it (flushed and fsynced, so that a full
    disk fails here) to `staged_manifest_path`, for `publish_manifest` to rename; returns it. A
    failed write is a UserError and leaves no temporary file.

    Args:
        split_entry: pairings, num_samples_in, num_written, num_skipped, shards, options.
        skipped: one {"key", "source", "reason"} per skipped sample of this split.
        source: raw dataset folder (None for the synthetic set).
        command: the command line that made the shards.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir) or {
        "schema_version": SCHEMA_VERSION,
        "dataset": dataset,
        "splits": {},
        "skipped": [],
    }
    _check_fits(out_dir / MANIFEST_NAME, manifest, dataset)  # also checked before the shards were written
    created = datetime.now(UTC).isoformat(timespec="seconds")
    manifest["splits"][split] = {**split_entry, "source": source, "command": command, "created": created}
    manifest["splits"] = dict(sorted(manifest["splits"].items()))
    manifest["skipped"] = [s for s in manifest["skipped"] if s["split"] != split] + [
        {"split": split, **s} for s in skipped
    ]
    manifest.update(source=source, command=command, created=created)
    tmp = staged_manifest_path(out_dir)
    try:
        with reporting_write_errors(out_dir / MANIFEST_NAME), open(tmp, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        discard_staged_manifest(out_dir)
        raise
    return manifest
