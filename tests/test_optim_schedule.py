"""model.optimizer and model.lr_schedule from YAML through the real CLI: warmup then constant or
cosine, stepped per optimizer step; 8-bit AdamW refused off the GPU with one line."""

import math

import pytest
import torch
import yaml
from tiny_runs import CONFIG, fit_args

from leffa.cli import cli_main
from leffa.errors import UserError
from leffa.module import LeffaModule
from leffa.optimizers import AdamW8bit
from leffa.schedules import LRSchedule, WarmupThen, build_scheduler

SCHEDULE = """
model:
  optimizer:
    class_path: torch.optim.AdamW
    init_args: {lr: 2.0e-4, weight_decay: 0.0}
  lr_schedule: {warmup_steps: 4, decay: DECAY, total_steps: 8}
trainer:
  callbacks:
    - class_path: leffa.ema.TrainableEMA
      init_args: {decay: 0.9}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: CKPTS, save_last: true, every_n_train_steps: 1}
"""


def schedule_config(folder, decay):
    path = folder / "schedule.yaml"
    path.write_text(SCHEDULE.replace("DECAY", decay).replace("CKPTS", str(folder / "ck")))
    return path


def test_the_schedule_factor_warms_up_then_stays_or_follows_a_cosine():
    constant, cosine = WarmupThen(4, "constant", 0.0, 0), WarmupThen(4, "cosine", 0.1, 14)
    assert [constant(s) for s in (0, 1, 2, 4, 100)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert cosine(4) == 1.0 and cosine(14) == pytest.approx(0.1) and cosine(9) == pytest.approx(0.55)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(UserError, match="cosine needs"):
        build_scheduler(optimizer, LRSchedule(decay="cosine"), None)
    with pytest.raises(UserError, match="model.lr_schedule.decay: unknown 'linear'"):
        LRSchedule(decay="linear").check()


def test_print_config_shows_the_optimizer_and_schedule(tmp_path, capsys):
    extra = schedule_config(tmp_path, "cosine")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(CONFIG), "--config", str(extra), "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert model["optimizer"]["init_args"]["lr"] == 2.0e-4
    assert model["lr_schedule"] == {"warmup_steps": 4, "decay": "cosine", "min_lr_ratio": 0.0, "total_steps": 8}


@pytest.mark.parametrize("decay,steps,lr", [("constant", 2, 1.0e-4), ("constant", 5, 2.0e-4),
                                            ("cosine", 6, 2.0e-4 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))])
@pytest.mark.slow  # over 10 s on 2 cores: make test runs it, make test-fast does not
def test_lr_after_warmup_steps_from_yaml(shards, tmp_path, decay, steps, lr):
    args = fit_args(shards, tmp_path, steps=steps)
    cli_main([*args[:3], "--config", str(schedule_config(tmp_path, decay)), *args[3:], "--trainer.limit_val_batches=0"])
    checkpoint = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == steps
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(lr)
    assert checkpoint["hyper_parameters"]["optimizer"]["class_path"] == "torch.optim.AdamW"
    # predict/export rebuild the module from the checkpoint's settings (the optimizer left out)
    assert LeffaModule.from_checkpoint(tmp_path / "ck" / "last.ckpt").lr_schedule.decay == decay


def test_adamw_8bit_is_one_clear_error_off_the_gpu():
    with pytest.raises(UserError, match="8-bit AdamW \\(bitsandbytes\\) runs on CUDA GPUs only"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(2))], lr=1e-5)


@pytest.mark.slow  # over 10 s on 2 cores: make test runs it, make test-fast does not
def test_resuming_reads_the_optimizer_back_from_the_checkpoint_and_goes_on_with_the_schedule(shards, tmp_path):
    config = schedule_config(tmp_path, "constant")
    args = [*fit_args(shards, tmp_path, steps=2)[:3], "--config", str(config), *fit_args(shards, tmp_path, 2)[3:],
            "--trainer.limit_val_batches=0"]
    cli_main(args)
    last = tmp_path / "ck" / "last.ckpt"
    assert torch.load(last, weights_only=True)["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    cli_main([*args, "--trainer.max_steps=3", "--ckpt_path", str(last)])
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 3
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1.5e-4)  # 3 of 4 warmup
