"""model.vae_pretrained: a trained diffusers AutoencoderKL folder for the module's VAE, and its errors."""

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL

from leffa.errors import MissingFileError
from leffa.export import export_folder, load_exported
from leffa.module import LeffaModule
from leffa.testing import TINY_UNET, TINY_VAE

# another architecture than TINY_VAE, so that a VAE built from the config could not pass for the folder's
OTHER_VAE = {**TINY_VAE, "block_out_channels": (4, 4, 8, 8), "norm_num_groups": 2}


@pytest.fixture
def vae_folder(tmp_path):
    torch.manual_seed(3)
    vae = AutoencoderKL(**TINY_VAE, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "tiny_vae", safe_serialization=True)
    return tmp_path / "tiny_vae"


def test_missing_vae_folder_is_one_line_naming_what_to_put_where(tmp_path):
    with pytest.raises(MissingFileError) as error:
        LeffaModule(unet_config=dict(TINY_UNET), vae_pretrained=str(tmp_path / "nowhere"))
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "nowhere" / "config.json") in message and "diffusion_pytorch_model.safetensors" in message


def test_a_folder_without_safetensors_weights_is_refused(vae_folder):
    (vae_folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MissingFileError, match="safetensors"):
        LeffaModule(unet_config=dict(TINY_UNET), vae_pretrained=str(vae_folder))


def test_the_folder_takes_precedence_and_encodes_with_its_scaling_factor(vae_folder, one_thread):
    saved = AutoencoderKL.from_pretrained(vae_folder)
    module = LeffaModule(unet_config=dict(TINY_UNET), vae_config=OTHER_VAE, vae_pretrained=str(vae_folder))
    assert module.vae.config.scaling_factor == 0.5
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(module.vae.state_dict()[name], value, msg=name)
    image = torch.rand(2, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        expected = saved.encode(image).latent_dist.mode() * 0.5
    torch.testing.assert_close(module.encode(image), expected)
    assert not any(p.requires_grad for p in module.vae.parameters())


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_saved_settings_rebuild_the_module_and_an_export_carries_the_vae(vae_folder, tmp_path, one_thread):
    module = LeffaModule(unet_config=dict(TINY_UNET), vae_pretrained=str(vae_folder)).eval()
    # the hyper-parameters a Lightning checkpoint holds rebuild the module with the folder's VAE
    rebuilt = LeffaModule(**{k: v for k, v in module.hparams.items() if not k.startswith("_")})
    assert rebuilt.vae.config.scaling_factor == 0.5
    torch.testing.assert_close(rebuilt.vae.state_dict(), module.vae.state_dict())
    # an export holds the VAE itself, not the path of the folder it came from
    out = export_folder(module, tmp_path / "export")
    assert "vae_pretrained" not in json.loads((out / "leffa.json").read_text())
    shutil.rmtree(vae_folder)
    back = load_exported(out)
    assert back.vae.config.scaling_factor == 0.5
    for name, value in module.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value, msg=name)
