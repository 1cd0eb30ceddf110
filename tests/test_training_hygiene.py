"""Training hygiene of the stages (configs/base/train.yaml): gradient clipping by norm, the
gradient norm before clipping logged per optimizer step (``train/grad_norm``), the global batch
logged once at the start of fit, and Lightning's ``ThroughputMonitor`` (samples per second; FLOPs
per batch counted on the meta device, for MFU on GPUs)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger

from leffa.module import LeffaModule
from leffa.testing import TINY_UNET, TINY_VAE, batch_loader, make_batch
from leffa.throughput import batch_samples, training_flops

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def build(**settings) -> LeffaModule:
    torch.manual_seed(0)
    return LeffaModule(unet_config=dict(TINY_UNET), vae_config=dict(TINY_VAE), **settings)


def trainer(tmp_path, **settings) -> L.Trainer:
    return L.Trainer(**{**dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                               enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path),
                        **settings})


class GeneratorAtStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.state = pl_module.noise_generator.get_state()


@pytest.mark.parametrize("stage", ["vton_512.yaml", "pose_256.yaml", "dresscode_1024_leffa.yaml"])
def test_the_stages_clip_gradients_by_norm_and_monitor_throughput(stage, monkeypatch, capsys):
    from leffa.cli import cli_main

    monkeypatch.setenv("LEFFA_SD15", "/nowhere")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(ROOT / "configs" / stage), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["gradient_clip_val"] == 1.0
    assert config["trainer"]["gradient_clip_algorithm"] == "norm"
    monitors = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(".ThroughputMonitor")]
    assert len(monitors) == 1 and monitors[0]["init_args"]["batch_size_fn"] == "leffa.throughput.batch_samples"


def test_grad_norm_is_the_total_norm_before_clipping(tmp_path):
    clip, lr = 1e-3, 0.5  # far below the norm: the step is clipped

    class SGDLeffa(LeffaModule):
        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=lr)

    torch.manual_seed(0)
    module = SGDLeffa(unet_config=dict(TINY_UNET), vae_config=dict(TINY_VAE), use_leffa_loss=True)
    start = GeneratorAtStart()
    run = trainer(tmp_path, max_steps=1, gradient_clip_val=clip, callbacks=[start])
    run.fit(module, train_dataloaders=batch_loader(1))
    logged = run.callback_metrics["train/grad_norm"]

    # the same step in one process: the total 2-norm of the gradients, before any clipping
    reference = build(use_leffa_loss=True)
    initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
    reference.train()
    loss, _ = reference.compute_loss(make_batch(), torch.Generator().set_state(start.state), train=True)
    loss.backward()
    grads = [p.grad for p in reference.parameters() if p.grad is not None]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]).double()).float()
    assert expected > 10 * clip
    torch.testing.assert_close(logged, expected, rtol=1e-5, atol=0)
    # and the update was clipped to norm `clip` (SGD: the step is lr times the clipped gradient)
    moved = [(p.detach() - initial[n]).flatten() for n, p in module.named_parameters() if p.requires_grad]
    assert torch.linalg.vector_norm(torch.cat(moved)).item() == pytest.approx(lr * clip, rel=1e-3)


def test_the_global_batch_is_logged_once_at_the_start(tmp_path, caplog):
    run = trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, logger=CSVLogger(tmp_path, name="csv"))
    with caplog.at_level(logging.INFO):
        run.fit(build(), train_dataloaders=batch_loader(4, batch_size=3))
    lines = [r.getMessage() for r in caplog.records if "global batch" in r.getMessage()]
    assert lines == ["global batch 6 = 1 device x 3 per device x 2 accumulated"]
    hparams = yaml.safe_load((Path(run.logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["global_batch_size"] == 6


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_throughput_monitor_logs_samples_per_second_and_flops_per_batch(tmp_path):
    monitor = ThroughputMonitor(batch_size_fn=batch_samples, window_size=2)
    run = trainer(tmp_path, max_steps=3, log_every_n_steps=1, logger=CSVLogger(tmp_path, name="csv"),
                  callbacks=[monitor])
    module = build(use_leffa_loss=True, theta_timestep=1000, p_drop_ref=0.0)
    run.fit(module, train_dataloaders=batch_loader(3))
    metrics = (Path(run.logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/device/samples_per_sec" in metrics and "train/device/flops_per_sec" in metrics
    # forward and backward of one training batch: more than a forward, and twice a batch's half
    flops = module.flops_per_batch
    assert flops > 0
    half = training_flops(build(use_leffa_loss=True, theta_timestep=1000, p_drop_ref=0.0), make_batch(batch_size=1))
    assert flops == pytest.approx(2 * half, rel=0.05)
