"""`manifest.json`: what a shard folder holds, how it was made, and which samples were skipped.

One manifest per output folder (one dataset). Writing a split replaces that split's entry and
its skipped list and keeps the other splits, so `--split train` then `--split test` build it up.
The file is replaced atomically.

`check_out_dir` runs before a conversion writes anything: an existing manifest must describe
the same dataset and schema version, and shards of the splits to be written are never replaced
when there is no manifest to say which dataset made them (a folder of foreign or hand-copied
shards, or a first run killed between committing its shards and writing the manifest: move them
away or delete them, then convert again).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from data_prep.shard_writer import split_shards
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
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bytes that are not UTF-8
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


def update_manifest(
    out_dir: Path,
    dataset: str,
    split: str,
    split_entry: dict,
    skipped: list[dict],
    source: str | None,
    command: str,
) -> dict:
    """Merge one split's results into `<out_dir>/manifest.json` and return the new manifest.

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
    path = out_dir / MANIFEST_NAME
    tmp = path.with_name(f".{MANIFEST_NAME}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)
    return manifest
