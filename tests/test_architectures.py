"""The architecture seam: an architecture is one class (anywhere importable) that a config names by
``class_path``, with its own arguments only; LeffaModule talks to it only through ReferenceDenoiser.

``WidthShiftUNet`` below is defined here, in the test module, and trained, sampled, checkpointed and
exported through the CLI and the module without any file under ``leffa/`` knowing it."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from leffa.architectures import (
    DenoiserSettings, DualUNet, ReferenceDenoiser, architecture_record, comparable_record, upgrade_settings,
)
from leffa.attention import ReferenceBank
from leffa.cli import cli_main
from leffa.errors import UserError
from leffa.module import LeffaModule
from leffa.sampling import SamplingConfig, sample
from leffa.testing import make_batch
from leffa.unets import build_unet
from one_line_errors import refused
from tiny_runs import fit_args

CLASS_PATH = f"{__name__}.WidthShiftUNet"


class WidthShiftUNet(ReferenceDenoiser):
    """A second architecture, as small as one can be: one UNet whose input also holds the reference
    latent, rolled along the width by its own argument ``shift``."""

    export_folders = {"unet": "unet"}
    weight_args = ("shift",)

    def __init__(self, settings: DenoiserSettings, shift: int = 0):
        self.shift = shift
        in_channels = settings.in_channels + settings.latent_channels
        self.unet = build_unet(settings.pretrained_model, settings.unet_config, in_channels, settings.cross_attention)
        self.bank = ReferenceBank()  # no attention layer of its captures for the Leffa loss
        self.encoded = 0
        self.reference: torch.Tensor | None = None

    def components(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    def encode_reference(self, ref_latent, timesteps):
        self.encoded += 1
        self.reference = torch.roll(ref_latent, self.shift, dims=-1)

    def denoise(self, noisy_latent, timesteps, conditioning):
        x = torch.cat([noisy_latent, conditioning.to(noisy_latent.dtype), self.reference.to(noisy_latent.dtype)], 1)
        return self.unet(x, timesteps, encoder_hidden_states=None).sample


def width_shift(**init_args) -> dict:
    return {"class_path": CLASS_PATH, "init_args": init_args}


def test_a_new_architecture_trains_and_samples_from_its_class_path(tiny_configs):
    module = LeffaModule(**tiny_configs, architecture=width_shift(shift=1))
    assert isinstance(module.denoiser, WidthShiftUNet) and module.denoiser.shift == 1
    assert {name.split(".")[0] for name in module.state_dict()} == {"unet", "vae"}
    # its input: latent 4 + try-on conditioning 5 + the reference latent 4
    assert module.denoiser.unet.config.in_channels == 13
    assert module.hparams.architecture == {"class_path": CLASS_PATH, "init_args": {"shift": 1}}
    batch = make_batch()
    loss, _ = module.compute_loss(batch, torch.Generator().manual_seed(0), train=True)
    loss.backward()
    assert torch.isfinite(loss) and module.denoiser.encoded == 1
    # the reference reaches the UNet: its input channels for the reference get a gradient
    assert module.denoiser.unet.conv_in.weight.grad[:, 9:].abs().sum() > 0
    images = sample(module, batch, SamplingConfig(num_steps=2, guidance_scale=1.0, reference_timestep=None,
                                                  repaint=False), torch.Generator().manual_seed(0))
    assert images.shape == batch["tgt"].shape and module.denoiser.encoded == 3  # once per step


@pytest.mark.slow  # a short fit, a resume, an export and a predict through the CLI (about 20 s on 2 cores)
def test_a_config_names_a_new_architecture_by_class_path(shards, tmp_path, capsys):
    config = tmp_path / "arch.yaml"
    config.write_text(yaml.safe_dump({"model": {"architecture": width_shift(shift=2), "use_leffa_loss": False,
                                                "conditioning": "tryon"}}))
    args = [*fit_args(shards, tmp_path, steps=2), "--config", str(config), "--trainer.callbacks=[]",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={tmp_path / 'ck'}", "--trainer.callbacks.save_last=true"]
    cli_main(args)
    checkpoint = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["architecture"] == {"class_path": CLASS_PATH, "init_args": {"shift": 2}}
    assert {k.split(".")[0] for k in checkpoint["state_dict"]} == {"unet", "vae"}
    # resumed with the same config: it goes on; with another of its own arguments: one line
    cli_main([*args[:args.index("--trainer.max_steps=2")], "--trainer.max_steps=3",
              *args[args.index("--trainer.max_steps=2") + 1:], f"--ckpt_path={tmp_path / 'ck' / 'last.ckpt'}"])
    refused(capsys, [*args, "--model.architecture.shift=3", f"--ckpt_path={tmp_path / 'ck' / 'last.ckpt'}"],
            "model.architecture.init_args.shift: 2 in the checkpoint, 3 given")
    # the checkpoint rebuilds the module and exports to the architecture's own folders
    back = LeffaModule.from_checkpoint(tmp_path / "ck" / "last.ckpt")
    assert isinstance(back.denoiser, WidthShiftUNet) and back.denoiser.shift == 2
    cli_main(["export", "--ckpt", str(tmp_path / "ck" / "last.ckpt"), "--out", str(tmp_path / "export")])
    recorded = json.loads((tmp_path / "export" / "leffa.json").read_text())
    assert recorded["export_folders"] == {"unet": "unet", "vae": "vae"}
    exported = LeffaModule.from_checkpoint(tmp_path / "export")
    for key, value in back.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], value)
    # and leffa predict samples it
    out = tmp_path / "predictions"
    cli_main(["predict", "--config", str(Path("configs/tiny_synthetic.yaml").resolve()), "--config", str(config),
              f"--model.init_from={tmp_path / 'export'}", "--model.sampling.num_steps=2",
              "--trainer.callbacks+=leffa.callbacks.ImageWriter", f"--trainer.callbacks.output_dir={out}",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", f"--data.predict_shards={shards}",
              "--data.height=64", "--data.width=48", "--data.num_workers=0"])
    assert len(list(out.glob("*.png"))) == 8


def test_an_argument_of_another_architecture_is_one_parser_line(shards, tmp_path, capsys):
    refused(capsys, [*fit_args(shards, tmp_path), "--model.architecture=ConcatUNet",
                     "--model.architecture.num_registers=2"],
            "model.architecture: leffa.architectures.ConcatUNet does not take num_registers")
    refused(capsys, [*fit_args(shards, tmp_path), f"--model.architecture={CLASS_PATH}",
                     "--model.architecture.freeze_reference_unet=true"],
            f"model.architecture: {CLASS_PATH} does not take freeze_reference_unet")
    refused(capsys, [*fit_args(shards, tmp_path), "--model.architecture=DualUNet",
                     "--model.architecture.num_registers=two"],
            "model.architecture.init_args.num_registers of leffa.architectures.DualUNet: Expected a <class 'int'>, "
            "got two")


def test_the_paper_architecture_keeps_its_checkpoint_names(tiny_configs):
    module = LeffaModule(**tiny_configs)
    assert isinstance(module.denoiser, DualUNet) and module.bank is module.denoiser.bank
    prefixes = {name.split(".")[0] for name in module.state_dict()}
    assert prefixes == {"generative_unet", "reference_unet", "vae"}
    assert module.generative_unet is module.denoiser.generative_unet
    assert module.hparams.architecture == {
        "class_path": "leffa.architectures.dual_unet.DualUNet",
        "init_args": {"num_registers": 0, "freeze_reference_unet": False, "reference_pretrained_model": None}}


@pytest.mark.parametrize("spec, message", [
    ("dual_transformer", "model.architecture: unknown 'dual_transformer'; valid: dual_unet, concat_unet"),
    ({"class_path": "os.path.join"}, "os.path.join is not a leffa.architectures.ReferenceDenoiser subclass"),
    ({"class_path": "no_such_package.Model"}, "cannot import no_such_package.Model"),
    ({"class_path": "dual_unet", "init_args": {"registers": 2}}, "DualUNet does not take registers (it takes "
                                                                  "num_registers, freeze_reference_unet"),
    ({"class_path": "dual_unet", "args": {}}, "class_path and init_args (not args)"),
])
def test_a_bad_architecture_is_one_line_naming_the_key(tiny_configs, spec, message):
    with pytest.raises(UserError) as error:
        LeffaModule(**tiny_configs, architecture=spec)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_old_checkpoints_keep_the_dual_unet_arguments_at_the_top_level():
    old = {"architecture": "dual_unet", "num_registers": 2, "freeze_reference_unet": True,
           "reference_pretrained_model": None, "conditioning": "tryon"}
    new = upgrade_settings(old)
    assert "num_registers" not in new and new["conditioning"] == "tryon"
    assert architecture_record(new["architecture"]) == {
        "class_path": "leffa.architectures.dual_unet.DualUNet",
        "init_args": {"num_registers": 2, "freeze_reference_unet": True, "reference_pretrained_model": None}}
    # a concat_unet checkpoint held them at their defaults
    assert upgrade_settings({"architecture": "concat_unet", "num_registers": 0}) == {"architecture": "concat_unet"}


def test_what_two_runs_must_agree_on():
    record = architecture_record({"class_path": "dual_unet",
                                  "init_args": {"num_registers": 2, "reference_pretrained_model": "/here"}})
    # a resume: every own argument but where files lie on this machine
    assert comparable_record(record, fitting=True)["init_args"] == {"num_registers": 2, "freeze_reference_unet": False}
    # validate, test, predict: what the weights are
    assert comparable_record(record, fitting=False)["init_args"] == {"num_registers": 2}
    assert comparable_record("dual_unet", fitting=False) == comparable_record(
        {"class_path": "leffa.architectures.DualUNet"}, fitting=False)
