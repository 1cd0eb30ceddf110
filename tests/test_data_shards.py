"""Shard list resolution: manifest (file, folder, @split), brace patterns, globs, errors (leffa/data/shards.py)."""

import json
import os

import pytest

from data_prep.synthetic_shards import synthetic_shards
from leffa.data.shards import resolve_shards, resolve_sources


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A shard folder with a manifest: train (3 shards) and test (2 shards)."""
    root = tmp_path_factory.mktemp("shards")
    synthetic_shards(root, 6, 8, 8, split="train", shard_size=2)
    synthetic_shards(root, 4, 8, 8, split="test", shard_size=2)
    return str(root)


def _names(paths):
    return [os.path.basename(p) for p in paths]


def test_manifest_folder_file_and_split(folder):
    train = ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert _names(resolve_shards(folder)) == train
    assert _names(resolve_shards(os.path.join(folder, "manifest.json"))) == train
    assert _names(resolve_shards(folder + "@test")) == ["test-000000.tar", "test-000001.tar"]
    manifest = os.path.join(folder, "manifest.json")
    assert _names(resolve_shards(manifest + "@test")) == ["test-000000.tar", "test-000001.tar"]
    assert all(os.path.isfile(p) for p in resolve_shards(folder))


def test_manifest_default_split_falls_back_in_order(folder):
    assert _names(resolve_shards(folder, default_splits=("val", "test"))) == ["test-000000.tar", "test-000001.tar"]


def test_manifest_unknown_split_lists_valid_ones(folder):
    with pytest.raises(ValueError, match=r"no split 'val'.*\['test', 'train'\]"):
        resolve_shards(folder + "@val")


def test_brace_pattern(folder):
    paths = resolve_shards(os.path.join(folder, "train-{000000..000001}.tar"))
    assert _names(paths) == ["train-000000.tar", "train-000001.tar"]


def test_glob_is_sorted(folder):
    assert _names(resolve_shards(os.path.join(folder, "*.tar"))) == [
        "test-000000.tar", "test-000001.tar", "train-000000.tar", "train-000001.tar", "train-000002.tar",
    ]  # fmt: skip


def test_brace_with_glob(folder):
    assert _names(resolve_shards(os.path.join(folder, "{train,test}-00000[01].tar"))) == [
        "train-000000.tar", "train-000001.tar", "test-000000.tar", "test-000001.tar",
    ]  # fmt: skip


def test_missing_brace_member_names_pattern_and_file(folder):
    pattern = os.path.join(folder, "train-{000000..000005}.tar")
    with pytest.raises(FileNotFoundError, match=r"train-\{000000\.\.000005\}\.tar.*train-000003\.tar"):
        resolve_shards(pattern)


def test_empty_glob_names_pattern(folder):
    with pytest.raises(FileNotFoundError, match=r"val-\*\.tar"):
        resolve_shards(os.path.join(folder, "val-*.tar"))


def test_missing_single_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        resolve_shards(str(tmp_path / "nope.tar"))


def test_folder_without_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest"):
        resolve_shards(str(tmp_path))


def test_manifest_wrong_schema_version(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 2, "splits": {}}))
    with pytest.raises(ValueError, match="schema_version 2"):
        resolve_shards(str(tmp_path))


def test_manifest_listing_a_missing_shard(tmp_path, folder):
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="missing shard.*train-000000.tar"):
        resolve_shards(str(tmp_path))


def test_urls_pass_through_unchecked():
    assert resolve_shards("pipe:cat /x/a-{0..1}.tar") == ["pipe:cat /x/a-0.tar", "pipe:cat /x/a-1.tar"]


def test_resolve_sources(folder):
    assert resolve_sources(None) == []
    assert len(resolve_sources(folder)) == 1
    sources = resolve_sources([folder, folder + "@test"])
    assert [len(s) for s in sources] == [3, 2]
