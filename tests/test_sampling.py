"""Sampling: determinism, guidance scale 1, reference acceleration, repaint, grids."""

import pytest
import torch

from leffa.module import LeffaModule
from leffa.sampling import SamplingConfig, make_scheduler, sample
from leffa.testing import make_batch
from leffa.pictures import sample_grid


@pytest.fixture
def module(tiny_configs):
    torch.manual_seed(0)
    return LeffaModule(**tiny_configs, conditioning="released").eval()


def run(module, batch, seed=0, **kwargs):
    config = SamplingConfig(**{"num_steps": 3, "reference_timestep": None, "repaint": False, **kwargs})
    return sample(module, batch, config, torch.Generator().manual_seed(seed))


def test_sampling_is_deterministic_with_a_seed_and_varies_without(module):
    batch = make_batch()
    a, b, c = run(module, batch, 0), run(module, batch, 0), run(module, batch, 1)
    assert a.shape == batch["tgt"].shape and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_guidance_scale_one_is_the_conditional_path_only(module):
    batch = make_batch()
    guided_one = run(module, batch, guidance_scale=1.0)
    # the conditional path by hand: no zero-reference branch at all
    scheduler = make_scheduler("ddim", module.scheduler)
    scheduler.set_timesteps(3)
    generator = torch.Generator().manual_seed(0)  # the released layout's posterior samples, then the noise
    ref_latent, cond = module.encode_inputs(batch, generator)
    x = torch.randn(ref_latent.shape, generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            module(x, t.expand(2), cond, ref_latent)
            x = scheduler.step(module.denoise(x, t.expand(2), cond), t, x).prev_sample
        by_hand = module.vae.decode(x / module.vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(guided_one, by_hand, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(guided_one, run(module, batch, guidance_scale=2.5), atol=1e-4)


def test_reference_acceleration_equals_recomputing_when_features_do_not_depend_on_t(module):
    # zero the Reference UNet's time embedding: its features are then the same at every timestep
    for p in module.reference_unet.time_embedding.parameters():
        torch.nn.init.zeros_(p)
    batch = make_batch()
    once = run(module, batch, reference_timestep=500)
    every_step = run(module, batch, reference_timestep=None)
    torch.testing.assert_close(once, every_step, atol=1e-5, rtol=1e-5)


def test_repaint_keeps_the_unmasked_person(module):
    batch = make_batch()
    out = run(module, batch, repaint=True)
    keep = batch["mask"].expand_as(out) == 0
    torch.testing.assert_close(out[keep], batch["tgt"][keep])


def test_unknown_scheduler_lists_valid_ones(module):
    with pytest.raises(ValueError, match="ddim"):
        make_scheduler("magic", module.scheduler)


def test_sample_grid_layout():
    batch = make_batch(batch_size=3, height=32, width=24)
    grid = sample_grid(batch, batch["tgt"])
    # 3 rows of 5 tiles with 2-pixel padding
    assert grid.shape == (3, 3 * 32 + 4 * 2, 5 * 24 + 6 * 2)
    assert 0 <= grid.min() and grid.max() <= 1


def test_guidance_rescale_matches_the_papers_formula():
    from leffa.sampling import rescale_noise_cfg

    g = torch.Generator().manual_seed(0)
    guided, cond = torch.randn(2, 4, 5, 5, generator=g) * 3, torch.randn(2, 4, 5, 5, generator=g)
    full = rescale_noise_cfg(guided, cond, 1.0)
    for i in range(2):  # rescale 1: the guided prediction with the conditional one's std
        torch.testing.assert_close(full[i].std(), cond[i].std())
    torch.testing.assert_close(rescale_noise_cfg(guided, cond, 0.0), guided)


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "euler_a", "dpm++", "unipc"])
def test_per_sample_generators_give_each_sample_the_same_image_in_any_batch(module, scheduler):
    from leffa.sampling import key_generators

    batch = make_batch(batch_size=3)
    keys = ["a", "b", "c"]

    def generate(indices):
        part = {k: v[indices] for k, v in batch.items() if k != "key"}
        config = SamplingConfig(scheduler, num_steps=2, guidance_scale=2.0, reference_timestep=None, repaint=False)
        return sample(module, part, config, key_generators([keys[i] for i in indices], seed=7))

    together = generate([0, 1, 2])
    reordered = generate([2, 0, 1])
    for i in range(3):
        alone = generate([i])[0]
        torch.testing.assert_close(together[i], alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reordered[[1, 2, 0][i]], alone, atol=1e-5, rtol=1e-5)


def test_key_generators_depend_on_the_key_and_the_seed():
    from leffa.sampling import key_generators

    draw = lambda keys, seed: [torch.randn(4, generator=g) for g in key_generators(keys, seed)]
    (a0,), (a0_again,), (b0,), (a1,) = draw(["a"], 0), draw(["a"], 0), draw(["b"], 0), draw(["a"], 1)
    torch.testing.assert_close(a0, a0_again)
    assert not torch.allclose(a0, b0) and not torch.allclose(a0, a1)


@pytest.mark.parametrize("repaint", [True, False])
def test_sample_grid_samples_with_the_module_sampling_settings(module, tmp_path, repaint):
    from types import SimpleNamespace

    from torchvision.io import read_image

    from leffa.callbacks import SampleGrid

    batch = make_batch(batch_size=2, height=32, width=24)
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, global_step=7, logger=None,
                              default_root_dir=str(tmp_path))
    module.sampling = SamplingConfig(repaint=repaint)  # model.sampling decides, as for leffa predict
    callback = SampleGrid(num_samples=2, num_steps=2)
    callback.on_validation_batch_end(trainer, module, None, batch, 0)
    grid = read_image(str(callback.last_path)).float() / 255  # rows: target | ref | mask | densepose | generated
    tile = lambda row, col: grid[:, 2 + row * 34: 2 + row * 34 + 32, 2 + col * 26: 2 + col * 26 + 24]  # noqa: E731
    outside = batch["mask"][0].expand(3, -1, -1) == 0
    same = torch.allclose(tile(0, 4)[outside], tile(0, 0)[outside], atol=1 / 255)
    assert same == repaint  # the generated column shows the person outside the mask only when repainting


def test_sample_grid_draws_what_predict_draws_with_fewer_steps(module, tmp_path):
    from types import SimpleNamespace

    from torchvision.io import read_image

    from leffa.callbacks import SampleGrid
    from leffa.pictures import sample_grid

    batch = make_batch(batch_size=2, height=32, width=24)
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, global_step=3, logger=None,
                              default_root_dir=str(tmp_path))
    module.sampling = SamplingConfig(scheduler="ddpm", num_steps=40, guidance_rescale=0.5, seed=5)
    callback = SampleGrid(num_samples=2, num_steps=3)
    callback.on_validation_batch_end(trainer, module, None, batch, 0)
    expected = sample(module, batch, SamplingConfig(scheduler="ddpm", num_steps=3, guidance_rescale=0.5, seed=5),
                      torch.Generator().manual_seed(5))
    drawn = read_image(str(callback.last_path)).float() / 255
    torch.testing.assert_close(drawn, (sample_grid(batch, expected) * 255).round() / 255, atol=1 / 255, rtol=0)
