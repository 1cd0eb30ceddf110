"""The stage configs resolve to the paper's settings (through the real ``leffa`` CLI parser)."""

from pathlib import Path

import pytest
import yaml

from leffa.cli import cli_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def resolved(monkeypatch, capsys, stage: str) -> dict:
    monkeypatch.setenv("LEFFA_SD15", "/nowhere")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(CONFIGS / stage), "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("stage", ["pose_256.yaml", "pose_512.yaml", "pose_512_leffa.yaml"])
def test_pose_stages_condition_on_the_densepose_image_at_latent_size(monkeypatch, capsys, stage):
    # Sec. 3.1: "resize the I_dp to the latent resolution", 3 channels, not its VAE latent
    assert resolved(monkeypatch, capsys, stage)["model"]["conditioning"] == "pose_image"
