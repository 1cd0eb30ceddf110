"""Atomic shard writing, manifest merging and interrupted runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import webdataset as wds
from raw_datasets import read_manifest, read_split

from data_prep import synthetic
from data_prep.__main__ import main
from leffa.errors import UserError
from leffa.manifest import update_manifest
from leffa.shard_writer import AtomicShardWriter


def tiny(index: int) -> dict:
    return {"__key__": f"toy_train_paired_{index:03d}", "json": b'{"i": %d}' % index, "tgt.jpg": bytes([index]) * 10}


def visible_tars(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.endswith(".tar"))


def test_shards_are_hidden_until_commit_and_readable_by_webdataset(tmp_path):
    with AtomicShardWriter(tmp_path, "train", shard_size=2) as writer:
        for index in range(5):
            writer.write(tiny(index))
        assert visible_tars(tmp_path) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            ".train-000000.tar.tmp", ".train-000001.tar.tmp", ".train-000002.tar.tmp"]  # fmt: skip
        records = writer.commit()
    assert [(r["name"], r["num_samples"]) for r in records] == [
        ("train-000000.tar", 2), ("train-000001.tar", 2), ("train-000002.tar", 1)]  # fmt: skip
    assert all(r["size_bytes"] == (tmp_path / r["name"]).stat().st_size for r in records)
    assert sorted(p.name for p in tmp_path.iterdir()) == visible_tars(tmp_path)  # no temporaries left
    dataset = wds.WebDataset(str(tmp_path / "train-{000000..000002}.tar"), shardshuffle=False)
    assert [s["__key__"] for s in dataset] == [f"toy_train_paired_{i:03d}" for i in range(5)]


def test_exception_inside_writer_leaves_no_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with AtomicShardWriter(tmp_path, "train", shard_size=2) as writer:
            for index in range(3):
                writer.write(tiny(index))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_commit_removes_stale_shards_and_leftover_temporaries(tmp_path):
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar", "test-000000.tar"):
        (tmp_path / name).write_bytes(b"old")
    (tmp_path / ".train-000007.tar.tmp").write_bytes(b"from a killed run")
    with AtomicShardWriter(tmp_path, "train", shard_size=2) as writer:
        for index in range(3):
            writer.write(tiny(index))
        writer.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test-000000.tar", "train-000000.tar", "train-000001.tar"]
    assert (tmp_path / "test-000000.tar").read_bytes() == b"old"  # other splits are left alone
    assert (tmp_path / "train-000000.tar").read_bytes() != b"old"


def synthetic_argv(out: Path, *extra: str) -> list[str]:
    return [
        "synthetic",
        "--out",
        str(out),
        "--count",
        "6",
        "--shard-size",
        "2",
        "--height",
        "40",
        "--width",
        "32",
        *extra,
    ]


def test_interrupted_run_keeps_the_previous_shards(tmp_path, monkeypatch):
    out = tmp_path / "shards"
    main(synthetic_argv(out, "--split", "train"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["manifest.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"]

    original = synthetic.load_sample

    def fails_on_fifth(spec):
        if spec.index == 4:
            raise RuntimeError("disk full")
        return original(spec)

    monkeypatch.setattr(synthetic, "load_sample", fails_on_fifth)
    with pytest.raises(RuntimeError, match="disk full"):
        main(synthetic_argv(out, "--split", "train", "--seed", "1"))  # two new shards were complete by then
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        main(synthetic_argv(fresh, "--split", "train"))
    assert list(fresh.iterdir()) == []


def test_rerun_is_idempotent_and_stale_shards_go(tmp_path):
    out = tmp_path / "shards"
    first = main(synthetic_argv(out))
    shards = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    second = main(synthetic_argv(out))
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == shards
    for split in ("train", "test"):
        a, b = first["splits"][split], second["splits"][split]
        assert {k: v for k, v in a.items() if k != "created"} == {k: v for k, v in b.items() if k != "created"}
    main(synthetic_argv(out, "--limit", "3"))  # fewer samples: shard 000002 of each split is stale
    assert visible_tars(out) == ["test-000000.tar", "test-000001.tar", "train-000000.tar", "train-000001.tar"]
    assert [k for k, _ in read_split(out, "train")] == [f"synthetic_train_paired_{i:06d}" for i in range(3)]


def test_manifest_merges_splits(tmp_path):
    out = tmp_path / "shards"
    main(synthetic_argv(out, "--split", "test"))
    manifest = main(synthetic_argv(out, "--split", "train", "--limit", "4"))
    assert manifest == read_manifest(out)
    assert manifest["schema_version"] == 1 and manifest["dataset"] == "synthetic"
    assert {s: e["num_written"] for s, e in manifest["splits"].items()} == {"test": 6, "train": 4}
    assert [s["name"] for s in manifest["splits"]["test"]["shards"]] == [
        "test-000000.tar",
        "test-000001.tar",
        "test-000002.tar",
    ]
    assert "--split train" in manifest["command"] and manifest["source"] is None and manifest["created"]
    with pytest.raises(UserError, match="describes dataset 'synthetic', not 'vitonhd'"):
        update_manifest(out, "vitonhd", "train", {}, [], "/data", "cmd")
