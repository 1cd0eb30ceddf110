"""`leffa export --format released --base virtual_tryon.pth`: our weights back in the authors' layout."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from released_files import export, released_file, save_ckpt

from leffa.cli import cli_main
from leffa.module import LeffaModule
from leffa.testing import TINY_UNET

CROSS_ATTENTION = ("attn2", "norm2")


def error_line(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(list(map(str, argv)))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "virtual_tryon.pth"
    return path, released_file(path)


def test_round_trip_is_the_base_exactly_and_strictly_loadable(base, tiny_configs, tmp_path):
    path, state = base
    module = LeffaModule(**tiny_configs, conditioning="released", init_from=str(path))
    out = export(save_ckpt(module, tmp_path / "last.ckpt"), path, tmp_path / "model.pth")
    assert list(out) == list(state)  # the same keys, in the same order
    assert any(k.startswith("unet.") and "attn2" in k for k in out)
    for key, value in state.items():
        assert out[key].dtype == value.dtype and torch.equal(out[key], value), key
    # the authors' inference code loads each part with a strict load_state_dict
    UNet2DConditionModel(**{**TINY_UNET, "in_channels": 12}).load_state_dict(
        {k.removeprefix("unet."): v for k, v in out.items() if k.startswith("unet.")}, strict=True)
    UNet2DConditionModel(**TINY_UNET).load_state_dict(
        {k.removeprefix("unet_encoder."): v for k, v in out.items() if k.startswith("unet_encoder.")}, strict=True)


def test_changed_weights_are_ours_and_cross_attention_the_base(base, tiny_configs, tmp_path):
    path, state = base
    module = LeffaModule(**tiny_configs, conditioning="released", init_from=str(path))
    attn1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    with torch.no_grad():
        module.generative_unet.conv_in.weight.add_(0.5)
        module.reference_unet.get_parameter(attn1).mul_(-1)
    out = export(save_ckpt(module, tmp_path / "last.ckpt"), path, tmp_path / "model.pth")
    changed = {"unet.conv_in.weight": module.generative_unet.conv_in.weight,
               f"unet_encoder.{attn1}": module.reference_unet.get_parameter(attn1)}  # fmt: skip
    for key, ours in changed.items():
        assert not torch.equal(out[key], state[key]), key
        assert torch.equal(out[key], ours.detach().to(torch.float16)), key
    for key in state.keys() - changed.keys():
        assert torch.equal(out[key], state[key]), key


def test_refuses_an_existing_out_without_touching_it(base, tiny_configs, tmp_path, capsys):
    path, _ = base
    ckpt = save_ckpt(LeffaModule(**tiny_configs, conditioning="released", init_from=str(path)), tmp_path / "c.ckpt")
    out = tmp_path / "model.pth"
    out.write_bytes(b"mine")
    line = error_line(capsys, "export", "--format", "released", "--base", path, "--ckpt", ckpt, "--out", out)
    assert str(out) in line and "exists" in line
    assert out.read_bytes() == b"mine"
    line = error_line(capsys, "export", "--format", "released", "--ckpt", ckpt, "--out", tmp_path / "new.pth")
    assert "--base" in line and not (tmp_path / "new.pth").exists()


@pytest.mark.parametrize(
    "settings, expected",
    [
        (dict(conditioning="tryon"), "conditioning 'tryon'"),
        (dict(conditioning="released", architecture=dict(class_path="dual_unet", init_args=dict(num_registers=1))),
         "registers"),
    ],
)
def test_refuses_another_conditioning_or_extra_weights(base, tiny_configs, tmp_path, capsys, settings, expected):
    path, _ = base
    ckpt = save_ckpt(LeffaModule(**tiny_configs, **settings), tmp_path / "c.ckpt")
    out = tmp_path / "model.pth"
    line = error_line(capsys, "export", "--format", "released", "--base", path, "--ckpt", ckpt, "--out", out)
    assert expected in line and not out.exists()


def test_refuses_another_architecture_by_shape(tiny_configs, tmp_path, capsys):
    path = tmp_path / "virtual_tryon.pth"
    released_file(path, unet={**TINY_UNET, "block_out_channels": (16, 32)})
    ckpt = save_ckpt(LeffaModule(**tiny_configs, conditioning="released"), tmp_path / "c.ckpt")
    out = tmp_path / "model.pth"
    line = error_line(capsys, "export", "--format", "released", "--base", path, "--ckpt", ckpt, "--out", out)
    assert "shape" in line and "unet.conv_in.weight" in line and not out.exists()
