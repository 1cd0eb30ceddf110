"""The authors' released models, imported, compute what the authors' code computes.

The reference here is written from the released code's semantics (franciszzj/Leffa: ``leffa/model.py``,
``leffa/pipeline.py``, ``leffa/diffusion_model/attention_gen.py``), on stock diffusers UNets that
hold every tensor of the released file, text cross-attention and SDXL's added embedding included:

- every ``attn2`` gets a processor that returns its input, and the transformer block still adds
  that to its residual (so each block adds ``norm2(h)``);
- ``addition_embed_type`` is set to None on the UNets' configs (the added embedding stays, unused);
- the Reference UNet's self-attention layers hand their inputs over in call order, and each
  Generative UNet self-attention layer attends with all of ``[own ; reference]`` tokens as queries
  and keys, the first ``n`` outputs kept;
- the pipeline: masked image ``src * (mask < 0.5)``, posterior samples of it and of the reference,
  nearest resize of mask and DensePose, zero reference for the unconditional half, guidance then
  ``rescale_noise_cfg`` with the guidance scale as the rescale factor, DDPM steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from released_files import export, released_file, save_ckpt

from leffa.errors import UserError
from leffa.module import LeffaModule
from leffa.pretrained import SD15_SCHEDULER
from leffa.sampling import SamplingConfig, key_generators
from leffa.testing import TINY_SDXL_UNET, TINY_UNET, TINY_VAE, make_batch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BACKBONES = {"sd15": TINY_UNET, "sdxl": TINY_SDXL_UNET}
SDXL_VAE_SCALE = 0.13025


# ---------------------------------------------------------------- the released code's forward


def plain_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the tokens of ``x`` (B, n, C), then the output projection."""
    b, n, _ = x.shape
    q, k, v = (proj(x).view(b, n, attn.heads, -1).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v))
    weights = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, -1)
    return attn.to_out[1](attn.to_out[0](out))


class ReturnsInput:
    """The released code's processor for ``attn2``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        return hidden_states


class RecordsInOrder:
    """Reference UNet ``attn1``: hands its input to the list (in call order), plain self-attention."""

    def __init__(self, features: list):
        self.features = features

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        self.features.append(hidden_states)
        return plain_attention(attn, hidden_states)


class ConcatenatesInOrder:
    """Generative UNet ``attn1``: the next reference feature concatenated to the tokens, attention
    over all of them, the first n kept."""

    def __init__(self, features: list):
        self.features, self.used = features, 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        reference = self.features[self.used]
        self.used += 1
        both = torch.cat([hidden_states, reference], dim=1)
        return plain_attention(attn, both)[:, : hidden_states.shape[1]]


class ReleasedModel:
    """Both UNets of a released file as the released code builds and runs them."""

    def __init__(self, state: dict, unet_config: dict, attn2=ReturnsInput):
        self.unets = {}
        for prefix, in_channels in (("unet.", 12), ("unet_encoder.", 4)):
            unet = UNet2DConditionModel(**{**unet_config, "in_channels": in_channels})
            unet.load_state_dict({k.removeprefix(prefix): v.float() for k, v in state.items()
                                  if k.startswith(prefix)}, strict=True)
            unet.config.addition_embed_type = None  # as build_models does: an attribute of the config
            self.unets[prefix] = unet.eval()
        self.attn2 = attn2

    def __call__(self, latent_input: torch.Tensor, t: torch.Tensor, ref_latent: torch.Tensor,
                 t_ref: torch.Tensor | None = None) -> torch.Tensor:
        """Epsilon of the Generative UNet at ``t`` over the Reference UNet's features at ``t_ref``
        (default ``t``; the pipeline's ref_acceleration computes them once at the middle timestep)."""
        features = []
        concat = ConcatenatesInOrder(features)
        for prefix, processor in (("unet_encoder.", RecordsInOrder(features)), ("unet.", concat)):
            unet = self.unets[prefix]
            unet.set_attn_processor({name: processor if name.endswith("attn1.processor") else self.attn2()
                                     for name in unet.attn_processors})
        with torch.no_grad():
            self.unets["unet_encoder."](ref_latent, t if t_ref is None else t_ref, encoder_hidden_states=None)
            eps = self.unets["unet."](latent_input, t, encoder_hidden_states=None).sample
        assert len(features) == concat.used  # every reference feature read once, in order
        return eps


class ContributesNothing:
    """``attn2`` adding zero: the block then computes what deleting ``attn2``/``norm2`` computes."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        return torch.zeros_like(hidden_states)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(params=list(BACKBONES))
def released(request, tmp_path):
    """(backbone name, UNet config, released-layout file, its state dict): fp16, as released."""
    config = BACKBONES[request.param]
    path = tmp_path / f"{request.param}_released.pth"
    return request.param, config, path, released_file(path, unet=config)


def cfg_inputs(seed: int = 1, b: int = 2, h: int = 8, w: int = 6):
    """A classifier-free-guidance batch of the released input: (2b, 12, h, w) and (2b, 4, h, w)
    reference latents, the unconditional half's reference zero."""
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(b, 4, h, w, generator=g)
    mask = (torch.rand(b, 1, h, w, generator=g) > 0.5).float()
    masked, densepose, ref = (torch.randn(b, c, h, w, generator=g) for c in (4, 3, 4))
    conditioning = torch.cat([mask, masked, densepose], dim=1)
    return (torch.cat([noisy, noisy]), torch.cat([conditioning, conditioning]),
            torch.cat([torch.zeros_like(ref), ref]))


# ---------------------------------------------------------------- the forward


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_imported_released_checkpoint_gives_the_released_epsilon(released, tiny_configs):
    backbone, config, path, state = released
    module = LeffaModule(unet_config=config, vae_config=tiny_configs["vae_config"], conditioning="released",
                         init_from=str(path)).eval()
    reference = ReleasedModel(state, config)
    noisy, conditioning, ref_latent = cfg_inputs()
    for t in (981, 481, 1):
        timesteps = torch.full((noisy.shape[0],), t)
        with torch.no_grad():
            ours = module(noisy, timesteps, conditioning, ref_latent)
        expected = reference(torch.cat([noisy, conditioning], dim=1), timesteps, ref_latent)
        assert relative_error(ours, expected) < 1e-5, (backbone, t)
    # the test can see the difference that model.cross_attention makes: the released function
    # without norm2(h) added is far from it
    without = ReleasedModel(state, config, attn2=ContributesNothing)
    assert relative_error(without(torch.cat([noisy, conditioning], dim=1), timesteps, ref_latent), expected) > 0.05


def test_a_released_checkpoint_refuses_a_module_with_removed_cross_attention(released, tiny_configs):
    _, config, path, _ = released
    with pytest.raises(UserError, match="cross_attention: passthrough") as error:
        LeffaModule(unet_config=config, vae_config=tiny_configs["vae_config"], conditioning="released",
                    cross_attention="removed", init_from=str(path))
    assert len(str(error.value).splitlines()) == 1


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_checkpoints_record_their_cross_attention_and_refuse_the_other(tiny_configs, tmp_path):
    removed = LeffaModule(**tiny_configs, conditioning="released", cross_attention="removed")
    ckpt = save_ckpt(removed, tmp_path / "removed.ckpt")
    assert LeffaModule.from_checkpoint(ckpt).hparams.cross_attention == "removed"
    with pytest.raises(UserError, match="written with model.cross_attention: removed.*set model.cross_attention"):
        LeffaModule(**tiny_configs, conditioning="released", init_from=str(ckpt))
    # a checkpoint from before the setting existed (no such hyper-parameter) had its text
    # cross-attention removed
    old = torch.load(ckpt, weights_only=True)
    del old["hyper_parameters"]["cross_attention"]
    torch.save(old, tmp_path / "old.ckpt")
    assert LeffaModule.from_checkpoint(tmp_path / "old.ckpt").hparams.cross_attention == "removed"
    # resuming through the Trainer (on_load_checkpoint): the same line
    with pytest.raises(UserError, match="--ckpt_path was written with model.cross_attention: removed"):
        LeffaModule(**tiny_configs, conditioning="released").on_load_checkpoint(old)


# ---------------------------------------------------------------- SDXL folders


@pytest.fixture
def sdxl_folder(tmp_path):
    """A tiny SDXL-inpainting-layout diffusers folder: UNet, VAE with SDXL's latent scale, and the
    scheduler config SDXL ships (Euler, scaled-linear betas)."""
    root = tmp_path / "sdxl-inpainting"
    torch.manual_seed(0)
    UNet2DConditionModel(**{**TINY_SDXL_UNET, "in_channels": 9}).save_pretrained(root / "unet")
    AutoencoderKL(**TINY_VAE, scaling_factor=SDXL_VAE_SCALE).save_pretrained(root / "vae")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                           timestep_spacing="leading").save_pretrained(root / "scheduler")
    return root


def test_an_sdxl_folder_builds_as_the_released_code_builds_it(sdxl_folder):
    module = LeffaModule(pretrained_model=str(sdxl_folder), conditioning="released", use_leffa_loss=True,
                         theta_timestep=1000, p_drop_ref=0.0)
    for unet in (module.generative_unet, module.reference_unet):
        assert unet.config.addition_embed_type is None and not hasattr(unet, "add_embedding")
    assert module.generative_unet.conv_in.in_channels == 12 and module.reference_unet.conv_in.in_channels == 4
    # the scheduler rescaled to zero terminal SNR, as the released code loads it for SDXL
    assert module.scheduler.config.rescale_betas_zero_snr and module.scheduler.alphas_cumprod[-1] < 1e-6
    reference = DDPMScheduler.from_pretrained(sdxl_folder, subfolder="scheduler", rescale_betas_zero_snr=True)
    torch.testing.assert_close(module.scheduler.alphas_cumprod, reference.alphas_cumprod)
    assert module.vae.config.scaling_factor == SDXL_VAE_SCALE
    # the Leffa layers: SDXL's first level has no attention; at 64x48 the second level's 4x3 grid
    # (4/64 > 1/32) takes part, with its two transformer layers per block
    batch = make_batch(height=64, width=48)
    loss, metrics = module.compute_loss(batch, torch.Generator().manual_seed(0), train=False)
    layers = list(module.bank.captures)
    assert layers and all(c.grid == (4, 3) for c in module.bank.captures.values())
    assert not any(name.startswith("down_blocks.0.") for name in layers)
    assert any("transformer_blocks.1." in name for name in layers)
    assert torch.isfinite(loss) and metrics["leffa_layers"] == len(layers)
    loss.backward()
    frozen_no_grad = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not frozen_no_grad


def test_concat_unet_builds_on_an_sdxl_folder(sdxl_folder):
    module = LeffaModule(pretrained_model=str(sdxl_folder), architecture="concat_unet", conditioning="tryon",
                         trainable="attention", use_leffa_loss=True, theta_timestep=1000)
    assert module.unet.config.addition_embed_type is None and module.unet.conv_in.in_channels == 9
    loss, _ = module.compute_loss(make_batch(height=64, width=48), torch.Generator().manual_seed(0), train=False)
    assert torch.isfinite(loss) and module.bank.captures


def test_pose_transfer_imports_onto_an_sdxl_folder_and_exports_back(sdxl_folder, tmp_path):
    base = tmp_path / "pose_transfer.pth"
    state = released_file(base, unet=TINY_SDXL_UNET)
    assert any(".add_embedding." in k for k in state)
    module = LeffaModule(pretrained_model=str(sdxl_folder), conditioning="released", init_from=str(base))
    attn1 = "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k.weight"
    norm2 = "down_blocks.1.attentions.0.transformer_blocks.1.norm2.weight"
    with torch.no_grad():
        module.generative_unet.get_parameter(attn1).mul_(-1)
        module.reference_unet.get_parameter(norm2).add_(0.25)
    out = export(save_ckpt(module, tmp_path / "last.ckpt"), base, tmp_path / "mine.pth")
    assert list(out) == list(state)
    changed = {f"unet.{attn1}", f"unet_encoder.{norm2}"}
    for key, value in state.items():
        assert out[key].shape == value.shape and out[key].dtype == value.dtype, key
        assert torch.equal(out[key], value) != (key in changed), key
    # unused by the released code, and so the base's: the projections of attn2, the added embedding
    assert all(torch.equal(out[k], state[k]) for k in state if ".attn2." in k or ".add_embedding." in k)


def test_weights_of_one_base_onto_the_other_are_one_line_naming_both(sdxl_folder, tmp_path):
    sd15 = tmp_path / "virtual_tryon.pth"
    released_file(sd15)
    with pytest.raises(UserError) as error:
        LeffaModule(pretrained_model=str(sdxl_folder), conditioning="released", init_from=str(sd15))
    message = str(error.value)
    assert len(message.splitlines()) == 1 and str(sd15) in message and str(sdxl_folder) in message
    # and the reverse: SDXL weights onto an SD1.5 base (an inline config here)
    sdxl = tmp_path / "pose_transfer.pth"
    released_file(sdxl, unet=TINY_SDXL_UNET)
    with pytest.raises(UserError) as error:
        LeffaModule(unet_config=TINY_UNET, vae_config=TINY_VAE, conditioning="released", init_from=str(sdxl))
    message = str(error.value)
    assert len(message.splitlines()) == 1 and str(sdxl) in message and "model.unet_config" in message


# ---------------------------------------------------------------- sampling as the released pipeline


def released_sampling(model: ReleasedModel, vae, scheduler, batch, generators, num_steps, guidance_scale,
                      ref_acceleration=False) -> torch.Tensor:
    """``LeffaPipeline.__call__`` with do_classifier_free_guidance, its random draws taken from
    ``generators`` (one per sample): posterior of the masked image, of the reference, the initial
    noise, then the scheduler's steps. Returns images in [0, 1]."""
    scale = vae.config.scaling_factor

    def posterior_sample(image):
        dist = vae.encode(image).latent_dist
        noise = torch.cat([torch.randn((1, *dist.mean.shape[1:]), generator=g) for g in generators])
        return (dist.mean + dist.std * noise) * scale

    with torch.no_grad():
        src, mask = batch["tgt"], batch["mask"]
        masked_latent = posterior_sample(src * (mask < 0.5))
        ref_latent = posterior_sample(batch["ref"])
        hw = masked_latent.shape[-2:]
        mask_latent = F.interpolate(mask, size=hw, mode="nearest")
        densepose_latent = F.interpolate(batch["densepose"], size=hw, mode="nearest")
        latent = torch.cat([torch.randn((1, *masked_latent.shape[1:]), generator=g) for g in generators])
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps
        latent = latent * scheduler.init_noise_sigma
        masked_latent, mask_latent, densepose_latent = (torch.cat([x] * 2) for x in
                                                        (masked_latent, mask_latent, densepose_latent))
        ref_latent = torch.cat([torch.zeros_like(ref_latent), ref_latent])
        for t in timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latent] * 2), t)
            model_input = torch.cat([model_input, mask_latent, masked_latent, densepose_latent], dim=1)
            t_ref = timesteps[num_steps // 2].expand(model_input.shape[0]) if ref_acceleration else None
            eps = model(model_input, t.expand(model_input.shape[0]), ref_latent, t_ref)
            uncond, cond = eps.chunk(2)
            guided = uncond + guidance_scale * (cond - uncond)
            # rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale=guidance_scale)
            std_cond = cond.std(dim=list(range(1, cond.ndim)), keepdim=True)
            std_guided = guided.std(dim=list(range(1, guided.ndim)), keepdim=True)
            guided = guidance_scale * (guided * std_cond / std_guided) + (1 - guidance_scale) * guided
            latent = scheduler.step(guided, t, latent, generator=generators).prev_sample
        image = vae.decode(latent / scale).sample
    return (image / 2 + 0.5).clamp(0, 1)


def predict_released_sampling() -> SamplingConfig:
    """model.sampling of configs/predict_released.yaml."""
    return SamplingConfig(**yaml.safe_load((CONFIGS / "predict_released.yaml").read_text())["model"]["sampling"])


def test_predict_released_config_has_the_released_pipeline_settings():
    config = yaml.safe_load((CONFIGS / "predict_released.yaml").read_text())
    assert (config["model"]["conditioning"], config["model"]["cross_attention"]) == ("released", "passthrough")
    sampling = predict_released_sampling()
    assert (sampling.scheduler, sampling.num_steps, sampling.guidance_scale, sampling.guidance_rescale,
            sampling.reference_timestep, sampling.repaint) == ("ddpm", 50, 2.5, 2.5, None, False)


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
@pytest.mark.parametrize("ref_acceleration", [False, True])
def test_predict_released_samples_the_released_pipelines_image(released, tiny_configs, ref_acceleration):
    backbone, config, path, state = released
    vae_config = {**tiny_configs["vae_config"], **({"scaling_factor": SDXL_VAE_SCALE} if backbone == "sdxl" else {})}
    module = LeffaModule(unet_config=config, vae_config=vae_config, conditioning="released",
                         init_from=str(path)).eval()
    module.sampling = predict_released_sampling()
    module.sampling.num_steps = 12  # the released default is 50; 12 keep the test short
    if ref_acceleration:
        module.sampling.reference_timestep = "middle"
    batch = make_batch(height=64, width=48)
    ours = module.predict_step(batch, 0)["image"]

    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict({k.removeprefix("vae."): v.float() for k, v in state.items() if k.startswith("vae.")})
    # the released code: DDPMScheduler from the base's scheduler config, zero terminal SNR for SDXL
    scheduler = DDPMScheduler(**SD15_SCHEDULER, rescale_betas_zero_snr=backbone == "sdxl")
    expected = released_sampling(ReleasedModel(state, config), vae.eval(), scheduler, batch,
                                 key_generators(batch["key"], module.sampling.seed), 12, 2.5, ref_acceleration)
    torch.testing.assert_close(ours / 2 + 0.5, expected, atol=1e-5, rtol=1e-4)
    assert ours.std() > 0.01  # an image, not a constant


def test_a_removed_cross_attention_model_is_not_exported_to_the_released_layout(tiny_configs, tmp_path, capsys):
    base = tmp_path / "virtual_tryon.pth"
    released_file(base)
    module = LeffaModule(**tiny_configs, conditioning="released", cross_attention="removed")
    with pytest.raises(SystemExit):
        export(save_ckpt(module, tmp_path / "last.ckpt"), base, tmp_path / "mine.pth")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cross_attention: removed" in lines[0] and not (tmp_path / "mine.pth").exists()


@pytest.mark.slow  # over 10 s on 2 cores: make test runs it, make test-fast does not
def test_leffa_predict_samples_pose_transfer_on_an_sdxl_folder(sdxl_folder, shards, tmp_path):
    from PIL import Image

    from leffa.cli import cli_main

    base = tmp_path / "pose_transfer.pth"
    released_file(base, unet=TINY_SDXL_UNET)
    out = tmp_path / "out"
    cli_main(["predict", "--config", str(CONFIGS / "predict_released.yaml"),
              f"--model.pretrained_model={sdxl_folder}", f"--model.init_from={base}",
              "--model.sampling.num_steps=2", "--model.sampling.reference_timestep=middle",
              f"--trainer.callbacks.output_dir={out}", "--trainer.accelerator=cpu", "--trainer.devices=1",
              "--trainer.strategy=auto", "--trainer.precision=32-true", f"--trainer.default_root_dir={tmp_path}",
              f"--data.predict_shards={shards}", "--data.height=64", "--data.width=48", "--data.num_workers=0"])
    images = sorted(out.glob("*.png"))
    assert len(images) == 8 and Image.open(images[0]).size == (48, 64)
