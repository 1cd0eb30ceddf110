"""Shards and samples of the synthetic set for tests and benchmarks (``data_prep/synthetic.py``).

``synthetic_shards`` runs the converter in this process, ``synthetic_sample`` gives one encoded
sample, ``write_samples`` writes (altered) samples as a conversion would. The tiny models and
batches that need no shards are in ``leffa.testing``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from data_prep.__main__ import main as data_prep_main
from data_prep.synthetic import DATASET, SyntheticSpec, load_sample
from leffa.manifest import update_manifest
from leffa.schema import build_key
from leffa.shard_writer import AtomicShardWriter

__all__ = ["synthetic_shards", "synthetic_sample", "write_samples"]


def synthetic_shards(
    folder: str | Path,
    count: int,
    height: int,
    width: int,
    split: str = "train",
    texture: str = "periodic",
    shard_size: int | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write ``count`` samples per split of data_prep's synthetic set into ``folder``.

    Runs ``python -m data_prep synthetic`` in this process (``split`` is ``train``, ``test`` or
    ``all``); ``shard_size`` defaults to ``count`` (one shard per split).

    Returns:
        The shard paths written, sorted.
    """
    folder = Path(folder)
    data_prep_main([
        "synthetic", "--out", str(folder), "--count", str(count), "--split", split,
        "--shard-size", str(shard_size or max(count, 1)), "--height", str(height), "--width", str(width),
        "--texture", texture, "--seed", str(seed),
    ])  # fmt: skip
    splits = ("train", "test") if split == "all" else (split,)
    return sorted(p for s in splits for p in folder.glob(f"{s}-*.tar"))


def synthetic_sample(
    index: int = 0, height: int = 32, width: int = 24, split: str = "train", texture: str = "periodic", seed: int = 0
) -> dict:
    """One encoded sample of data_prep's synthetic set, as a shard holds it (``{"__key__", "tgt.jpg", ...}``)."""
    key = build_key(DATASET, split, "paired", f"{index:06d}")
    return load_sample(SyntheticSpec(key, "test", split, "paired", index, seed, height, width, texture))


def write_samples(folder: str | Path, split: str, samples: Iterable[dict], shard_size: int,
                  dataset: str = "synthetic") -> list[Path]:
    """Write encoded ``samples`` (e.g. altered :func:`synthetic_sample` outputs) with leffa.shard_writer
    and leffa.manifest, as a conversion would; returns the shard paths."""
    folder = Path(folder)
    samples = list(samples)
    with AtomicShardWriter(folder, split, shard_size) as writer:
        for sample in samples:
            writer.write(sample)
        records = writer.commit()
    entry = {"pairings": ["paired"], "num_samples_in": len(samples), "num_written": len(samples),
             "num_skipped": 0, "shards": records}  # fmt: skip
    update_manifest(folder, dataset, split, entry, [], None, "data_prep.synthetic_shards.write_samples")
    return [folder / record["name"] for record in records]
