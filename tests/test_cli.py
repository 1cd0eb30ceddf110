"""The ``leffa`` command on the tiny config: the real code path, end to end, on CPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_runs import CONFIG, ROOT, fit_args

from leffa.cli import cli_main


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """One ``leffa fit`` of 4 steps (validation at steps 2 and 4), shared by the tests that need a
    trained run; they only read it. Returns the run folder."""
    root = tmp_path_factory.mktemp("train")
    cli_main(fit_args(shards, root, steps=4))
    return root / "tiny_synthetic" / "version_0"


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_fit_on_the_tiny_config_writes_logs_checkpoints_samples_and_config(trained):
    run = trained
    assert (run / "config.yaml").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_000002.png", "step_000004.png"]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert checkpoint["hyper_parameters"]["use_leffa_loss"] is True
    # the architecture travels with the checkpoint, read from the config's model files
    assert checkpoint["hyper_parameters"]["unet_config"]["block_out_channels"] == [32, 64, 64, 64]


def test_next_stage_starts_from_the_previous_stage_weights(trained):
    previous = trained / "checkpoints" / "last.ckpt"
    from leffa.module import LeffaModule

    stage2 = LeffaModule(unet_config=ROOT / "configs/model/tiny_unet.yaml",
                         vae_config=ROOT / "configs/model/tiny_vae.yaml",
                         conditioning="released", init_from=str(previous))
    weights = torch.load(previous, weights_only=True)["state_dict"]
    torch.testing.assert_close(stage2.state_dict()["generative_unet.conv_in.weight"],
                               weights["generative_unet.conv_in.weight"])


@pytest.mark.slow
def test_console_script_exits_zero_and_bad_values_fail_with_the_key(tmp_path):
    leffa = Path(sys.executable).parent / "leffa"
    ok = subprocess.run([leffa, "fit", "--config", CONFIG, "--print_config"], capture_output=True, text=True)
    assert ok.returncode == 0 and "use_leffa_loss: true" in ok.stdout
    bad = subprocess.run([leffa, "fit", "--config", CONFIG, "--model.tau=warm", "--print_config"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "model.tau" in bad.stderr


@pytest.mark.slow
def test_config_bases_env_interpolation_and_missing_variables(tmp_path, monkeypatch):
    from leffa.lightning_cli import expand_bases

    (tmp_path / "model").mkdir()
    (tmp_path / "base.yaml").write_text(
        "trainer:\n  max_steps: 3\n  precision: bf16-mixed\n  default_root_dir: ${oc.env:LEFFA_TEST_RUNS,runs}/a\n"
        "model:\n  lambda_leffa: 0.5\n")
    (tmp_path / "stage.yaml").write_text("base: base.yaml\ntrainer:\n  max_steps: 7\nmodel:\n  use_leffa_loss: true\n")
    assert expand_bases(["fit", "--config", str(tmp_path / "stage.yaml")]) == [
        "fit", f"--config={tmp_path / 'base.yaml'}", f"--config={tmp_path / 'stage.yaml'}"]
    leffa = Path(sys.executable).parent / "leffa"
    run = lambda *a, **env: subprocess.run([leffa, "fit", *a, "--print_config"], capture_output=True, text=True,
                                           env={**__import__("os").environ, **env})
    out = run("--config", tmp_path / "stage.yaml", LEFFA_TEST_RUNS="/somewhere")
    assert out.returncode == 0, out.stderr
    for line in ("max_steps: 7", "precision: bf16-mixed", "lambda_leffa: 0.5", "use_leffa_loss: true",
                 "default_root_dir: /somewhere/a"):
        assert line in out.stdout
    (tmp_path / "needs.yaml").write_text("model:\n  pretrained_model: ${oc.env:LEFFA_TEST_UNSET}\n")
    missing = run("--config", tmp_path / "needs.yaml")
    assert missing.returncode != 0 and "LEFFA_TEST_UNSET" in missing.stderr.strip().splitlines()[-1]
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        expand_bases(["fit", "--config", str(tmp_path / "loop.yaml")])


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_predict_writes_an_image_per_sample_and_the_settings(shards, trained, tmp_path):
    import json

    from PIL import Image

    ckpt = trained / "checkpoints" / "last.ckpt"
    out = tmp_path / "predictions"
    cli_main([
        "predict", "--config", str(CONFIG), f"--model.init_from={ckpt}",
        "--model.sampling.num_steps=2", "--model.sampling.guidance_scale=2.0",
        "--trainer.callbacks+=leffa.callbacks.ImageWriter", f"--trainer.callbacks.output_dir={out}",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
        f"--data.predict_shards={shards}", "--data.height=64", "--data.width=48", "--data.num_workers=0",
        "--data.val_batch_size=3",
    ])
    images = sorted(out.glob("*.png"))
    assert len(images) == 8  # the 8 test samples, each once
    assert all(p.stem.startswith("synthetic_test_") for p in images)
    assert Image.open(images[0]).size == (48, 64)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["sampling"]["num_steps"] == 2 and settings["sampling"]["guidance_scale"] == 2.0


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_visualize_writes_a_picture_per_leffa_layer(shards, trained, tmp_path):
    from PIL import Image

    from leffa.visualize import visualize_main

    run = trained
    # the FlowPictures callback of the tiny config drew the validation flows too
    assert len(list((run / "flows" / "step_000002").glob("*.png"))) == 6
    written = visualize_main(["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--shards", f"{shards}@test",
                              "--out", str(tmp_path / "pictures"), "--num-samples", "2",
                              "--height", "64", "--width", "48"])
    # the tiny UNet at 64x48: token grids 8x6 and 4x3 pass theta_resolution 1/32, 2x2 does not
    assert len(written) == 6
    width, height = Image.open(written[0]).size
    # 8 columns (target, reference, flow, the synthetic shards' ground-truth flow, warped, 3 query points), 2 rows
    assert (width, height) == (8 * 48 + 9 * 2, 2 * 64 + 3 * 2)


@pytest.mark.slow
def test_export_command_then_predict_settings_from_the_folder(shards, trained, tmp_path):
    from leffa.export import load_exported

    ckpt = trained / "checkpoints" / "last.ckpt"
    subprocess.run([Path(sys.executable).parent / "leffa", "export", "--ckpt", ckpt, "--out", tmp_path / "x"],
                   check=True, capture_output=True)
    module = load_exported(tmp_path / "x")
    weights = torch.load(ckpt, weights_only=True)["state_dict"]
    for key in ("generative_unet.conv_in.weight", "reference_unet.conv_out.weight"):
        torch.testing.assert_close(module.state_dict()[key], weights[key])
    assert module.hparams.conditioning == "released" and module.hparams.use_leffa_loss is True
    # leffa predict reads the folder: architecture from it, weights from it
    out = tmp_path / "predictions"
    cli_main([
        "predict", "--config", str(CONFIG), "--model.unet_config=null", "--model.vae_config=null",
        f"--model.pretrained_model={tmp_path / 'x'}", "--model.architecture=DualUNet",
        f"--model.architecture.reference_pretrained_model={tmp_path / 'x' / 'reference_unet'}",
        f"--model.init_from={tmp_path / 'x'}", "--model.sampling.num_steps=2",
        "--trainer.callbacks+=leffa.callbacks.ImageWriter", f"--trainer.callbacks.output_dir={out}",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
        f"--data.predict_shards={shards}", "--data.height=64", "--data.width=48", "--data.num_workers=0",
    ])
    assert len(list(out.glob("*.png"))) == 8
