"""Building from a local SD1.5-style folder (never a hub), and its errors."""

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from leffa.module import LeffaModule
from leffa.pretrained import SD15_SCHEDULER, component_location
from leffa.testing import TINY_UNET, TINY_VAE


@pytest.fixture
def sd_folder(tmp_path):
    """A diffusers pipeline folder (unet/, vae/, scheduler/) of an inpainting-style 9-channel UNet."""
    torch.manual_seed(0)
    UNet2DConditionModel(**TINY_UNET, in_channels=9).save_pretrained(tmp_path / "unet")
    AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path / "vae")
    DDPMScheduler(**{**SD15_SCHEDULER, "num_train_timesteps": 900}).save_pretrained(tmp_path / "scheduler")
    return tmp_path


def test_module_from_a_local_inpainting_folder(sd_folder):
    source = UNet2DConditionModel.from_pretrained(sd_folder / "unet")
    module = LeffaModule(pretrained_model=str(sd_folder), conditioning="released")
    # generative: the 9 pretrained channels are kept, the 3 DensePose channels start at zero
    gen_w = module.generative_unet.conv_in.weight
    assert gen_w.shape[1] == 12
    torch.testing.assert_close(gen_w[:, :9], source.conv_in.weight)
    assert gen_w[:, 9:].abs().sum() == 0
    # reference: the noisy-latent channels of the inpainting UNet
    torch.testing.assert_close(module.reference_unet.conv_in.weight, source.conv_in.weight[:, :4])
    # everything else is the pretrained UNet, less its cross-attention projections (norm2 stays:
    # model.cross_attention passthrough, the default)
    own = module.generative_unet.state_dict()
    assert any("transformer_blocks" in name and ".norm2." in name for name in own)
    for name, value in source.state_dict().items():
        if "attn2" in name:
            assert name not in own
        elif not name.startswith("conv_in"):
            torch.testing.assert_close(own[name], value)
    # the folder's own scheduler is used
    assert module.scheduler.config.num_train_timesteps == 900


def test_missing_folder_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"unet/config.json"):
        LeffaModule(pretrained_model=str(tmp_path / "nowhere"))


def test_component_location_accepts_a_component_folder(sd_folder):
    assert component_location(sd_folder, "unet") == (sd_folder, "unet")
    assert component_location(sd_folder / "vae", "vae") == (sd_folder / "vae", None)


def test_neither_folder_nor_config_is_a_clear_error():
    with pytest.raises(ValueError, match="unet_config"):
        LeffaModule()


def test_component_configs_from_files_are_stored_as_mappings(tmp_path):
    import json

    import yaml

    from leffa.testing import TINY_UNET

    (tmp_path / "unet.json").write_text(json.dumps(TINY_UNET))
    (tmp_path / "vae.yaml").write_text(yaml.safe_dump(TINY_VAE))
    module = LeffaModule(unet_config=str(tmp_path / "unet.json"), vae_config=tmp_path / "vae.yaml")
    # JSON/YAML give lists where the Python configs have tuples
    assert module.hparams.unet_config == json.loads(json.dumps(TINY_UNET))
    assert module.hparams.vae_config == json.loads(json.dumps(TINY_VAE))
    with pytest.raises(FileNotFoundError, match="nothere.yaml"):
        LeffaModule(unet_config=str(tmp_path / "nothere.yaml"), vae_config=TINY_VAE)
