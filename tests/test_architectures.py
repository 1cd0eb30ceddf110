"""The architecture seam: LeffaModule talks to its denoiser only through ReferenceDenoiser."""

import pytest
import torch
from torch import nn

from leffa.architectures import ARCHITECTURES, LATENT_CHANNELS, DualUNet
from leffa.attention import ReferenceBank
from leffa.errors import UserError
from leffa.module import LeffaModule
from leffa.sampling import SamplingConfig, sample
from leffa.testing import make_batch
from leffa.unets import build_unet


class PlainUNet:
    """A second architecture, as small as one can be: one UNet that ignores the reference."""

    def __init__(self, pretrained_model, reference_pretrained_model, unet_config, in_channels, **_):
        self.unet = build_unet(pretrained_model, unet_config, in_channels)
        self.bank = ReferenceBank()
        self.encoded = 0

    def components(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    def encode_reference(self, ref_latent, timesteps):
        self.encoded += 1

    def denoise(self, noisy_latent, timesteps, conditioning):
        x = torch.cat([noisy_latent, conditioning.to(noisy_latent.dtype)], dim=1)
        return self.unet(x, timesteps, encoder_hidden_states=None).sample

    def shard(self, mesh, param_dtype):
        raise NotImplementedError


def test_a_second_architecture_plugs_in_through_the_registry(monkeypatch, tiny_configs):
    monkeypatch.setitem(ARCHITECTURES, "plain", PlainUNet)
    module = LeffaModule(**tiny_configs, architecture="plain")
    assert {name.split(".")[0] for name in module.state_dict()} == {"unet", "vae"}
    assert module.denoiser.unet.config.in_channels == LATENT_CHANNELS + 5  # try-on conditioning
    batch = make_batch()
    loss, metrics = module.compute_loss(batch, torch.Generator().manual_seed(0), train=True)
    loss.backward()
    assert torch.isfinite(loss) and module.denoiser.encoded == 1
    assert module.denoiser.unet.conv_in.weight.grad is not None
    images = sample(module, batch, SamplingConfig(num_steps=2, guidance_scale=1.0, reference_timestep=None,
                                                  repaint=False), torch.Generator().manual_seed(0))
    assert images.shape == batch["tgt"].shape and module.denoiser.encoded == 3  # once per step


def test_the_paper_architecture_keeps_its_checkpoint_names(tiny_configs):
    module = LeffaModule(**tiny_configs)
    assert isinstance(module.denoiser, DualUNet) and module.bank is module.denoiser.bank
    prefixes = {name.split(".")[0] for name in module.state_dict()}
    assert prefixes == {"generative_unet", "reference_unet", "vae"}
    assert module.generative_unet is module.denoiser.generative_unet


def test_unknown_architecture_is_one_line_naming_the_key(tiny_configs):
    with pytest.raises(UserError, match="model.architecture.*dual_unet"):
        LeffaModule(**tiny_configs, architecture="dual_transformer")
