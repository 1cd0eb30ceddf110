"""model.architecture: concat_unet, the CatVTON-style single UNet: person and garment side by side
along the latent width. Its input layout, the Leffa captures (person queries x garment keys), the
trainable set, a short ``leffa fit``, sampling, the export round trip, the stage configs and the
SLURM switch."""

import csv
import math
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from leffa.architectures import DenoiserSettings, architecture_class
from leffa.architectures.concat_unet import ConcatUNet
from leffa.cli import cli_main
from leffa.errors import UserError
from leffa.export import export_folder, load_exported
from leffa.module import LeffaModule
from leffa.losses import capture_flow
from leffa.sampling import SamplingConfig, sample
from leffa.testing import make_batch
from leffa.unets import set_cross_attention

ROOT = Path(__file__).resolve().parents[1]
CONCAT = ROOT / "configs" / "concat"


def concat_module(tiny_configs, **kwargs) -> LeffaModule:
    torch.manual_seed(0)
    return LeffaModule(**tiny_configs, architecture="concat_unet", conditioning="tryon", **kwargs)


def unet_inputs(unet) -> list[torch.Tensor]:
    """Records every input of ``unet`` (its conv_in's input) from now on."""
    seen = []
    unet.conv_in.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))
    return seen


# ---------------------------------------------------------------- layout


def test_the_concatenated_input_is_person_then_garment_along_the_width(tiny_configs):
    module = concat_module(tiny_configs)
    assert isinstance(module.denoiser, ConcatUNet) and architecture_class("concat_unet") is ConcatUNet
    # one UNet, no Reference UNet; its checkpoint prefix is unet.
    assert {name.split(".")[0] for name in module.state_dict()} == {"unet", "vae"}
    assert module.denoiser.unet.config.in_channels == 4 + 5  # latent + mask + masked image
    b, h, w = 2, 8, 6
    g = torch.Generator().manual_seed(0)
    noisy, garment = torch.randn(b, 4, h, w, generator=g), torch.randn(b, 4, h, w, generator=g) + 3
    mask = (torch.rand(b, 1, h, w, generator=g) > 0.5).float()
    masked = torch.randn(b, 4, h, w, generator=g) - 3
    seen = unet_inputs(module.denoiser.unet)
    with torch.no_grad():
        module.bank.begin((h, w))
        module.run_reference(garment, torch.tensor([10, 10]))
        eps = module.denoise(noisy, torch.tensor([10, 10]), torch.cat([mask, masked], 1))
    assert eps.shape == (b, 4, h, w)  # the person half only
    (x,) = seen
    assert x.shape == (b, 9, h, 2 * w)
    person, garment_half = x[..., :w], x[..., w:]
    torch.testing.assert_close(person[:, :4], noisy)
    torch.testing.assert_close(person[:, 4:5], mask)
    torch.testing.assert_close(person[:, 5:], masked)
    torch.testing.assert_close(garment_half[:, :4], garment)  # clean garment in the noisy-latent slot
    assert not garment_half[:, 4:5].any()  # no mask over the garment
    torch.testing.assert_close(garment_half[:, 5:], garment)  # and in the masked-image slot
    # the returned prediction is the UNet's prediction over its person half
    with torch.no_grad():
        full = module.denoiser.unet(x, torch.tensor([10, 10]), encoder_hidden_states=None).sample
    torch.testing.assert_close(eps, full[..., :w])


@pytest.mark.parametrize("setting, message", [
    (dict(conditioning="pose_image"), "model.conditioning.*tryon"),
    (dict(conditioning="released"), "model.conditioning.*tryon"),
    (dict(architecture=dict(class_path="concat_unet", init_args=dict(num_registers=2))),
     "model.architecture.init_args: ConcatUNet does not take num_registers"),
    (dict(architecture=dict(class_path="concat_unet", init_args=dict(freeze_reference_unet=True))),
     "ConcatUNet does not take freeze_reference_unet"),
])
def test_settings_without_meaning_for_one_unet_are_one_line_errors(tiny_configs, setting, message):
    with pytest.raises(UserError, match=message) as error:
        LeffaModule(**tiny_configs, **{"architecture": "concat_unet", "conditioning": "tryon", **setting})
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- Leffa captures


def test_a_capture_holds_person_queries_and_garment_keys_only(tiny_configs):
    module = concat_module(tiny_configs)
    unet = module.denoiser.unet
    name, layer = next((n, m) for n, m in unet.named_modules() if n.endswith("attn1"))
    assert isinstance(layer, Attention)
    b, h, w, image_hw = 3, 4, 3, (64, 48)  # a 4 x (3 + 3) token grid; 4 / 64 > 1/32: selected
    channels = layer.to_q.in_features
    g = torch.Generator().manual_seed(1)
    # person tokens around 0, garment tokens around +5: each half's projections are distinguishable
    grid = torch.randn(b, h, 2 * w, channels, generator=g)
    grid[:, :, w:] += 5.0
    tokens = grid.reshape(b, h * 2 * w, channels)
    rows = torch.tensor([0, 2])
    module.bank.begin((8, 6), image_hw, rows)  # latent 8x6: this layer is one level down
    with torch.no_grad():
        out = layer(tokens)
        # the output is ordinary self-attention over all 2*h*w tokens (diffusers' own processor)
        torch.testing.assert_close(out, AttnProcessor2_0()(layer, tokens), atol=1e-5, rtol=1e-5)
        capture = module.bank.captures[f"{name}.processor"]
        heads = layer.heads

        def by_hand(project, half):  # (b, h, w, C) -> (rows, heads, h*w, d)
            y = project(half[rows].reshape(len(rows), h * w, channels))
            return y.view(len(rows), h * w, heads, -1).transpose(1, 2)

        torch.testing.assert_close(capture.query, by_hand(layer.to_q, grid[:, :, :w]))
        torch.testing.assert_close(capture.key, by_hand(layer.to_k, grid[:, :, w:]))
    assert capture.grid == (h, w) and capture.register_key is None
    assert capture_flow(capture, tau=2.0).shape == (len(rows), h, w, 2)


def test_a_forward_captures_the_selected_layers_on_the_person_grid(tiny_configs):
    module = concat_module(tiny_configs, use_leffa_loss=True)
    batch = make_batch()  # 64x48: latent 8x6; grids 8x6 and 4x3 per half
    with torch.no_grad():
        module.noised_forward(batch, torch.Generator().manual_seed(0), torch.tensor([10, 10]),
                              torch.tensor([True, True]), capture_rows=torch.tensor([1]))
    grids = {c.grid for c in module.bank.captures.values()}
    assert grids == {(8, 6), (4, 3)}  # both levels: 4 / 64 > 1/32
    for capture in module.bank.captures.values():
        assert capture.query.shape[0] == 1 and capture.query.shape[2] == capture.key.shape[2] == math.prod(capture.grid)
    # theta_resolution against the image height: 4 / 64 is not above 1/16
    module.bank.theta_resolution = 1 / 16
    with torch.no_grad():
        module.noised_forward(batch, torch.Generator().manual_seed(0), torch.tensor([10, 10]),
                              torch.tensor([True, True]), capture_rows=torch.tensor([1]))
    assert {c.grid for c in module.bank.captures.values()} == {(8, 6)}


def test_a_seam_inside_a_token_at_a_leffa_layer_is_a_one_line_error(tiny_configs):
    # width 40: latent 8x5, so one level down the 4 x (2.5 + 2.5) grid of a selected layer is 4x5
    module = concat_module(tiny_configs, use_leffa_loss=True, theta_timestep=1000, p_drop_ref=0.0)
    with pytest.raises(UserError, match="data.width") as error, torch.no_grad():
        module.compute_loss(make_batch(width=40), torch.Generator().manual_seed(0), train=True)
    assert "\n" not in str(error.value)


def test_leffa_loss_trains_through_the_captures(tiny_configs):
    module = concat_module(tiny_configs, use_leffa_loss=True, theta_timestep=1000, p_drop_ref=0.0)
    loss, metrics = module.compute_loss(make_batch(), torch.Generator().manual_seed(0), train=True)
    loss.backward()
    assert torch.isfinite(metrics["leffa"]) and metrics["leffa"] > 0
    assert metrics["leffa_layers"] == 7.0  # every attn1: h = 8 or 4, and h / 64 > 1/32
    first = module.denoiser.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert first.to_k.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- trainable set


def attention_count(unet) -> int:
    return sum(p.numel() for n, m in unet.named_modules() if n.endswith("attn1") for p in m.parameters())


def test_trainable_attention_is_every_self_attention_and_conv_in(tiny_configs):
    module = concat_module(tiny_configs, trainable="attention")
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".attn1." in n or n.startswith("unet.conv_in.") for n in trainable)
    assert {n for n in trainable if n.startswith("unet.conv_in.")} == {"unet.conv_in.weight", "unet.conv_in.bias"}
    # conv_in trains: the tiny config's UNet takes 4 channels, widened to 9
    unet = module.denoiser.unet
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == \
        attention_count(unet) + sum(p.numel() for p in unet.conv_in.parameters())
    # all and lora through leffa.trainable
    everything = concat_module(tiny_configs, trainable="all")
    assert {n for n, p in everything.named_parameters() if p.requires_grad} == \
        {n for n in everything.state_dict() if n.startswith("unet.")}
    lora = concat_module(tiny_configs, trainable="lora")
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n or n.startswith("unet.conv_in.") for n in names)


def test_trainable_attention_at_sd15_inpainting_shapes_is_catvtons_49_57_million():
    # SD1.5-inpainting's UNet: SD1.5's shapes with 9 input channels, so conv_in is not new and stays frozen
    config = {**yaml.safe_load((ROOT / "configs" / "model" / "sd15_unet.yaml").read_text()), "in_channels": 9}
    with torch.device("meta"):
        denoiser = ConcatUNet(DenoiserSettings(None, config, latent_channels=4, conditioning="tryon",
                                               trainable="attention"))
    count = sum(p.numel() for p in denoiser.unet.parameters() if p.requires_grad)
    assert count == attention_count(denoiser.unet) and not denoiser.unet.conv_in.weight.requires_grad
    assert round(count / 1e6, 2) == 49.57  # CatVTON: 49.57 M trainable parameters


# ---------------------------------------------------------------- sampling


def test_sampling_guides_against_the_zeroed_garment_and_repaints(tiny_configs):
    module = concat_module(tiny_configs).eval()
    batch = make_batch()
    seen = unet_inputs(module.denoiser.unet)
    images = sample(module, batch, SamplingConfig(num_steps=2, guidance_scale=2.5, reference_timestep=None,
                                                  repaint=True), torch.Generator().manual_seed(0))
    assert images.shape == batch["tgt"].shape
    outside = batch["mask"].expand_as(images) == 0
    torch.testing.assert_close(images[outside], batch["tgt"][outside])
    garment = module.encode(batch["ref"])
    w = garment.shape[-1]
    assert len(seen) == 2
    for x in seen:  # (2B, 9, h, 2w): unconditional first
        uncond, cond = x.chunk(2)
        assert not uncond[..., w:].any()  # the garment half zeroed in every slot
        torch.testing.assert_close(cond[:, :4, :, w:], garment)
        torch.testing.assert_close(cond[:, 5:, :, w:], garment)
        torch.testing.assert_close(uncond[..., :w], cond[..., :w])  # the same person half


# ---------------------------------------------------------------- sharding


def test_shard_puts_fsdp2_over_the_one_unet(tiny_configs, own_process_group, monkeypatch):
    from diffusers.models.attention import BasicTransformerBlock
    from torch.distributed.device_mesh import init_device_mesh

    from leffa.parallel import is_sharded

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    module = concat_module(tiny_configs, use_leffa_loss=True, theta_timestep=1000, p_drop_ref=0.0)
    batch, g = make_batch(), lambda: torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = module.compute_loss(batch, g(), train=True)[0]
    module.denoiser.shard(init_device_mesh("cpu", (1,)), None)
    unet = module.denoiser.unet
    assert is_sharded(unet) and all(is_sharded(m) for m in unet.modules() if isinstance(m, BasicTransformerBlock))
    loss, metrics = module.compute_loss(batch, g(), train=True)
    loss.backward()
    torch.testing.assert_close(loss, before)
    assert torch.isfinite(metrics["leffa"])
    assert all(p.grad is not None for n, p in unet.named_parameters() if ".attn1." in n)


# ---------------------------------------------------------------- export


def test_export_round_trip_is_a_diffusers_unet_folder(tiny_configs, tmp_path):
    module = concat_module(tiny_configs, use_leffa_loss=True).eval()
    with torch.no_grad():  # weights that differ from any fresh initialisation
        for p in module.denoiser.unet.parameters():
            p.add_(0.01)
    out = export_folder(module, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["leffa.json", "scheduler", "unet", "vae"]
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet").eval()
    set_cross_attention(unet, "passthrough")  # the text cross-attention diffusers brings back is unused
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 9, 8, 12, generator=g), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=None).sample,
                                   module.denoiser.unet(x, t, encoder_hidden_states=None).sample)
    back = load_exported(out).eval()
    assert back.hparams.architecture == {"class_path": "leffa.architectures.concat_unet.ConcatUNet", "init_args": {}}
    assert back.state_dict().keys() == module.state_dict().keys()
    for key, value in module.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, msg=key)
    batch = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(module.compute_loss(batch, torch.Generator().manual_seed(0), train=False)[0],
                                   back.compute_loss(batch, torch.Generator().manual_seed(0), train=False)[0])


# ---------------------------------------------------------------- leffa fit, configs, SLURM


@pytest.mark.slow  # over 10 s on 2 cores: make test runs it, make test-fast does not
def test_leffa_fit_on_the_tiny_concat_config_trains_both_losses(shards, tmp_path, one_thread):
    cli_main([
        "fit", "--config", str(CONCAT / "tiny_synthetic.yaml"),
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.logger.init_args.name=concat",
        "--model.theta_timestep=1000", "--model.p_drop_ref=0.0",  # every sample in the Leffa term
        f"--data.train_shards={shards}", f"--data.val_shards={shards}",
        "--data.height=64", "--data.width=48", "--data.batch_size=2", "--data.num_workers=0",
    ])
    run = tmp_path / "concat" / "version_0"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    for name in ("train/diffusion", "train/leffa", "val/diffusion", "val/leffa"):
        values = [float(r[name]) for r in rows if r.get(name)]
        assert values and all(math.isfinite(v) for v in values), name
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["architecture"]["class_path"] == "leffa.architectures.concat_unet.ConcatUNet"
    assert {k.split(".")[0] for k in checkpoint["state_dict"]} == {"unet", "vae"}
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_000002.png"]
    # leffa export of the checkpoint: a diffusers UNet folder, read back whole
    cli_main(["export", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "export")])
    assert UNet2DConditionModel.load_config(tmp_path / "export", subfolder="unet")["in_channels"] == 9
    back = load_exported(tmp_path / "export")
    for key, value in checkpoint["state_dict"].items():
        torch.testing.assert_close(back.state_dict()[key], value, msg=key)


def resolved(monkeypatch, capsys, config: Path) -> dict:
    monkeypatch.setenv("LEFFA_SD15", "/nowhere")
    monkeypatch.setenv("LEFFA_RUNS", "/runs")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(config), "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
@pytest.mark.parametrize("task", ["vton", "dresscode"])
def test_the_concat_stages_are_the_paper_stages_with_one_unet(monkeypatch, capsys, task):
    stages = [f"{task}_512", f"{task}_1024", f"{task}_1024_leffa"]
    for i, stage in enumerate(stages):
        concat, paper = resolved(monkeypatch, capsys, CONCAT / f"{stage}.yaml"), \
            resolved(monkeypatch, capsys, ROOT / "configs" / f"{stage}.yaml")
        assert concat["model"]["architecture"] == "concat_unet" and concat["model"]["trainable"] == "attention"
        assert concat["model"]["conditioning"] == "tryon"
        assert concat["trainer"]["default_root_dir"] == f"/runs/concat_{stage}"
        previous = None if i == 0 else f"/runs/concat_{stages[i - 1]}/checkpoints/last.ckpt"
        assert concat["model"]["init_from"] == previous
        # everything else is the paper's stage
        for section in ("data", "model", "trainer"):
            differ = {k for k in paper[section] if paper[section][k] != concat[section][k]}
            allowed = {"architecture", "trainable", "init_from", "default_root_dir", "callbacks", "logger"}
            assert differ <= allowed, differ
        assert concat["model"]["use_leffa_loss"] is (i == 2)


def launch(tmp_path, stage, **env):
    """slurm/launch.sh with an srun that prints its command line instead of running it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text('#!/bin/bash\necho "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    environment = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LEFFA_HOME": str(ROOT), "LEFFA_BIN": "leffa",
                   "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "1", **env}
    return subprocess.run(["bash", str(ROOT / "slurm" / "launch.sh"), str(stage)], env=environment,
                          capture_output=True, text=True)


def test_slurm_stages_pick_the_concat_configs_with_leffa_arch(tmp_path):
    for stage, name in ((1, "vton_512"), (2, "vton_1024"), (3, "vton_1024_leffa")):
        default = launch(tmp_path, stage)
        assert default.returncode == 0 and f"--config configs/{name}.yaml" in default.stdout
        concat = launch(tmp_path, stage, LEFFA_ARCH="concat_unet")
        assert concat.returncode == 0 and f"--config configs/concat/{name}.yaml" in concat.stdout
    dresscode = launch(tmp_path, 2, LEFFA_ARCH="concat_unet", LEFFA_TASK="dresscode")
    assert "--config configs/concat/dresscode_1024.yaml" in dresscode.stdout
    for env in (dict(LEFFA_ARCH="concat_unet", LEFFA_TASK="pose"), dict(LEFFA_ARCH="transformer")):
        refused = launch(tmp_path, 1, **env)
        assert refused.returncode == 2 and "LEFFA_ARCH" in refused.stderr and not refused.stdout
