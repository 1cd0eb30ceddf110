"""Resuming a stage with ``--ckpt_path`` (``Trainer.fit(ckpt_path=...)``) continues the run exactly.

A CPU run is interrupted after its last checkpoint and resumed from it; from there on, its
per-step losses and its final live and EMA weights must equal those of an uninterrupted run.
That needs every piece of state in the checkpoint: weights, AdamW moments, the EMA average
(``EMAWeightAveraging``), the step counters, and the module's ``noise_generator`` (noise,
timesteps, VAE posterior samples, reference drops).

The data here are a function of the step (``make_batch(seed=step)``) so the comparison is exact.
The real WebDataset training stream does not replay samples on resume: it reseeds from the step
training starts at, so a resumed run continues *statistically* like an uninterrupted one (fresh
draws from the same shard mixture), not sample for sample.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from leffa.module import LeffaModule
from leffa.testing import TINY_UNET, TINY_VAE, make_batch

STEPS = 6
CHECKPOINT_EVERY = 2
INTERRUPT_AT = 5  # the crash comes one step after the step-4 checkpoint: step 5 is lost and redone


@pytest.fixture(autouse=True)
def deterministic_one_thread():
    # deterministic kernels, and one thread: the tiny model is fastest on one, and two threads
    # beside another busy process can be 100x slower
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


class StepBatches(torch.utils.data.IterableDataset):
    """Batch ``make_batch(seed=s)`` at step s, for s from ``start``."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        step = self.start
        while True:
            yield make_batch(seed=step)
            step += 1


class StepData(L.LightningDataModule):
    """Builds the loader when training starts, i.e. after a resumed run restored its step: an
    iterable dataset restarts from its beginning, so it is told where to begin."""

    def train_dataloader(self):
        return torch.utils.data.DataLoader(StepBatches(self.trainer.global_step), batch_size=None)


class Interrupted(Exception):
    pass


class Recorder(L.Callback):
    """Loss of every step, by step number; raises ``Interrupted`` before step ``interrupt_at``."""

    def __init__(self, interrupt_at: int | None = None):
        self.losses: dict[int, float] = {}
        self.interrupt_at = interrupt_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.interrupt_at:
            raise Interrupted(f"stopped before step {self.interrupt_at}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def fit(root, recorder, ckpt_path=None):
    torch.manual_seed(0)
    # p_drop_ref and the Leffa timestep selection on: reference drops are random too
    module = LeffaModule(unet_config=dict(TINY_UNET), vae_config=dict(TINY_VAE), use_leffa_loss=True,
                         theta_timestep=800, p_drop_ref=0.3, learning_rate=1e-3)
    saver = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=CHECKPOINT_EVERY, save_top_k=-1)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, deterministic=True, logger=False,
                        callbacks=[EMAWeightAveraging(decay=0.5), saver, recorder], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, datamodule=StepData(), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.slow  # over 10 s on 2 cores: make test runs it, make test-fast does not
def test_interrupted_and_resumed_run_follows_the_uninterrupted_one(tmp_path):
    whole = Recorder()
    fit(tmp_path / "whole", whole)
    assert sorted(whole.losses) == list(range(1, STEPS + 1))

    first = Recorder(interrupt_at=INTERRUPT_AT)
    with pytest.raises(Interrupted):
        fit(tmp_path / "resumed", first)
    assert sorted(first.losses) == list(range(1, INTERRUPT_AT))
    last_saved = (INTERRUPT_AT - 1) // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    checkpoint = tmp_path / "resumed" / f"step={last_saved}.ckpt"
    assert checkpoint.is_file()

    second = Recorder()
    fit(tmp_path / "resumed", second, ckpt_path=checkpoint)
    assert sorted(second.losses) == list(range(last_saved + 1, STEPS + 1))
    for step, loss in second.losses.items():
        assert loss == pytest.approx(whole.losses[step], abs=1e-6, rel=1e-6), step
    # the losses do move from step to step: the comparison is not between constants
    assert len({round(v, 6) for v in whole.losses.values()}) == STEPS

    # the final checkpoints: live weights, EMA weights and the generator state all equal
    final = [torch.load(tmp_path / run / f"step={STEPS}.ckpt", weights_only=True) for run in ("whole", "resumed")]
    for key in ("state_dict", "current_model_state"):
        a, b = final[0][key], final[1][key]
        assert a.keys() == b.keys()
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        assert worst < 1e-6, (key, worst)
    assert torch.equal(final[0]["noise_generator"], final[1]["noise_generator"])
    # EMA and live weights differ, so both comparisons above mean something
    key = "generative_unet.conv_in.weight"
    assert not torch.equal(final[0]["state_dict"][key], final[0]["current_model_state"][key])


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_a_checkpoint_that_trained_the_reference_head_initialises_but_does_not_resume(tmp_path):
    """Checkpoints written while the Reference UNet's unused head was still trainable (before it
    was frozen when the model is built): their optimizer state covers more tensors. Resuming them
    is a one-line error that names the way on (``model.init_from``), which loads their weights."""
    from leffa.errors import UserError

    def build():
        torch.manual_seed(0)
        return LeffaModule(unet_config=dict(TINY_UNET), vae_config=dict(TINY_VAE))

    def trainer(steps):
        saver = ModelCheckpoint(dirpath=tmp_path, filename="old", every_n_train_steps=steps)
        return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[EMAWeightAveraging(decay=0.5), saver],
                         default_root_dir=tmp_path)

    old = build()
    head = [n for n, p in old.reference_unet.named_parameters() if not p.requires_grad]  # frozen when built
    for name in head:  # as the earlier code left them
        old.reference_unet.get_parameter(name).requires_grad_(True)
    trainer(2).fit(old, datamodule=StepData())
    checkpoint = tmp_path / "old.ckpt"
    saved = torch.load(checkpoint, weights_only=True)["optimizer_states"][0]["param_groups"][0]["params"]
    trainable = sum(p.requires_grad for p in build().parameters())
    assert head and len(saved) == trainable + len(head)

    with pytest.raises(UserError, match=rf"^--ckpt_path: .*{len(saved)} parameter tensors.*{trainable}.*model\.init_from"):
        trainer(3).fit(build(), datamodule=StepData(), ckpt_path=checkpoint)
    module = LeffaModule(unet_config=dict(TINY_UNET), vae_config=dict(TINY_VAE), init_from=str(checkpoint),
                         init_from_weights="live")
    live = torch.load(checkpoint, weights_only=True)["current_model_state"]
    assert all(torch.equal(v, live[k]) for k, v in module.state_dict().items())
