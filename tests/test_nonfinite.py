"""A non-finite loss stops training with one line naming the step and the term, before the
optimizer step: the weights stay finite and the last checkpoint written stays byte for byte the
last good one."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from leffa.errors import UserError
from leffa.module import LeffaModule
from leffa.testing import TINY_UNET, TINY_VAE, make_batch

pytestmark = pytest.mark.usefixtures("one_thread")


class Batches(torch.utils.data.IterableDataset):
    """Finite batches, except that at step ``poison_at`` the tensor ``poison`` holds an inf."""

    def __init__(self, poison: str | None = None, poison_at: int = 0):
        self.poison, self.poison_at = poison, poison_at

    def __iter__(self):
        step = 0
        while True:
            batch = make_batch(seed=step % 2)
            if self.poison and step == self.poison_at:
                batch[self.poison][0, :, 30, 20] = math.inf
            yield batch
            step += 1


class LastCheckpointBeforeEachStep(L.Callback):
    """The bytes of last.ckpt as each training step begins."""

    def __init__(self, path):
        self.path, self.before, self.step = path, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step
        self.before = self.path.read_bytes() if self.path.exists() else None


def train_until_stopped(tmp_path, batches: Batches, **kwargs):
    torch.manual_seed(0)
    module = LeffaModule(unet_config=dict(TINY_UNET), vae_config=dict(TINY_VAE), use_leffa_loss=True,
                         theta_timestep=1000, p_drop_ref=0.0, **kwargs)
    last = tmp_path / "last.ckpt"
    watcher = LastCheckpointBeforeEachStep(last)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=0, save_last=True)
    trainer = L.Trainer(max_steps=40, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[watcher, saver], default_root_dir=tmp_path)
    with pytest.raises(UserError) as stopped:
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    message = str(stopped.value)
    assert "\n" not in message
    # stopped before the optimizer step: nothing moved on, and the checkpoint is the last good one
    assert trainer.global_step == watcher.step
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert watcher.before is not None and last.read_bytes() == watcher.before
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == watcher.step
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
    return message, watcher.step


@pytest.mark.parametrize("poison,term,conditioning", [
    ("tgt", "diffusion", "tryon"),
    # the pose conditioning does not use the mask, the Leffa loss does (Eq. 4)
    ("mask", "leffa", "pose"),
])
@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_a_non_finite_term_stops_training_naming_step_and_term(tmp_path, poison, term, conditioning):
    message, step = train_until_stopped(tmp_path, Batches(poison, poison_at=3), conditioning=conditioning)
    assert step == 3
    assert message.startswith(f"the {term} loss is not finite at global step 3:"), message
    assert "model.learning_rate" in message


def test_a_huge_learning_rate_stops_before_the_weights_go_non_finite(tmp_path):
    message, step = train_until_stopped(tmp_path, Batches(), learning_rate=1e6)
    assert step >= 1
    assert f"is not finite at global step {step}:" in message, message


class NaNGradientAt(L.Callback):
    """A NaN gradient in one parameter at step ``step``, the losses staying finite."""

    def __init__(self, step: int):
        self.step = step

    def on_train_start(self, trainer, pl_module):
        weight = pl_module.generative_unet.conv_in.weight
        weight.register_hook(lambda grad: grad * math.nan if trainer.global_step == self.step else grad)


def test_a_non_finite_gradient_with_finite_losses_stops_too(tmp_path):

    torch.manual_seed(0)
    module = LeffaModule(unet_config=dict(TINY_UNET), vae_config=dict(TINY_VAE))
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=0, save_last=True)
    trainer = L.Trainer(max_steps=10, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[NaNGradientAt(2), saver], default_root_dir=tmp_path)
    with pytest.raises(UserError, match=r"^the gradient \(the losses were finite\) is not finite at global step 2:"):
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(Batches(), batch_size=None))
    assert torch.isfinite(module.generative_unet.conv_in.weight).all()
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2
