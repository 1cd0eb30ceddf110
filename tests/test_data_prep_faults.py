"""Hostile conditions for `python -m data_prep` and the shard readers (issue 20): a full disk while
writing shards or the manifest, a read-only --out, deeply nested JSON, zero samples in, --out inside
--src, DressCode's --dense-index-scale out of range. Each is one `error:` line (exit 2) or a
skipped-and-counted sample, and leaves the output folder as it was or in a state a rerun accepts."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from raw_datasets import make_vitonhd, read_manifest, read_split
from raw_dresscode import make_dresscode

from data_prep.__main__ import main
from data_prep.deepfashion import parse_keypoints
from data_prep.sample import SampleError
from data_prep.synthetic_shards import synthetic_sample
from leffa import manifest as manifest_module
from leffa import shard_writer
from leffa.data import LeffaDataModule
from leffa.data.preflight import check_sources
from leffa.data.shards import resolve_shards
from leffa.errors import UserError, user_errors_as_one_line
from leffa.shard_writer import AtomicShardWriter

DEEP = "[" * 100_000 + "]" * 100_000  # json.loads raises RecursionError on it
REPO = Path(__file__).resolve().parents[1]


def cli_error(capsys, argv: list[str]) -> str:
    """Run `python -m data_prep argv` as its entry point does (in this process); return its one line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        user_errors_as_one_line(lambda: main(argv), extra=(ValueError, FileNotFoundError))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def synthetic(out: Path, *extra: str) -> list[str]:
    return ["synthetic", "--out", str(out), "--count", "5", "--shard-size", "2", "--height", "40", "--width", "32",
            "--split", "train", *extra]  # fmt: skip


def digests(folder: Path) -> dict[str, str]:
    """Every file of the folder (hidden ones too) -> its SHA-256."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def no_space(*_args) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


# DressCode --dense-index-scale


@pytest.mark.parametrize("scale", ["0", "-3", "11", "40"])
def test_dense_index_scale_outside_1_to_10_is_one_line(capsys, tmp_path, scale):
    raw = make_dresscode(tmp_path / "DressCode")
    out = tmp_path / "shards"
    line = cli_error(capsys, ["dresscode", "--src", str(raw), "--out", str(out), "--dense-index-scale", scale])
    assert f"--dense-index-scale {scale}" in line and "1..255" in line
    assert not out.exists()


# A full disk


class FillingDisk:
    """`open` for leffa.shard_writer: files that share `capacity` bytes, then fail with ENOSPC
    like a full disk (the buffered stream's flush, hence also its close, fails)."""

    def __init__(self, capacity: int):
        self.left = capacity
        disk = self

        class File(io.FileIO):
            def write(self, data):  # as write(2): what fits, then ENOSPC
                if disk.left == 0:
                    no_space()
                written = super().write(bytes(data[: disk.left]))
                disk.left -= written
                return written

        self.file_class = File

    def __call__(self, path, mode="r", *args, **kwargs):
        assert mode == "wb", mode
        return io.BufferedWriter(self.file_class(path, "w"))


def test_abort_removes_the_temporaries_after_a_failed_flush(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_writer, "open", FillingDisk(20_000), raising=False)
    writer = AtomicShardWriter(tmp_path, "train", shard_size=2)
    with pytest.raises(UserError, match=f"no space left on the device writing {tmp_path}/train-00000"):
        for index in range(20):
            writer.write(synthetic_sample(index, 40, 32))
    writer.abort()  # the stream's close fails too: the temporaries go all the same
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "over-a-previous-run"])
def test_disk_full_while_writing_shards_is_one_line_and_leaves_the_folder(capsys, tmp_path, monkeypatch, previous):
    out = tmp_path / "shards"
    if previous:
        main(synthetic(out, "--seed", "1"))
    before = digests(out) if previous else {}
    with monkeypatch.context() as patch:
        patch.setattr(shard_writer, "open", FillingDisk(20_000), raising=False)
        line = cli_error(capsys, synthetic(out))
    assert line.startswith("error: no space left on the device writing ") and str(out) in line
    assert (digests(out) if out.exists() else {}) == before  # no .tmp left; earlier files byte-identical
    manifest = main(synthetic(out))  # the rerun, with space
    assert manifest["splits"]["train"]["num_written"] == 5 and len(read_split(out, "train")) == 5


class FullManifestFile:
    """What leffa.manifest's `open` gives for writing on a full disk: the file exists, writes fail."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, _data):
        no_space()

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def full_disk_for_writes(path, mode="r", *args, **kwargs):
    handle = open(path, mode, *args, **kwargs)
    return FullManifestFile(handle) if "w" in mode else handle


@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "over-a-previous-run"])
def test_disk_full_at_the_manifest_write_keeps_the_folder_as_it_was(capsys, tmp_path, monkeypatch, previous):
    out = tmp_path / "shards"
    if previous:
        main(synthetic(out, "--seed", "1", "--count", "7"))  # 4 shards: the new run's 3 must not replace them
    before = digests(out) if previous else {}
    with monkeypatch.context() as patch:
        patch.setattr(manifest_module, "open", full_disk_for_writes, raising=False)
        line = cli_error(capsys, synthetic(out))
    assert line.startswith("error: no space left on the device writing ") and "manifest.json" in line
    assert (digests(out) if out.exists() else {}) == before  # no shard renamed, no .tmp left
    manifest = main(synthetic(out))  # the rerun is accepted
    assert [s["name"] for s in manifest["splits"]["train"]["shards"]] == [
        "train-000000.tar", "train-000001.tar", "train-000002.tar"]  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", *(s["name"] for s in
                                                                        manifest["splits"]["train"]["shards"])]


# A read-only --out


def test_read_only_parent_of_out_is_one_line_naming_it(capsys, tmp_path, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    out = parent / "shards"
    try:
        if os.access(parent, os.W_OK):  # root: permissions do not stop writes; give what a user sees
            access = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == parent and mode & os.W_OK
                                else access(p, mode, *a, **k))  # fmt: skip
        line = cli_error(capsys, synthetic(out))
    finally:
        parent.chmod(0o755)
    assert line.startswith(f"error: --out {out}: cannot write in {parent}") and "choose another --out" in line
    assert not out.exists()


@pytest.mark.parametrize("where", ["mkdir", "open"])
def test_permission_denied_while_writing_is_one_line_naming_the_folder(capsys, tmp_path, monkeypatch, where):
    # what a folder that os.access calls writable but that refuses writes (ACLs, root-squashed NFS) does
    out = tmp_path / "shards"
    def denied(path, *_args, **_kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    if where == "mkdir":
        mkdir = Path.mkdir
        monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: denied(self) if self == out else mkdir(self, *a, **k))
    else:
        out.mkdir()
        monkeypatch.setattr(shard_writer, "open", denied, raising=False)
    line = cli_error(capsys, synthetic(out))
    assert line.startswith("error: cannot write ") and str(out) in line and "Permission denied" in line
    assert not out.exists() or list(out.iterdir()) == []


# Deeply nested JSON


def test_deeply_nested_openpose_file_skips_only_that_sample(tmp_path):
    raw = make_vitonhd(tmp_path / "zalando-hd-resized")
    bad = raw / "train" / "openpose_json" / "00002_00_keypoints.json"
    bad.write_text(DEEP)
    manifest = main(["vitonhd", "--src", str(raw), "--out", str(tmp_path / "shards"), "--split", "train",
                     "--mask-source", "rule"])  # fmt: skip
    entry = manifest["splits"]["train"]
    assert (entry["num_samples_in"], entry["num_written"], entry["num_skipped"]) == (3, 2, 1)
    (skipped,) = manifest["skipped"]
    assert skipped["key"] == "vitonhd_train_paired_00002_00" and str(bad) in skipped["reason"]


def test_deeply_nested_deepfashion_keypoints_are_a_sample_error():
    with pytest.raises(SampleError, match="unreadable keypoint lists"):
        parse_keypoints((DEEP, "[]"), (44, 64))


def test_deeply_nested_manifest_is_one_line(capsys, tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "manifest.json").write_text(DEEP)
    line = cli_error(capsys, synthetic(out))
    assert line.startswith(f"error: {out / 'manifest.json'} is not a readable manifest")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]


@pytest.mark.parametrize("content", [DEEP, "[1, 2]"], ids=["deep", "not-an-object"])
def test_deeply_nested_or_non_object_manifest_is_a_user_error_for_the_reader(tmp_path, content):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(UserError, match=f"manifest '{tmp_path / 'manifest.json'}'"):
        resolve_shards(str(tmp_path))


def _shard_with_a_deep_json(path: Path) -> None:
    samples = [dict(synthetic_sample(i, 40, 30, "test"), __key__=f"deep_test_{i:04d}") for i in range(4)]
    samples[0]["json"] = DEEP.encode()
    samples[2]["json"] = DEEP.encode()
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def test_deeply_nested_sample_json_is_skipped_and_counted(tmp_path):
    _shard_with_a_deep_json(tmp_path / "test-000000.tar")
    dm = LeffaDataModule(test_shards=str(tmp_path / "test-*.tar"), height=32, width=24, batch_size=1, num_workers=0)
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert [k for b in batches for k in b["key"]] == ["deep_test_0001", "deep_test_0003"]
    assert sum(int(b["skipped"]) for b in batches) == 2


def test_preflight_leaves_a_deeply_nested_sample_json_to_the_pipeline(tmp_path):
    shard = tmp_path / "train-000000.tar"
    _shard_with_a_deep_json(shard)
    check_sources("train", [[str(shard)]], hflip=True)  # no RecursionError; the stream skips the sample


# Zero samples in


def test_zero_samples_in_is_one_line(capsys, tmp_path):
    out = tmp_path / "shards"
    line = cli_error(capsys, synthetic(out, "--count", "0"))
    assert "no train samples" in line and "--count 0" in line
    line = cli_error(capsys, synthetic(out, "--limit", "0"))
    assert "no train samples" in line and "--limit 0" in line
    raw = make_vitonhd(tmp_path / "zalando-hd-resized")
    (raw / "test_pairs.txt").write_text("\n")
    line = cli_error(capsys, ["vitonhd", "--src", str(raw), "--out", str(out)])
    assert "no test samples" in line and str(raw) in line
    assert not out.exists()  # refused before anything is written, train included


# --out inside --src


def test_out_inside_src_is_refused(capsys, tmp_path):
    raw = make_vitonhd(tmp_path / "zalando-hd-resized")
    before = {p: p.stat().st_mtime_ns for p in raw.rglob("*")}
    link = tmp_path / "link"
    link.symlink_to(raw)
    for out in (raw, raw / "shards", link / "train", tmp_path / "zalando-hd-resized" / ".." / raw.name):
        line = cli_error(capsys, ["vitonhd", "--src", str(raw), "--out", str(out)])
        assert line.startswith(f"error: --out {out} is inside --src {raw}")
    assert {p: p.stat().st_mtime_ns for p in raw.rglob("*")} == before


def test_out_inside_a_deepfashion_source_folder_is_refused(capsys, tmp_path):
    (tmp_path / "fashion").mkdir()
    poses = tmp_path / "poses"
    poses.mkdir()
    line = cli_error(capsys, ["deepfashion", "--src", str(tmp_path / "fashion"), "--densepose", str(poses),
                              "--out", str(poses / "shards")])  # fmt: skip
    assert line.startswith(f"error: --out {poses / 'shards'} is inside --densepose {poses}")
    assert list(poses.iterdir()) == []


def test_out_beside_src_is_fine(tmp_path):
    raw = make_vitonhd(tmp_path / "zalando-hd-resized")
    manifest = main(["vitonhd", "--src", str(raw), "--out", str(tmp_path / "zalando-hd-resized-shards"),
                     "--split", "train"])  # fmt: skip
    assert manifest["splits"]["train"]["num_written"] == 3
    assert read_manifest(tmp_path / "zalando-hd-resized-shards")["dataset"] == "vitonhd"


@pytest.mark.slow  # subprocesses: over 10 s on 2 cores
def test_the_entry_point_prints_one_line(tmp_path):
    # the in-process cli_error above, checked once against the real `python -m data_prep`
    raw = make_dresscode(tmp_path / "DressCode")
    for argv, start in (
        (["--out", str(raw / "shards")], f"error: --out {raw / 'shards'} is inside --src {raw}"),
        (["--out", str(tmp_path / "out"), "--dense-index-scale", "0"], "error: --dense-index-scale 0:"),
    ):
        result = subprocess.run([sys.executable, "-m", "data_prep", "dresscode", "--src", str(raw), *argv],
                                cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert result.returncode == 2 and result.stdout == "", result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith(start), line
    assert not (raw / "shards").exists() and not (tmp_path / "out").exists()
