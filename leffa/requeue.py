"""Checkpoint and requeue a SLURM job on its warning signal, safely under data parallelism."""

from __future__ import annotations

import os
import signal as signal_module
import subprocess

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

__all__ = ["SlurmRequeue"]


class SlurmRequeue(L.Callback):
    """On the job's warning signal (``#SBATCH --signal=USR1@<seconds>``), every rank saves
    ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir`` together at the next optimizer step, rank 0
    requeues the job (``scontrol requeue``) and training stops. The requeued job resumes from
    that checkpoint: under SLURM, with no ``ckpt_path``, Lightning picks the newest one.

    Replaces Lightning's own auto-requeue, which this callback turns off: Lightning saves the
    checkpoint inside the signal handler, so each rank enters the checkpoint's collectives at
    whatever point of the step the signal caught it, and ranks caught at different points
    deadlock (Lightning issue #21406); forked DataLoader workers, which SLURM signals too, would
    run the same handler. Here the handler only records the signal (in the training process);
    the ranks agree on it after each optimizer step, where they all are. Does nothing outside
    SLURM.

    Args:
        signal: the signal's name, as in ``--signal``.
    """

    def __init__(self, signal: str = "SIGUSR1"):
        self.signum = signal if isinstance(signal, int) else getattr(signal_module, signal)
        self._received = False
        self._pid: int | None = None
        self._previous = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if isinstance(environment, SLURMEnvironment):
            environment.auto_requeue = False  # Lightning then installs no handler of its own
        if stage != "fit" or not SLURMEnvironment.detect():
            return
        # now, before any DataLoader worker is forked: the workers inherit the handler (and ignore
        # the signal) instead of being killed by it
        self._received, self._pid = False, os.getpid()
        self._previous = signal_module.signal(self.signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() == self._pid:  # not in a forked DataLoader worker
            self._received = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._pid is None or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        # a collective: every rank reaches it at the same step
        if not trainer.strategy.reduce_boolean_decision(self._received, all=False):
            return
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            job = os.environ["SLURM_JOB_ID"]
            if "SLURM_ARRAY_JOB_ID" in os.environ:
                job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode == 0:
                rank_zero_info(f"saved {path} at step {trainer.global_step}; requeued SLURM job {job}")
            else:
                rank_zero_warn(f"saved {path}, but `scontrol requeue {job}` failed: {result.stderr.strip()}")
        trainer.should_stop = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._pid == os.getpid() and self._previous is not None:
            signal_module.signal(self.signum, self._previous)
        self._pid, self._previous = None, None
