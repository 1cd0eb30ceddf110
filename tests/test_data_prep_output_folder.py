"""The output folder is checked before anything is written: one folder holds one dataset's shards."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from raw_datasets import make_vitonhd, read_split

from data_prep.__main__ import main
from leffa.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def synthetic(out: Path) -> list[str]:
    return ["synthetic", "--out", str(out), "--count", "5", "--shard-size", "2", "--height", "40", "--width", "32"]


def vitonhd(raw: Path, out: Path) -> list[str]:
    return ["vitonhd", "--src", str(raw), "--out", str(out), "--shard-size", "2"]


def digests(folder: Path) -> dict[str, str]:
    """Every file of the folder (hidden ones too) -> its SHA-256."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def synthetic_shards(tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    main(synthetic(out))
    assert len(list(out.glob("*.tar"))) == 6
    return out


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


@pytest.mark.slow  # over 10 s on 2 cores: make test runs it, make test-fast does not
def test_second_dataset_is_refused_before_any_shard_is_touched(synthetic_shards, tmp_path):
    raw = make_vitonhd(tmp_path / "zalando-hd-resized")
    before = digests(synthetic_shards)
    manifest = synthetic_shards / "manifest.json"
    with pytest.raises(UserError, match=rf"{manifest}.* dataset 'synthetic', not 'vitonhd'"):
        main(vitonhd(raw, synthetic_shards))
    assert digests(synthetic_shards) == before

    result = run_cli(vitonhd(raw, synthetic_shards))
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {manifest} describes dataset 'synthetic', not 'vitonhd'")
    assert digests(synthetic_shards) == before


def test_other_schema_version_is_refused_before_writing(synthetic_shards):
    manifest = synthetic_shards / "manifest.json"
    content = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**content, "schema_version": 99}))
    before = digests(synthetic_shards)
    with pytest.raises(UserError, match=rf"{manifest} has schema_version 99, expected 1"):
        main(synthetic(synthetic_shards))
    assert digests(synthetic_shards) == before


@pytest.mark.slow  # over 10 s on 2 cores: make test runs it, make test-fast does not
def test_unreadable_manifest_is_named(synthetic_shards):
    manifest = synthetic_shards / "manifest.json"
    manifest.write_text('{"dataset": "synth')
    before = digests(synthetic_shards)
    with pytest.raises(UserError, match=rf"{manifest} is not a readable manifest"):
        main(synthetic(synthetic_shards))
    assert digests(synthetic_shards) == before
    result = run_cli(synthetic(synthetic_shards))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert digests(synthetic_shards) == before


def test_shards_without_a_manifest_are_not_overwritten(synthetic_shards, tmp_path):
    # Shards we cannot identify (no manifest) are never replaced, even by the same converter.
    (synthetic_shards / "manifest.json").unlink()
    before = digests(synthetic_shards)
    raw = make_vitonhd(tmp_path / "zalando-hd-resized")
    for argv in (vitonhd(raw, synthetic_shards), synthetic(synthetic_shards)):
        with pytest.raises(UserError, match=rf"{synthetic_shards / 'test-000000.tar'} .*no manifest\.json"):
            main(argv)
        assert digests(synthetic_shards) == before


def test_other_files_in_the_folder_are_no_obstacle(tmp_path):
    # Files that are not shards of a split being written are neither read nor touched.
    out = tmp_path / "shards"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "valid-000000.tar").write_bytes(b"not ours")
    main(synthetic(out))
    assert (out / "notes.txt").read_text() == "mine" and (out / "valid-000000.tar").read_bytes() == b"not ours"
    assert len(read_split(out, "train")) == 5


def test_out_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "shards"
    out.write_text("a file")
    with pytest.raises(UserError, match=rf"--out {out} is not a folder"):
        main(synthetic(out))
    assert out.read_text() == "a file"
