"""model.speed switches on the CPU: each gives the plain step's loss and gradients (compile,
channels_last), or stores what it says in the dtype it says (frozen_bf16); host copies through
pinned memory are the same values."""

from __future__ import annotations

import pytest
import torch

from leffa.errors import UserError
from leffa.module import LeffaModule
from leffa.speed import SpeedSettings, pinned_copy
from leffa.testing import make_batch


def build(tiny_configs, speed=None, **kwargs):
    torch.manual_seed(0)
    return LeffaModule(**tiny_configs, conditioning="released", use_leffa_loss=True, theta_timestep=1000,
                       p_drop_ref=0.0, speed=speed, **kwargs)


def loss_and_grads(module, bf16=False):
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, metrics = module.compute_loss(batch, torch.Generator().manual_seed(0), train=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    module.zero_grad(set_to_none=True)
    return loss.detach(), metrics, grads


def assert_same_step(a, b, atol=1e-6):
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=1e-5)
    torch.testing.assert_close(metrics_a["leffa"], metrics_b["leffa"], atol=atol, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=1e-4, msg=name)


def test_speed_settings_are_recorded_and_validated(tiny_configs):
    module = build(tiny_configs, speed={"channels_last": True})
    assert module.speed == SpeedSettings(channels_last=True)
    assert module.hparams.speed == {"compile": False, "channels_last": True, "frozen_bf16": False}
    with pytest.raises(TypeError):
        build(tiny_configs, speed={"compiled": True})


def test_channels_last_gives_the_plain_step(tiny_configs):
    plain = build(tiny_configs)
    fast = build(tiny_configs, speed={"channels_last": True})
    fast.apply_speed(bf16=False)
    conv = fast.generative_unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert_same_step(loss_and_grads(plain), loss_and_grads(fast), atol=1e-5)


def test_frozen_bf16_stores_only_frozen_weights_in_bf16_and_trains(tiny_configs):
    module = build(tiny_configs, speed={"frozen_bf16": True}, trainable="attention")
    module.apply_speed(bf16=False)  # not under a bf16 precision: nothing changes
    assert all(p.dtype == torch.float32 for p in module.parameters())
    module.apply_speed(bf16=True)
    frozen = [p for p in module.parameters() if not p.requires_grad]
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in module.vae.parameters())
    plain = build(tiny_configs, trainable="attention")
    loss, _, grads = loss_and_grads(module, bf16=True)
    reference, _, reference_grads = loss_and_grads(plain, bf16=True)
    assert torch.isfinite(loss) and abs(loss - reference) < 0.02 * reference
    assert all(g.dtype == torch.float32 for g in grads.values()) and grads.keys() == reference_grads.keys()


@pytest.mark.slow  # compiling the tiny UNets' blocks takes about a minute on 2 cores
def test_compiled_blocks_give_the_eager_step_with_lora(tiny_configs):
    eager = build(tiny_configs, trainable="lora")
    compiled = build(tiny_configs, speed={"compile": True}, trainable="lora")
    compiled.apply_speed(bf16=False)
    assert_same_step(loss_and_grads(eager), loss_and_grads(compiled), atol=1e-5)


def test_compile_is_refused_with_checkpointing_and_under_fsdp1(tiny_configs):
    from lightning.pytorch.strategies import FSDPStrategy

    from leffa.speed import refuse_compile_with

    with pytest.raises(UserError, match="model.speed.compile: not with model.gradient_checkpointing"):
        build(tiny_configs, speed={"compile": True}, gradient_checkpointing=True)
    with pytest.raises(UserError, match="model.speed.compile: not with FSDPStrategy"):
        refuse_compile_with(strategy=FSDPStrategy())


def test_pinned_copy_keeps_values_and_dtype_on_the_cpu():
    x = torch.randn(3, 4)
    y = pinned_copy(x, torch.device("cpu"), torch.float64)
    assert y.dtype == torch.float64 and torch.equal(y.float(), x)
