"""model.trainable (all, attention, lora): which parameters get gradients and sit in the optimizer
and the EMA; LoRA merged equals unmerged; a full checkpoint initialises a LoRA module."""

import lightning as L
import pytest
import torch

from leffa.ema import TrainableEMA
from leffa.errors import UserError
from leffa.module import LeffaModule
from leffa.testing import batch_loader, make_batch
from leffa.trainable import merge_lora


def tiny(tiny_configs, **kwargs):
    torch.manual_seed(0)
    module = LeffaModule(**tiny_configs, conditioning="released", **kwargs)
    module.setup("fit")
    return module


def intended(name: str, kind: str) -> bool:
    if name.startswith("generative_unet.conv_in."):
        return kind != "none"
    if kind == "all":
        return not name.startswith("vae.")
    if kind == "attention":
        return ".attn1." in name
    return ".lora_A." in name or ".lora_B." in name


def perturb_adapters(module, seed=1):
    """LoRA's B starts at zero (the adapted UNet is the pretrained one): give it values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kind", ["all", "attention", "lora"])
def test_only_the_intended_parameters_get_gradients_and_sit_in_the_optimizer(tiny_configs, kind, one_thread):
    module = tiny(tiny_configs, trainable=kind, theta_timestep=1000, p_drop_ref=0.0, use_leffa_loss=True)
    perturb_adapters(module)  # so that gradients reach lora_A too
    loss, _ = module.compute_loss(make_batch(), torch.Generator().manual_seed(0), train=False)
    loss.backward()
    names = dict(module.named_parameters())
    wanted = {n for n in names if intended(n, kind)}
    trainable = {n for n, p in names.items() if p.requires_grad}
    with_grad = {n for n, p in names.items() if p.grad is not None}
    # every trainable tensor learns: none is left without a gradient, so DDP needs no
    # find_unused_parameters (and the optimizer and the EMA hold nothing that never moves)
    assert with_grad == trainable
    # the intended ones, less the Reference UNet's head that no loss reaches (frozen when built)
    head = wanted - trainable
    assert trainable <= wanted and head and all(n.startswith("reference_unet.") for n in head)
    assert {n for n in wanted if n.startswith("generative_unet.")} <= with_grad
    if kind == "all":
        assert {"reference_unet.conv_out.weight", "reference_unet.conv_norm_out.weight"} <= head
    optimizer = module.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(names[n]) for n in trainable}
    if kind == "attention":
        assert any(".attn1.to_q." in n for n in wanted) and any(n.startswith("reference_unet.") for n in wanted)
        assert not any(".ff." in n or "resnets" in n for n in wanted)


def test_unknown_trainable_and_bad_lora_targets_are_one_line_errors(tiny_configs):
    with pytest.raises(UserError, match="model.trainable: unknown 'some'; valid: all, attention, lora"):
        tiny(tiny_configs, trainable="some")
    with pytest.raises(UserError, match="model.lora.target_modules"):
        tiny(tiny_configs, trainable="lora", lora={"target_modules": ["no_such_layer"]})


def test_lora_merged_equals_unmerged(tiny_configs, one_thread):
    module = tiny(tiny_configs, trainable="lora", lora={"rank": 4, "alpha": 8.0}).eval()
    perturb_adapters(module)
    unet = module.generative_unet
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ref = torch.randn(2, 4, 8, 8, generator=g)
        before = module(x[:, :4], t, x[:, 4:], ref)
        assert merge_lora(module) == 2 * 4 * len([n for n in unet.attn_processors if "attn1" in n])
        after = module(x[:, :4], t, x[:, 4:], ref)
    assert not any(".lora_" in k or ".base_layer." in k for k in module.state_dict())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_a_full_checkpoint_initialises_a_lora_module(tiny_configs, tmp_path, one_thread):
    full = tiny(tiny_configs)
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": full.state_dict()}, path)
    lora = tiny(tiny_configs, trainable="lora", init_from=str(path))
    own = lora.state_dict()
    key = "generative_unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    torch.testing.assert_close(own[f"{key}.base_layer.weight"], full.state_dict()[f"{key}.weight"])
    assert torch.count_nonzero(own[f"{key}.lora_B.default.weight"]) == 0  # peft's init: the base function
    batch = make_batch()
    loss = [m.compute_loss(batch, torch.Generator().manual_seed(0), train=False)[0] for m in (full, lora)]
    torch.testing.assert_close(loss[0], loss[1])
    # a LoRA checkpoint goes on as LoRA, not silently into a plain module
    torch.save({"state_dict": own}, tmp_path / "lora.ckpt")
    tiny(tiny_configs, trainable="lora", init_from=str(tmp_path / "lora.ckpt"))
    with pytest.raises(UserError, match="holds LoRA adapters"):
        tiny(tiny_configs, init_from=str(tmp_path / "lora.ckpt"))


def ema_bytes(callback) -> int:
    model = callback._average_model.module
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_trainable_ema_keeps_only_trainable_weights_in_the_checkpoint_layout(tiny_configs, tmp_path, one_thread):
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    sizes = {}
    for callback in (EMAWeightAveraging(decay=0.5), TrainableEMA(decay=0.5)):
        module = tiny(tiny_configs, trainable="attention", learning_rate=1e-3)
        saver = ModelCheckpoint(dirpath=tmp_path / type(callback).__name__, filename="mid", every_n_train_steps=2)
        trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, callbacks=[callback, saver],
                            enable_progress_bar=False, default_root_dir=tmp_path)
        trainer.fit(module, train_dataloaders=batch_loader())
        sizes[type(callback).__name__] = ema_bytes(callback)
    trainable = sum(p.numel() * 4 for p in module.parameters() if p.requires_grad)
    assert sizes["TrainableEMA"] == trainable
    assert sizes["EMAWeightAveraging"] >= sum(p.numel() * 4 for p in module.parameters())
    checkpoint = torch.load(tmp_path / "TrainableEMA" / "mid.ckpt", weights_only=True)
    ema, live = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert ema.keys() == live.keys() == module.state_dict().keys()
    q = "generative_unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(ema[q], live[q])  # averaged
    frozen = "generative_unet.down_blocks.0.resnets.0.conv1.weight"
    assert ema[frozen] is live[frozen] or torch.equal(ema[frozen], live[frozen])
    # at the end of training the module holds the average, as with Lightning's callback
    torch.testing.assert_close(dict(module.named_parameters())[q], callback.average_state()[q])
    nxt = LeffaModule(**tiny_configs, conditioning="released", init_from=str(tmp_path / "TrainableEMA" / "mid.ckpt"),
                      init_from_weights="live")
    torch.testing.assert_close(nxt.state_dict()[q], live[q])
    # resuming restores the live weights into the module and the averages into the callback
    resumed, callback = tiny(tiny_configs, trainable="attention", learning_rate=1e-3), TrainableEMA(decay=0.5)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, callbacks=[callback], enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(resumed, train_dataloaders=batch_loader(), ckpt_path=tmp_path / "TrainableEMA" / "mid.ckpt")
    assert int(callback._average_model.n_averaged) == int(checkpoint["averaging_state"]["n_averaged"])
    torch.testing.assert_close(callback.average_state()[q], ema[q])
    torch.testing.assert_close(dict(resumed.named_parameters())[q], live[q])  # nothing left to train


def unet_outputs(module, seed=3):
    g = torch.Generator().manual_seed(seed)
    x, ref = torch.randn(2, 12, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        return module.eval()(x[:, :4], torch.tensor([10, 700]), x[:, 4:], ref)


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_lora_exports_merged_to_the_released_layout_and_to_a_folder(tiny_configs, tmp_path, one_thread):
    from released_files import export, released_file, save_ckpt

    from leffa.export import export_folder, load_exported

    base = tmp_path / "virtual_tryon.pth"
    released_file(base, dtype=torch.float32)
    lora = tiny(tiny_configs, trainable="lora", lora={"rank": 4, "alpha": 8.0}, init_from=str(base))
    perturb_adapters(lora)
    expected = unet_outputs(lora)
    ckpt = save_ckpt(lora, tmp_path / "lora.ckpt")
    released = export(ckpt, base, tmp_path / "mine.pth")
    assert not any(".lora_" in k or ".base_layer." in k for k in released)
    plain = tiny(tiny_configs, init_from=str(tmp_path / "mine.pth"))
    torch.testing.assert_close(unet_outputs(plain), expected, atol=1e-5, rtol=0)
    export_folder(LeffaModule.from_checkpoint(ckpt), tmp_path / "folder")
    torch.testing.assert_close(unet_outputs(load_exported(tmp_path / "folder")), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["attention", "lora"])
def test_ddp_buckets_only_the_trainable_parameters(tiny_configs, kind, own_process_group, monkeypatch):
    from torch.nn.parallel import DistributedDataParallel

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29517")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    module = tiny(tiny_configs, trainable=kind)
    trainable = [p for p in module.parameters() if p.requires_grad]
    logged = DistributedDataParallel(module)._get_ddp_logging_data()
    assert logged["num_parameter_tensors"] == len(trainable) < len(list(module.parameters()))
    assert logged["total_parameter_size_bytes"] == sum(p.numel() * p.element_size() for p in trainable)


@pytest.mark.parametrize("kind", ["attention", "lora"])
def test_a_frozen_reference_unet_stays_frozen_and_gets_no_adapters(tiny_configs, kind):
    module = tiny(tiny_configs, trainable=kind,
                  architecture=dict(class_path="dual_unet", init_args=dict(freeze_reference_unet=True)))
    assert not any(p.requires_grad for p in module.reference_unet.parameters())
    assert not any(".lora_" in n for n in module.reference_unet.state_dict())
    assert any(p.requires_grad for p in module.generative_unet.parameters())
