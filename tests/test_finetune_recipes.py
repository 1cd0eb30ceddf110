"""configs/finetune_released*.yaml: resolve through the real CLI with only the environment variables
and --data.train_shards; a missing variable is one line; the recipe trains (tiny model swapped in)."""

from pathlib import Path

import pytest
import torch
import yaml
from released_files import export, released_file

from leffa.cli import cli_main
from leffa.testing import TINY_SDXL_UNET, TINY_UNET, TINY_VAE

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# recipe -> (its released checkpoint's variable, its base model's variable)
RECIPES = {"finetune_released.yaml": ("LEFFA_RELEASED", "LEFFA_SD15"),
           "finetune_released_dc.yaml": ("LEFFA_RELEASED_DC", "LEFFA_SD15"),
           "finetune_released_pose.yaml": ("LEFFA_RELEASED_POSE", "LEFFA_SDXL")}


@pytest.fixture
def released_env(monkeypatch):
    for released, base in RECIPES.values():
        monkeypatch.setenv(released, f"/models/{released}.pth")
        monkeypatch.setenv(base, f"/models/{base}")
    return monkeypatch


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_resolves_with_the_env_vars_and_train_shards(released_env, capsys, recipe):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(CONFIGS / recipe), "--data.train_shards", "my_shards", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    model, data, trainer = config["model"], config["data"], config["trainer"]
    released, base = RECIPES[recipe]
    assert model["init_from"] == f"/models/{released}.pth"
    assert model["pretrained_model"] == f"/models/{base}"
    assert (model["conditioning"], model["cross_attention"]) == ("released", "passthrough")
    assert (model["conditioning"], model["trainable"], model["gradient_checkpointing"]) == ("released", "attention", True)
    assert model["lr_schedule"]["warmup_steps"] > 0
    assert (data["height"], data["width"], data["train_shards"]) == (1024, 768, "my_shards")
    assert data["global_batch_size"] > data["batch_size"] == 1  # the batch by accumulation
    assert trainer["devices"] == 1 and trainer["gradient_clip_val"] > 0 and 1000 <= trainer["max_steps"] <= 10000
    assert any(c["class_path"] == "leffa.ema.TrainableEMA" for c in trainer["callbacks"])


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_a_missing_env_var_is_one_line(released_env, capsys, recipe):
    for variable in RECIPES[recipe]:
        released_env.delenv(variable)
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", "--config", str(CONFIGS / recipe), "--data.train_shards", "my_shards", "--print_config"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and variable in lines[0]
        released_env.setenv(variable, "/models/x")


@pytest.mark.slow  # over 10 s on 2 cores: make test runs it, make test-fast does not
@pytest.mark.parametrize("trainable", ["attention", "lora"])
def test_the_recipe_trains_and_exports_back_to_the_released_layout(released_env, shards, tmp_path, trainable):
    """The recipe as written, with the tiny architecture and a tiny released .pth in place of SD1.5's."""
    base = tmp_path / "virtual_tryon.pth"
    released_file(base)  # conftest's tiny UNet and VAE
    for name, config in (("unet", TINY_UNET), ("vae", TINY_VAE)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v
                                                               for k, v in config.items()}))
    released_env.setenv("LEFFA_RELEASED", str(base))
    released_env.setenv("LEFFA_RUNS", str(tmp_path / "runs"))
    cli_main(["fit", "--config", str(CONFIGS / "finetune_released.yaml"), "--data.train_shards", str(shards),
              "--model.pretrained_model=null", f"--model.unet_config={tmp_path / 'unet.yaml'}",
              f"--model.vae_config={tmp_path / 'vae.yaml'}", f"--model.trainable={trainable}",
              "--data.height=64", "--data.width=48", "--data.global_batch_size=2", "--data.num_workers=0",
              "--data.shuffle_buffer=4", "--trainer.max_steps=2", "--model.lr_schedule.warmup_steps=1",
              "--trainer.accelerator=cpu"])
    ckpt = tmp_path / "runs" / "finetune_released" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["hyper_parameters"]["trainable"] == trainable
    out = export(ckpt, base, tmp_path / "mine.pth")
    assert out.keys() == torch.load(base, weights_only=True).keys()



@pytest.mark.slow  # over 10 s on 2 cores: make test runs it, make test-fast does not
def test_the_pose_recipe_fine_tunes_pose_transfer_on_an_sdxl_folder_and_exports_back(released_env, shards, tmp_path):
    """configs/finetune_released_pose.yaml as written, on a tiny SDXL-inpainting-layout folder and a
    tiny pose_transfer.pth, with the synthetic shards in place of DeepFashion's."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    sdxl = tmp_path / "sdxl-inpainting"
    UNet2DConditionModel(**{**TINY_SDXL_UNET, "in_channels": 9}).save_pretrained(sdxl / "unet")
    AutoencoderKL(**TINY_VAE, scaling_factor=0.13025).save_pretrained(sdxl / "vae")
    base = tmp_path / "pose_transfer.pth"
    released_file(base, unet=TINY_SDXL_UNET)
    released_env.setenv("LEFFA_SDXL", str(sdxl))
    released_env.setenv("LEFFA_RELEASED_POSE", str(base))
    released_env.setenv("LEFFA_RUNS", str(tmp_path / "runs"))
    cli_main(["fit", "--config", str(CONFIGS / "finetune_released_pose.yaml"), "--data.train_shards", str(shards),
              "--data.height=64", "--data.width=48", "--data.global_batch_size=2", "--data.num_workers=0",
              "--data.shuffle_buffer=4", "--trainer.max_steps=2", "--model.lr_schedule.warmup_steps=1",
              "--trainer.accelerator=cpu", "--trainer.precision=32-true",
              "--model.learning_rate=0.01"])  # steps that show in the released file's float16
    ckpt = tmp_path / "runs" / "finetune_released_pose" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["hyper_parameters"]["cross_attention"] == "passthrough"
    out = export(ckpt, base, tmp_path / "mine.pth", "--weights", "live")
    state = torch.load(base, weights_only=True)
    assert list(out) == list(state) and all(out[k].shape == state[k].shape for k in state)
    # only self-attention (and conv_in) trained: the rest is the base's, bit for bit
    trained = [k for k in state if not torch.equal(out[k], state[k])]
    assert trained and all(".attn1." in k or k == "unet.conv_in.weight" or k == "unet.conv_in.bias" for k in trained)
