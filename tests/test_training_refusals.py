"""Issue 20 ("a hostile probe"), the training side: settings that would be dropped or make no sense
are refused at start in one ``error:`` line (exit status 2) naming the key, an interrupted or
failing run says so, and the run's ``config.yaml`` is what the run used."""

from __future__ import annotations

import errno
import io
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from one_line_errors import error_line, refused
from tiny_runs import CONFIG, ROOT, fit_args

from leffa.cli import cli_main
from leffa.data.eval_split import batches_per_rank
from leffa.errors import UserError
from leffa.module import LeffaModule
from leffa.testing import make_batch

CONCAT_CONFIG = ROOT / "configs" / "concat" / "tiny_synthetic.yaml"

# checkpoints every 2 steps into one folder (last.ckpt only), no pictures: the runs stay short
CHECKPOINTS = """
trainer:
  limit_val_batches: 0
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: CKPTS, save_last: true, save_top_k: 0, every_n_train_steps: 2}
"""


def run_args(shards, root: Path, steps: int, *extra: str) -> list[str]:
    """``leffa fit`` of the tiny config for ``steps`` steps, its checkpoints in ``root/ck``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "checkpoints.yaml").write_text(CHECKPOINTS.replace("CKPTS", str(root / "ck")))
    args = fit_args(shards, root, steps=steps)
    return [*args[:3], "--config", str(root / "checkpoints.yaml"), *args[3:], "--trainer.limit_val_batches=0", *extra]




class Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def lora_run(shards, tmp_path_factory):
    """Two steps of the tiny config with LoRA (lambda_leffa 0.1); its last.ckpt and the info lines."""
    root = tmp_path_factory.mktemp("lora_run")
    messages, logger = Messages(), logging.getLogger("lightning.pytorch")
    logger.addHandler(messages)
    try:
        cli_main(run_args(shards, root, 2, "--model.trainable=lora"))
    finally:
        logger.removeHandler(messages)
    return root / "ck" / "last.ckpt", messages.lines


# ---------------------------------------------------------------- item 1: --ckpt_path and the config


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_resuming_with_other_model_settings_is_one_line_naming_each_key(lora_run, shards, tmp_path, capsys):
    last, _ = lora_run
    line = refused(capsys, run_args(shards, tmp_path, 3, f"--ckpt_path={last}", "--model.trainable=all",
                                    "--model.lambda_leffa=0.5"),
                   last, "model.trainable: lora in the checkpoint, all given",
                   "model.lambda_leffa: 0.1 in the checkpoint, 0.5 given", "model.init_from")
    assert "model.gradient_checkpointing" not in line  # only the keys that differ
    assert not (tmp_path / "ck").exists()  # nothing trained


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_resuming_a_checkpoint_of_another_architecture_is_refused(lora_run, shards, tmp_path, capsys):
    last, _ = lora_run
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["hyper_parameters"]["architecture"] = "concat_unet"  # its record of what it trained (an old form)
    torch.save(checkpoint, tmp_path / "concat.ckpt")
    refused(capsys, run_args(shards, tmp_path, 3, f"--ckpt_path={tmp_path / 'concat.ckpt'}",
                             "--model.trainable=lora"),
            "model.architecture.class_path: leffa.architectures.concat_unet.ConcatUNet in the checkpoint, "
            "leffa.architectures.dual_unet.DualUNet given")


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_resuming_uses_the_config_as_given_and_saves_it(lora_run, shards, tmp_path):
    last, _ = lora_run
    # gradient checkpointing changes memory, not the function: a resumed run may turn it on
    cli_main(run_args(shards, tmp_path, 3, f"--ckpt_path={last}", "--model.trainable=lora",
                      "--model.gradient_checkpointing=true"))
    resumed = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 3
    assert resumed["hyper_parameters"]["trainable"] == "lora"
    assert resumed["hyper_parameters"]["gradient_checkpointing"] is True
    (config,) = tmp_path.glob("tiny_synthetic/version_*/config.yaml")
    assert yaml.safe_load(config.read_text())["model"]["gradient_checkpointing"] is True


def test_which_settings_a_resume_compares(tiny_configs):
    module = LeffaModule(**tiny_configs, optimizer=None)
    own = dict(module.hparams)
    module.check_resume_settings(own, fitting=True)
    # local paths, the starting weights, memory for compute and sampling may change on resume
    module.check_resume_settings({**own, "pretrained_model": "/elsewhere", "init_from": "stage1.ckpt",
                                  "gradient_checkpointing": True, "sampling": {"num_steps": 3}}, fitting=True)
    # a setting the checkpoint does not record (it predates it), or a nested key one side lacks
    # (an optimizer argument of another torch version), is not compared
    older = {k: v for k, v in own.items() if k != "p_drop_ref"}
    older["unet_config"] = {k: v for k, v in own["unet_config"].items() if k != "norm_num_groups"}
    module.check_resume_settings(older, fitting=True)
    with pytest.raises(UserError, match=r"^--ckpt_path x.ckpt was written with other model settings: "
                                        r"model.unet_config.norm_num_groups: 4 in the checkpoint, \d+ given; "
                                        r"model.lr_schedule: \{\"warmup_steps\": 5\} in the checkpoint, null given; "
                                        r"resume"):
        module.check_resume_settings({**own, "lr_schedule": {"warmup_steps": 5},
                                      "unet_config": {**own["unet_config"], "norm_num_groups": 4}},
                                     fitting=True, source="--ckpt_path x.ckpt")
    # validate, test and predict compare what the weights are, not how they trained or sample
    module.check_resume_settings({**own, "lambda_leffa": 0.5, "learning_rate": 1.0}, fitting=False)
    with pytest.raises(UserError, match="model.conditioning: released in the checkpoint, tryon given; give the"):
        module.check_resume_settings({**own, "conditioning": "released"}, fitting=False)


# ---------------------------------------------------------------- item 2: the Leffa settings


@pytest.mark.parametrize("setting,value", [("lambda_leffa", -1.0), ("lambda_leffa", math.nan), ("tau", 0.0),
                                           ("tau", math.inf), ("theta_timestep", 0), ("theta_timestep", 1001),
                                           ("theta_resolution", 1.0), ("theta_resolution", -0.5)])
def test_impossible_leffa_settings_are_refused(tiny_configs, setting, value):
    with pytest.raises(UserError, match=rf"^model\.{setting} must be .*got {value}"):
        LeffaModule(**tiny_configs, use_leffa_loss=True, **{setting: value})


def test_an_impossible_leffa_setting_is_one_line_at_the_command_line(shards, tmp_path, capsys):
    refused(capsys, run_args(shards, tmp_path, 2, "--model.lambda_leffa=-1"), "model.lambda_leffa", "-1")


def test_no_leffa_layer_at_the_data_height_is_refused_at_start(shards, tmp_path, capsys):
    # the tiny UNet's finest token grid at height 64 is 8 rows: 8/64 is not above 0.2
    refused(capsys, run_args(shards, tmp_path, 2, "--model.theta_resolution=0.2"),
            "model.theta_resolution 0.2", "data.height 64")
    assert not (tmp_path / "ck").exists()


def test_the_start_names_the_leffa_layers_and_the_share_of_timesteps(lora_run):
    _, lines = lora_run
    (line,) = [line for line in lines if line.startswith("Leffa loss")]
    # at 64x48 the 8x6 and 4x3 token grids pass theta_resolution 1/32, the 2x2 grid does not
    for part in ("6 attention layers", "down_blocks.0.attentions.0 (8x6)", "up_blocks.2.attentions.1 (4x3)",
                 "t < 500 of 1000 (50%)"):
        assert part in line, line
    assert "2x2" not in line


@pytest.mark.parametrize("architecture,height,width", [("dual_unet", 64, 48), ("dual_unet", 72, 56),
                                                       ("concat_unet", 64, 48)])
def test_the_layers_named_at_start_are_those_training_captures(tiny_configs, architecture, height, width):
    conditioning = "tryon" if architecture == "concat_unet" else "released"
    module = LeffaModule(**tiny_configs, architecture=architecture, conditioning=conditioning, use_leffa_loss=True,
                         theta_timestep=1000, p_drop_ref=0.0)
    module.compute_loss(make_batch(height=height, width=width), torch.Generator().manual_seed(0), train=True)
    captured = {name: capture.grid for name, capture in module.bank.captures.items()}
    assert captured and module.leffa_layers(height, width) == captured


def test_a_concat_seam_inside_a_leffa_token_is_refused_before_training(tiny_configs):
    module = LeffaModule(**tiny_configs, architecture="concat_unet", conditioning="tryon", use_leffa_loss=True)
    with pytest.raises(UserError, match="ConcatUNet: .*data.width 40.*seam"):
        module.check_image_size(64, 40, "fit")
    module.check_image_size(64, 40, "predict")  # no Leffa layer in sampling: fine


# ---------------------------------------------------------------- item 3: image sizes


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_a_height_that_the_vae_cannot_halve_is_refused_at_start(shards, tmp_path, capsys):
    line = refused(capsys, run_args(shards, tmp_path, 2, "--data.height=60"), "data.height 60", "multiple of 8")
    assert "data.width" not in line
    assert not (tmp_path / "ck").exists()
    # and in leffa predict, where it crashed on a 56-vs-60 tensor
    refused(capsys, ["predict", "--config", str(CONFIG), "--trainer.logger=false",
                     f"--trainer.default_root_dir={tmp_path}", f"--data.predict_shards={shards}", "--data.height=60",
                     "--data.width=48", "--data.num_workers=0"], "data.height 60")


# ---------------------------------------------------------------- item 4: disk full during a save


class FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(shards, tmp_path, capsys,
                                                                                 monkeypatch):
    import leffa.atomic_checkpoint_io

    real, saves = leffa.atomic_checkpoint_io.write_atomically, []

    def second_save_fills_the_disk(path, write):
        saves.append(path)
        return real(path, write if len(saves) < 2 else lambda file: write(FullDisk(file, 4096)))

    monkeypatch.setattr(leffa.atomic_checkpoint_io, "write_atomically", second_save_fills_the_disk)
    last = tmp_path / "ck" / "last.ckpt"
    with pytest.raises(SystemExit) as error:
        cli_main(run_args(shards, tmp_path, 4))
    line = error_line(capsys, error)
    assert line == f"error: no space left saving {last}; the previous checkpoint is kept"
    assert len(saves) == 2
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no temporary left


# ---------------------------------------------------------------- item 5: SIGTERM


@pytest.mark.slow  # a subprocess start-up and a few training steps
def test_sigterm_during_fit_exits_143_naming_the_step_and_the_checkpoint(shards, tmp_path):
    leffa = Path(sys.executable).parent / "leffa"
    last = tmp_path / "ck" / "last.ckpt"
    process = subprocess.Popen([leffa, *run_args(shards, tmp_path, 100_000)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not last.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert last.exists(), "no checkpoint written"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    step = torch.load(last, weights_only=True)["global_step"]
    assert errors[0].startswith("error: stopped by SIGTERM at global step ")
    assert f"resume from step {step} with --ckpt_path {last}" in errors[0]


# ---------------------------------------------------------------- item 6: no readable shard


def test_shards_that_are_all_unreadable_are_refused_before_the_model_is_built(shards, tmp_path, capsys,
                                                                            monkeypatch):
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"train-{i:06d}.tar").write_bytes(b"not a tar file " * 100)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the shards were checked")

    monkeypatch.setattr("leffa.module.build_denoiser", no_model)  # the first step of building the model
    pattern = str(broken / "train-*.tar")
    refused(capsys, run_args(shards, tmp_path, 2, f"--data.train_shards={pattern}"),
            f"data.train_shards: nothing readable in {pattern}", "3 shards")


# ---------------------------------------------------------------- item 7: smaller ones


def test_eval_split_refusals_advise_what_helps():
    with pytest.raises(UserError) as empty:
        batches_per_rank(0, 1, 2, "val_shards")
    assert "no samples" in str(empty.value) and "val_batch_size" not in str(empty.value)
    with pytest.raises(UserError) as few:
        batches_per_rank(3, 4, 2, "val_shards")
    assert "at most 3 devices" in str(few.value) and "val_batch_size" not in str(few.value)
    with pytest.raises(UserError, match="val_batch_size of 2 or more"):
        batches_per_rank(5, 2, 1, "val_shards")
    assert batches_per_rank(5, 2, 2, "val_shards") == 2


def test_an_empty_validation_shard_is_one_line(shards, tmp_path, capsys):
    import tarfile

    with tarfile.open(tmp_path / "val-000000.tar", "w"):
        pass
    line = refused(capsys, [*run_args(shards, tmp_path, 2), f"--data.val_shards={tmp_path / 'val-000000.tar'}",
                            "--data.val_batch_size=2", "--trainer.limit_val_batches=1"], "data.val_shards")
    assert "val_batch_size" not in line


def test_an_unset_environment_variable_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LEFFA_TEST_UNSET", raising=False)
    (tmp_path / "needs.yaml").write_text("model:\n  pretrained_model: ${oc.env:LEFFA_TEST_UNSET}\n")
    refused(capsys, ["fit", "--config", str(tmp_path / "needs.yaml"), "--print_config"], "LEFFA_TEST_UNSET",
            "model.pretrained_model")


def test_a_mistyped_key_is_one_line_with_the_usage_under_help(capsys):
    with pytest.raises(SystemExit) as error:
        cli_main(["fit", "--config", str(CONFIG), "--model.lamda_leffa", "0.5"])
    assert error.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "lamda_leffa" in lines[0], lines
    assert "leffa fit --help" in lines[0]
    with pytest.raises(SystemExit) as help_exit:
        cli_main(["fit", "--help"])
    assert help_exit.value.code == 0 and "--model.lambda_leffa" in capsys.readouterr().out
