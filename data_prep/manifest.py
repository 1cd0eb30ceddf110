"""`manifest.json`: what a shard folder holds, how it was made, and which samples were skipped.

One manifest per output folder (one dataset). Writing a split replaces that split's entry and
its skipped list and keeps the other splits, so `--split train` then `--split test` build it up.
The file is replaced atomically.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from leffa.schema import MANIFEST_NAME, SCHEMA_VERSION


def read_manifest(out_dir: Path) -> dict | None:
    """The folder's manifest, or None when there is none yet."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


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
    if manifest.get("dataset") != dataset:
        raise ValueError(
            f"{out_dir / MANIFEST_NAME} describes dataset {manifest.get('dataset')!r}, not {dataset!r}; "
            "use one output folder per dataset"
        )
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{out_dir / MANIFEST_NAME} has schema_version {manifest.get('schema_version')}, expected {SCHEMA_VERSION}"
        )
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
