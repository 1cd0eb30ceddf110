"""The LightningModule: wiring, losses, gradients, optimisation, EMA, init_from, precision."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from leffa.losses import coordinate_map
from leffa.module import LeffaModule
from leffa.selection import draw_selection
from leffa.testing import batch_loader, make_batch


def tiny_module(tiny_configs, **kwargs):
    torch.manual_seed(0)
    module = LeffaModule(**tiny_configs, **kwargs)
    module.setup("fit")
    return module


def fixed_step(module, batch, seed=0):
    """One loss with a fixed draw of noise and timesteps."""
    return module.compute_loss(batch, torch.Generator().manual_seed(seed), train=False)[0]


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
@pytest.mark.parametrize("conditioning,channels", [("tryon", 9), ("pose", 8), ("pose_image", 7), ("released", 12)])
def test_generative_input_channels_follow_the_conditioning(tiny_configs, conditioning, channels):
    module = tiny_module(tiny_configs, conditioning=conditioning)
    assert module.generative_unet.conv_in.in_channels == channels
    assert module.reference_unet.conv_in.in_channels == 4
    loss = fixed_step(module, make_batch())
    assert torch.isfinite(loss)


def test_unknown_conditioning_lists_valid_ones(tiny_configs):
    with pytest.raises(ValueError, match="tryon, pose, pose_image, released"):
        LeffaModule(**tiny_configs, conditioning="nope")


def test_gradients_reach_both_unets_and_registers_but_not_the_vae(tiny_configs):
    module = tiny_module(tiny_configs, use_leffa_loss=True, theta_timestep=1000,
                         architecture=dict(class_path="dual_unet", init_args=dict(num_registers=2)))
    fixed_step(module, make_batch()).backward()
    gen = [p.grad for p in module.generative_unet.parameters()]
    ref = [p.grad for p in module.reference_unet.down_blocks.parameters()]
    assert all(g is not None for g in gen) and any(g.abs().sum() > 0 for g in gen)
    assert all(g is not None and g.abs().sum() > 0 for g in ref)
    registers = [p for n, p in module.named_parameters() if n.endswith("processor.registers")]
    assert registers and all(p.grad is not None and p.grad.abs().sum() > 0 for p in registers)
    assert all(p.grad is None and not p.requires_grad for p in module.vae.parameters())


def test_freeze_reference_unet_leaves_it_without_gradients(tiny_configs):
    module = tiny_module(tiny_configs, architecture=dict(class_path="dual_unet", init_args=dict(freeze_reference_unet=True)))
    fixed_step(module, make_batch()).backward()
    assert all(p.grad is None for p in module.reference_unet.parameters())
    assert module.generative_unet.conv_in.weight.grad is not None


def naive_leffa(module, batch, rows):
    """Eq. 2-4 from the bank's captures with an explicit softmax matrix."""
    hp = module.hparams
    total = torch.zeros(len(rows))
    for cap in module.bank.captures.values():
        h, w = cap.grid
        d = cap.query.shape[-1]
        attn = torch.softmax(cap.query @ cap.key.transpose(-1, -2) / math.sqrt(d) / hp.tau, dim=-1).mean(1)
        flow = (attn @ coordinate_map(h, w)).view(-1, h, w, 2)
        up = torch.nn.functional.interpolate(flow.permute(0, 3, 1, 2), size=batch["tgt"].shape[-2:],
                                             mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
        warped = torch.nn.functional.grid_sample(batch["ref"][rows], up, align_corners=True)
        m = batch["mask"][rows]
        total += ((batch["tgt"][rows] * m - warped * m) ** 2).mean(dim=(1, 2, 3))
    return total


def test_leffa_term_equals_naive_computation_and_selection(tiny_configs):
    module = tiny_module(tiny_configs, use_leffa_loss=True, theta_timestep=1000, p_drop_ref=0.0)
    batch = make_batch()
    with torch.no_grad():
        loss = fixed_step(module, batch)
    # 64x48 images: tokens grids 8x6 (h/H = 1/8) and 4x3 (1/16), both above 1/32: all 7 layers
    assert len(module.bank.captures) == 7
    rows = torch.arange(2)
    leffa = module.leffa_loss(batch["ref"], batch["tgt"], batch["mask"])
    torch.testing.assert_close(leffa, naive_leffa(module, batch, rows), atol=1e-5, rtol=1e-5)
    assert loss.item() > 0
    # theta_resolution between 1/16 and 1/8 keeps only the three 8x6 layers
    module.bank.theta_resolution = 1 / 10
    with torch.no_grad():
        fixed_step(module, batch)
    assert sorted(c.grid for c in module.bank.captures.values()) == [(8, 6)] * 3


def test_timestep_selection_excludes_large_t(tiny_configs):
    # theta_timestep 1 selects t = 0 only, which the fixed draw of fixed_step does not make
    module = tiny_module(tiny_configs, use_leffa_loss=True, theta_timestep=1)
    timesteps, _ = draw_selection(torch.Generator().manual_seed(0), 2, module.scheduler.config.num_train_timesteps, 0.0)
    assert (timesteps > 0).all()
    with torch.no_grad():
        with_leffa = fixed_step(module, make_batch())
    assert not module.bank.captures
    plain = tiny_module(tiny_configs)
    with torch.no_grad():
        torch.testing.assert_close(with_leffa, fixed_step(plain, make_batch()))


def test_reference_dropout_zeroes_the_reference_latent(tiny_configs):
    module = tiny_module(tiny_configs, p_drop_ref=0.5)
    seen = []
    module.reference_unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(8):
            module.compute_loss(make_batch(batch_size=4), g, train=True)
    per_sample_zero = torch.cat([(x.flatten(1).abs().sum(1) == 0) for x in seen])
    assert 0 < per_sample_zero.float().mean() < 1  # some dropped, some kept
    seen.clear()
    with torch.no_grad():
        module.compute_loss(make_batch(batch_size=4), g, train=False)
    assert (seen[0].flatten(1).abs().sum(1) > 0).all()  # never dropped outside training


def test_gradient_checkpointing_gives_the_same_gradients(tiny_configs):
    grads = []
    for checkpointing in (False, True):
        module = tiny_module(tiny_configs, use_leffa_loss=True, theta_timestep=1000, p_drop_ref=0.0,
                             gradient_checkpointing=checkpointing)
        module.train()
        fixed_step(module, make_batch()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.generative_unet.parameters()]
                               + [p.grad.flatten() for p in module.reference_unet.down_blocks.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_a_few_adamw_steps_lower_the_loss_on_a_fixed_batch(tiny_configs):
    module = tiny_module(tiny_configs, use_leffa_loss=True, theta_timestep=1000, learning_rate=1e-3, p_drop_ref=0.0)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    batch = make_batch()
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = fixed_step(module, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow  # over 10 s on 2 cores: make test runs it, make test-fast does not
def test_trainer_fit_with_ema_then_init_from_live_and_ema(tiny_configs, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = tiny_module(tiny_configs, use_leffa_loss=True, learning_rate=1e-3)
    ema = EMAWeightAveraging(decay=0.5)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="mid", every_n_train_steps=3, save_top_k=-1)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, callbacks=[ema, saver],
                        enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=batch_loader())
    assert trainer.global_step == 4
    # at the end of training the callback copies the average into the module
    torch.testing.assert_close(module.generative_unet.conv_in.weight,
                               ema._average_model.module.generative_unet.conv_in.weight)
    # mid-training, the checkpoint holds the EMA weights in state_dict and the live ones beside them
    path = tmp_path / "mid.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    key = "generative_unet.conv_in.weight"
    assert not torch.equal(checkpoint["state_dict"][key], checkpoint["current_model_state"][key])
    assert "noise_generator" in checkpoint
    for which, source in (("ema", "state_dict"), ("live", "current_model_state")):
        nxt = LeffaModule(**tiny_configs, init_from=str(path), init_from_weights=which)
        torch.testing.assert_close(nxt.generative_unet.conv_in.weight, checkpoint[source][key])


def test_init_from_with_another_layout_is_a_clear_error(tiny_configs, tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save({"state_dict": tiny_module(tiny_configs, conditioning="tryon").state_dict()}, path)
    with pytest.raises(ValueError, match="conv_in.weight has shape"):
        LeffaModule(**tiny_configs, conditioning="released", init_from=str(path))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        LeffaModule(**tiny_configs, init_from=str(tmp_path / "missing.ckpt"))


def test_bf16_mixed_training_steps_on_cpu(tiny_configs, tmp_path):
    module = tiny_module(tiny_configs, use_leffa_loss=True, theta_timestep=1000, p_drop_ref=0.0)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=batch_loader())
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert module.generative_unet.conv_in.weight.dtype == torch.float32  # master weights stay fp32
    assert torch.isfinite(trainer.callback_metrics["train/leffa"])
