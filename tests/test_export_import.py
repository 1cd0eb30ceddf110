"""Round trips: our export folder, and the released checkpoints' layout."""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from leffa.architectures import DualUNet
from leffa.export import export_folder, load_exported
from leffa.module import LeffaModule
from leffa.released import convert_released_state_dict, is_released_state_dict
from leffa.testing import TINY_UNET, TINY_VAE, make_batch


@pytest.mark.slow  # over 10 s on 2 cores: make test runs it, make test-fast does not
def test_export_folder_round_trip_with_registers(tiny_configs, tmp_path):
    torch.manual_seed(0)
    module = LeffaModule(**tiny_configs, conditioning="released",
                         architecture=dict(class_path="dual_unet", init_args=dict(num_registers=2))).eval()
    with torch.no_grad():  # make the registers differ from any fresh initialisation
        for name, p in module.named_parameters():
            if name.endswith("registers"):
                p.add_(1.0)
    out = export_folder(module, tmp_path / "export")
    assert (out / "unet" / "config.json").is_file() and (out / "scheduler" / "scheduler_config.json").is_file()
    # diffusers reads the Generative UNet back on its own
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert unet.config.in_channels == 12
    back = load_exported(out).eval()
    for key, value in module.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, msg=key)
    batch = make_batch()
    g = lambda: torch.Generator().manual_seed(0)
    with torch.no_grad():
        torch.testing.assert_close(module.compute_loss(batch, g(), train=False)[0],
                                   back.compute_loss(batch, g(), train=False)[0])


def released_layout(seed=0):
    """A state dict laid out as the released virtual_tryon.pth: stock UNets with cross-attention."""
    torch.manual_seed(seed)
    gen = UNet2DConditionModel(**{**TINY_UNET, "in_channels": 12})
    ref = UNet2DConditionModel(**TINY_UNET)
    vae = AutoencoderKL(**TINY_VAE)
    state = {}
    for prefix, model in (("unet.", gen), ("unet_encoder.", ref), ("vae.", vae)):
        state.update({prefix + k: v for k, v in model.state_dict().items()})
    return state


def test_released_checkpoint_imports_into_the_module(tiny_configs, tmp_path):
    state = released_layout()
    assert is_released_state_dict(state) and any("attn2" in k for k in state)
    path = tmp_path / "virtual_tryon.pth"
    torch.save(state, path)
    module = LeffaModule(**tiny_configs, conditioning="released", init_from=str(path))
    own = module.state_dict()
    converted = convert_released_state_dict(state, DualUNet.released_components)
    assert not any("attn2" in k for k in converted)
    assert set(converted) == set(own)
    for key, value in converted.items():
        torch.testing.assert_close(own[key], value, msg=key)
    torch.testing.assert_close(own["generative_unet.conv_in.weight"], state["unet.conv_in.weight"])
