"""Malformed pair files stop the run with one line naming the file and line, before any shard is written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from raw_datasets import TRAIN_VITONHD, make_vitonhd, read_split

from data_prep.__main__ import main
from leffa.errors import UserError
from leffa.pair_file import read_pair_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    return make_vitonhd(tmp_path / "zalando-hd-resized")


def vitonhd(raw: Path, out: Path) -> list[str]:
    return ["vitonhd", "--src", str(raw), "--out", str(out), "--shard-size", "2"]


def test_one_column_line_is_named_and_nothing_is_written(raw, tmp_path):
    # The train split is fine; the test split's pair file breaks on line 2: not even train is written.
    (raw / "test_pairs.txt").write_text("00010_00.jpg 00011_00.jpg\n00011_00.jpg\n")
    out = tmp_path / "shards"
    path = re.escape(str(raw / "test_pairs.txt"))
    with pytest.raises(UserError, match=rf"^{path}:2: expected 2 columns \(person garment\), got 1: '00011_00.jpg'"):
        main(vitonhd(raw, out))
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.slow  # over 10 s on 2 cores: make test runs it, make test-fast does not
def test_bytes_that_are_not_utf8_are_named_by_line(raw, tmp_path):
    (raw / "train_pairs.txt").write_bytes(b"00001_00.jpg 00001_00.jpg\n\n00002_00\xff.jpg 00002_00.jpg\n")
    out = tmp_path / "shards"
    path = re.escape(str(raw / "train_pairs.txt"))
    with pytest.raises(UserError, match=rf"^{path}:3: not UTF-8 text"):
        main(vitonhd(raw, out) + ["--split", "train"])
    result = subprocess.run([sys.executable, "-m", "data_prep", *vitonhd(raw, out)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {raw / 'train_pairs.txt'}:3: not UTF-8 text")
    assert not out.exists() or list(out.iterdir()) == []


def test_blank_lines_crlf_and_a_byte_order_mark_are_accepted(raw, tmp_path):
    lines = [f"{stem}.jpg {stem}.jpg" for stem in TRAIN_VITONHD]
    text = "\ufeff" + "\r\n".join(lines[:1] + ["", "  "] + lines[1:]) + "\r\n"
    (raw / "train_pairs.txt").write_bytes(text.encode())
    out = tmp_path / "shards"
    manifest = main(vitonhd(raw, out) + ["--split", "train"])
    assert [k for k, _ in read_split(out, "train")] == [f"vitonhd_train_paired_{s}" for s in TRAIN_VITONHD]
    assert manifest["splits"]["train"]["num_skipped"] == 0


def test_reader_gives_line_numbers_and_checks_every_line(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("a b\n\n c  d \n")
    assert read_pair_file(path, ("person", "reference")) == [(1, ["a", "b"]), (3, ["c", "d"])]
    path.write_text("a b\nc d e\n")
    with pytest.raises(UserError, match=r"pairs\.txt:2: expected 2 columns \(person reference\), got 3"):
        read_pair_file(path, ("person", "reference"))


def test_names_that_are_paths_are_refused(raw, tmp_path):
    # Pair-file names are joined to the dataset folders: none may lead out of them.
    for bad in ("../../secret.jpg", "/etc/passwd", "sub/00001_00.jpg", ".."):
        (raw / "train_pairs.txt").write_text(f"00001_00.jpg 00001_00.jpg\n{bad} 00002_00.jpg\n")
        with pytest.raises(UserError, match=rf"train_pairs\.txt:2: {re.escape(repr(bad))} is not a plain file name"):
            main(vitonhd(raw, tmp_path / "shards") + ["--split", "train"])
