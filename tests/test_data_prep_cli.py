"""The `python -m data_prep` entry point, as `make shards` calls it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from raw_datasets import read_manifest, read_split

from data_prep.__main__ import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # over 10 s on 2 cores: make test runs it, make test-fast does not
def test_make_shards_command_line(tmp_path):
    # The Makefile passes every flag; SRC is empty for the synthetic set.
    out = tmp_path / "shards"
    command = [sys.executable, "-m", "data_prep", "synthetic", "--src", "--out", str(out), "--split", "all",
               "--shard-size", "3", "--workers", "2", "--count", "5", "--height", "40", "--width", "32"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "synthetic train: 5 in, 5 written, 0 skipped, 2 shards" in result.stdout
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "test-000000.tar",
        "test-000001.tar",
        "train-000000.tar",
        "train-000001.tar",
    ]
    manifest = read_manifest(out)
    assert manifest["command"].startswith("python -m data_prep synthetic --src --out")
    assert [s["num_samples"] for s in manifest["splits"]["train"]["shards"]] == [3, 2]



def test_synthetic_ignores_the_empty_src_make_passes(tmp_path, monkeypatch):
    # `make shards DATASET=synthetic OUT=shards/synthetic` runs `--src "" --out shards/synthetic` in the
    # repository; the empty --src used to count as the current folder, which holds --out: refused.
    monkeypatch.chdir(tmp_path)
    manifest = main(["synthetic", "--src", "", "--out", "shards/synthetic", "--split", "train", "--count", "2",
                     "--height", "16", "--width", "16"])  # fmt: skip
    assert manifest["splits"]["train"]["num_written"] == 2 and manifest["source"] is None

@pytest.mark.slow  # over 10 s on 2 cores: make test runs it, make test-fast does not
def test_unknown_dataset_lists_the_valid_ones(tmp_path):
    with pytest.raises(
        ValueError, match="unknown dataset 'vitonhd2'; valid: vitonhd, dresscode, deepfashion, synthetic, folder"
    ):
        main(["vitonhd2", "--src", str(tmp_path), "--out", str(tmp_path)])
    result = subprocess.run([sys.executable, "-m", "data_prep", "vitonhd2", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert (
        result.stderr.strip() == "error: unknown dataset 'vitonhd2'; valid: vitonhd, dresscode, deepfashion, synthetic, folder"
    )


def test_missing_source_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--src .*nowhere is not a folder"):
        main(["dresscode", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])


def test_workers_give_the_same_shards(tmp_path):
    def run(workers: int) -> dict:
        out = tmp_path / f"workers{workers}"
        main(["synthetic", "--out", str(out), "--count", "7", "--shard-size", "3", "--workers", str(workers),
              "--height", "40", "--width", "32"])  # fmt: skip
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}

    in_process, pooled = run(0), run(2)
    assert len(in_process) == 6 and pooled == in_process
    assert len(read_split(tmp_path / "workers2", "test")) == 7
