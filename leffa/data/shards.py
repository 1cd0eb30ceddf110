"""Resolve shard specifications (manifest, folder, brace pattern, glob) into shard lists.

A specification is one string:

- ``shards/vitonhd`` or ``shards/vitonhd/manifest.json``: the shards that ``manifest.json``
  lists for the stage's default split; ``shards/vitonhd@test`` picks the split by name.
- ``shards/vitonhd/train-{000000..000009}.tar``: a brace pattern; every file must exist.
- ``shards/vitonhd/train-*.tar``: a glob; it must match at least one file (sorted).
- ``pipe:...`` or ``scheme://...``: streamed by webdataset, passed through unchecked.

A config value is one specification or a list of them. For training each list entry is one
*source* (mixed with ``train_weights``); for evaluation the entries are simply concatenated.
"""

import glob
import json
import os
from collections.abc import Sequence

import braceexpand

from leffa.errors import MissingFileError, UserError
from leffa.schema import MANIFEST_NAME, SCHEMA_VERSION

SPLIT_SEPARATOR = "@"
_GLOB_CHARS = ("*", "?", "[")


def resolve_shards(spec: str, default_splits: Sequence[str] = ("train",)) -> list[str]:
    """Shard paths (or URLs) named by one specification.

    Args:
        spec: a manifest file or folder (optionally ``@split``), brace pattern, glob or URL.
        default_splits: manifest splits to try, in order, when ``spec`` names none.

    Raises:
        MissingFileError: a named file is missing or a pattern matches nothing (the message
            names the pattern); a ``UserError`` and a ``FileNotFoundError``.
        UserError: the manifest is unreadable, of another schema version, or lacks the
            split; a ``UserError`` and a ``ValueError``.
    """
    if not isinstance(spec, str) or not spec:
        raise UserError(f"a shard specification must be a non-empty string, got {spec!r}")
    if spec.startswith("pipe:") or "://" in spec:
        return list(braceexpand.braceexpand(spec))

    path, split = _split_suffix(spec)
    if os.path.isdir(path) or path.endswith(".json"):
        return _from_manifest(path, [split] if split else list(default_splits), spec)
    if split:
        raise MissingFileError(f"{spec!r}: '{path}' is neither a folder nor a manifest file")

    shards = []
    for pattern in braceexpand.braceexpand(spec):
        if any(c in pattern for c in _GLOB_CHARS):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise MissingFileError(f"shard pattern {spec!r}: no file matches '{pattern}'")
            shards.extend(matches)
        elif os.path.isfile(pattern):
            shards.append(pattern)
        else:
            raise MissingFileError(f"shard pattern {spec!r}: file '{pattern}' does not exist")
    return shards


def resolve_sources(
    specs: str | Sequence[str] | None, default_splits: Sequence[str] = ("train",)
) -> list[list[str]]:
    """One shard list per specification; ``[]`` for None."""
    if specs is None:
        return []
    if isinstance(specs, str):
        specs = [specs]
    return [resolve_shards(spec, default_splits) for spec in specs]


def _split_suffix(spec: str) -> tuple[str, str | None]:
    """``'dir@test'`` -> ``('dir', 'test')``; ``'dir'`` -> ``('dir', None)``."""
    head, sep, tail = spec.rpartition(SPLIT_SEPARATOR)
    if sep and tail and "/" not in tail and (os.path.isdir(head) or head.endswith(".json")):
        return head, tail
    return spec, None


def _from_manifest(path: str, splits: list[str], spec: str) -> list[str]:
    """Shards of the first of ``splits`` present in the manifest at ``path`` (file or folder)."""
    manifest_path = os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(manifest_path):
        raise MissingFileError(
            f"shard specification {spec!r}: no manifest at '{manifest_path}'"
            f" (give a manifest, its folder, a brace pattern or a glob such as '{path}/*.tar')"
        )
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError, RecursionError) as exn:  # RecursionError: JSON nested too deeply
        raise UserError(f"cannot read manifest '{manifest_path}': {exn}") from exn
    if not isinstance(manifest, dict):
        raise UserError(f"cannot read manifest '{manifest_path}': a JSON {type(manifest).__name__}, not an object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(
            f"manifest '{manifest_path}' has schema_version {version!r}; this reader knows {SCHEMA_VERSION}"
        )
    available = manifest.get("splits", {})
    split = next((s for s in splits if s in available), None)
    if split is None:
        raise UserError(
            f"manifest '{manifest_path}' has no split {' or '.join(map(repr, splits))};"
            f" valid splits: {sorted(available)} (pick one with '{path}{SPLIT_SEPARATOR}<split>')"
        )
    entries = available[split].get("shards", [])
    if not entries:
        raise UserError(f"manifest '{manifest_path}': split '{split}' lists no shards")
    folder = os.path.dirname(manifest_path)
    shards = [os.path.join(folder, entry["name"]) for entry in entries]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise MissingFileError(
            f"manifest '{manifest_path}' (split '{split}') lists {len(missing)} missing shard(s),"
            f" first: '{missing[0]}'"
        )
    return shards
