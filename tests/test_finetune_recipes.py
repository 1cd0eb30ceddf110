"""configs/finetune_released*.yaml: resolve through the real CLI with only the environment variables
and --data.train_shards; a missing variable is one line; the recipe trains (tiny model swapped in)."""

from pathlib import Path

import pytest
import torch
import yaml
from released_files import export, released_file

from leffa.cli import cli_main
from leffa.testing import TINY_UNET, TINY_VAE

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = {"finetune_released.yaml": "LEFFA_RELEASED", "finetune_released_dc.yaml": "LEFFA_RELEASED_DC"}


@pytest.fixture
def released_env(monkeypatch):
    monkeypatch.setenv("LEFFA_SD15", "/models/sd15-inpainting")
    for name in RECIPES.values():
        monkeypatch.setenv(name, f"/models/{name}.pth")
    return monkeypatch


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_resolves_with_the_env_vars_and_train_shards(released_env, capsys, recipe):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(CONFIGS / recipe), "--data.train_shards", "my_shards", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    model, data, trainer = config["model"], config["data"], config["trainer"]
    assert model["init_from"] == f"/models/{RECIPES[recipe]}.pth"
    assert model["pretrained_model"] == "/models/sd15-inpainting"
    assert (model["conditioning"], model["trainable"], model["gradient_checkpointing"]) == ("released", "attention", True)
    assert model["lr_schedule"]["warmup_steps"] > 0
    assert (data["height"], data["width"], data["train_shards"]) == (1024, 768, "my_shards")
    assert data["global_batch_size"] > data["batch_size"] == 1  # the batch by accumulation
    assert trainer["devices"] == 1 and trainer["gradient_clip_val"] > 0 and 1000 <= trainer["max_steps"] <= 10000
    assert any(c["class_path"] == "leffa.ema.TrainableEMA" for c in trainer["callbacks"])


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_a_missing_env_var_is_one_line(released_env, capsys, recipe):
    released_env.delenv(RECIPES[recipe])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / recipe), "--data.train_shards", "my_shards", "--print_config"])
    assert RECIPES[recipe] in str(exit_info.value) and len(str(exit_info.value).splitlines()) == 1


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

