"""Checkpoints are written atomically in their own folder (``leffa.atomic_checkpoint_io``, wired into the
configs as ``trainer.plugins``): a job killed while saving, with ``$TMPDIR`` on another file
system, keeps the previous ``last.ckpt`` whole.

The kill test runs this file as a script: it trains the tiny model with the plugins of
configs/tiny_synthetic.yaml and writes ``last.ckpt`` at every step, with ``$TMPDIR`` on /dev/shm (a
tmpfs; the test's folder is not). The test waits until one checkpoint is complete, then SIGKILLs
the child at the first sign of the next save: a new entry in the checkpoint folder, or
``last.ckpt`` itself changing (truncated by a copy). Whatever the child was doing then, the
final name must hold a whole checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from leffa.atomic_checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from leffa.testing import TINY_UNET, TINY_VAE, batch_loader

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny_synthetic.yaml"
READY = "ready"
# a checkpoint of tens of MB: a copy across file systems then takes long enough to be caught
BALLAST = 16 * 2**20


def plugins_from_config(path: Path) -> list:
    """``trainer.plugins`` of a config, instantiated as the CLI does."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.plugins.io import CheckpointIO

    parser = ArgumentParser()
    parser.add_argument("--plugins", type=list[CheckpointIO] | None, default=None)
    plugins = yaml.safe_load(path.read_text())["trainer"].get("plugins")
    return parser.instantiate(parser.parse_object({"plugins": plugins})).plugins or []


def child(folder: Path) -> None:
    """Train forever, saving ``last.ckpt`` at every step; ``READY`` once the first one is whole."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from leffa.module import LeffaModule

    class Ballast(L.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            checkpoint["ballast"] = torch.full((BALLAST // 4,), float(trainer.global_step))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:  # the step-1 save has returned
                (folder / READY).touch()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    module = LeffaModule(unet_config=dict(TINY_UNET), vae_config=dict(TINY_VAE), learning_rate=1e-3)
    saver = ModelCheckpoint(dirpath=folder / "checkpoints", every_n_train_steps=1, save_top_k=0, save_last=True)
    trainer = L.Trainer(max_steps=10**6, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Ballast(), saver],
                        plugins=plugins_from_config(TINY_CONFIG), default_root_dir=folder)
    trainer.fit(module, train_dataloaders=batch_loader())


def snapshot(folder: Path) -> tuple:
    entries = tuple(sorted(os.listdir(folder)))
    stat = (folder / "last.ckpt").stat()
    return entries, stat.st_ino, stat.st_size, stat.st_mtime_ns


def kill_during_a_save(folder: Path, tmpdir: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, __file__, str(folder)], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not (folder / READY).exists():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
        checkpoints = folder / "checkpoints"
        before = snapshot(checkpoints)
        while snapshot(checkpoints) == before:
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm (a tmpfs) for $TMPDIR")
@pytest.mark.parametrize("attempt", range(2))
def test_a_kill_during_a_save_with_tmpdir_elsewhere_keeps_last_ckpt_loadable(tmp_path, attempt):
    tmpdir = Path("/dev/shm") / f"leffa-test-{uuid.uuid4().hex}"
    tmpdir.mkdir()
    try:
        assert os.stat(tmpdir).st_dev != os.stat(tmp_path).st_dev  # another file system
        kill_during_a_save(tmp_path, tmpdir)
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.stat().st_size > BALLAST, f"last.ckpt has {last.stat().st_size} bytes after the kill"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] >= 1
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    # nothing at a final name is partial: every checkpoint there loads
    for path in (tmp_path / "checkpoints").glob("*.ckpt"):
        torch.load(path, weights_only=True)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)
    original = path.read_bytes()

    def half_then_fail(obj, file):
        file.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_a_save_replaces_the_file_and_removes_stale_temporaries(tmp_path):
    path = tmp_path / "sub" / "last.ckpt"
    stale = tmp_path / "sub" / ".last.ckpt.0123456789ab.tmp"
    other = tmp_path / "sub" / ".step=2.ckpt.0123456789ab.tmp"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, path)  # creates the folder
    stale.write_bytes(b"killed mid-save")
    other.write_bytes(b"another name's")
    AtomicCheckpointIO().save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == [other.name, "last.ckpt"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_every_training_config_writes_checkpoints_atomically(monkeypatch, capsys):
    from leffa.cli import cli_main

    monkeypatch.setenv("LEFFA_SD15", "/nowhere")
    monkeypatch.setenv("LEFFA_SHARDS", "/nowhere")
    monkeypatch.setenv("LEFFA_RELEASED", "/nowhere/virtual_tryon.pth")  # the fine-tuning recipes
    monkeypatch.setenv("LEFFA_RELEASED_DC", "/nowhere/virtual_tryon_dc.pth")
    monkeypatch.setenv("LEFFA_SDXL", "/nowhere/sdxl-inpainting")
    monkeypatch.setenv("LEFFA_RELEASED_POSE", "/nowhere/pose_transfer.pth")
    stages = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("predict"))
    combos = [[stage] for stage in stages] + [
        [ROOT / "configs" / "vton_512.yaml", ROOT / "configs" / "strategy" / "fsdp.yaml"],
        [TINY_CONFIG, ROOT / "configs" / "strategy" / "fsdp2_cpu.yaml"],
        [ROOT / "configs" / "vton_512.yaml", ROOT / "configs" / "ci" / "slurm_cpu.yaml"],
    ]
    for configs in combos:
        with pytest.raises(SystemExit) as done:
            cli_main(["fit", *(a for c in configs for a in ("--config", str(c))), "--print_config"])
        assert done.value.code in (0, None), configs
        printed = yaml.safe_load(capsys.readouterr().out)
        plugins = printed["trainer"]["plugins"]
        plugins = plugins if isinstance(plugins, list) else [plugins]
        assert [p["class_path"] for p in plugins] == ["leffa.atomic_checkpoint_io.AtomicCheckpointIO"], configs


if __name__ == "__main__":
    child(Path(sys.argv[1]))
