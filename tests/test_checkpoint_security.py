"""Checkpoints from users' hands: crafted payloads never run, every form loads through one loader,
and a missing or broken checkpoint is one line naming its path, through every entry point that
takes a weights path (``model.init_from``, ``--ckpt_path``, ``leffa export``, ``leffa visualize``,
``leffa predict``)."""

import os
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import save_file

from leffa.checkpoints import read_state_dict
from leffa.cli import cli_main
from leffa.errors import UserError
from leffa.export import load_exported
from leffa.module import LeffaModule
from leffa.testing import TINY_UNET, TINY_VAE, batch_loader

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_synthetic.yaml"
SETTINGS = dict(unet_config=dict(TINY_UNET), vae_config=dict(TINY_VAE),
                architecture=dict(class_path="dual_unet", init_args=dict(num_registers=1)))


# ---------------------------------------------------------------- checkpoints of every form

def tiny_module() -> LeffaModule:
    torch.manual_seed(0)
    return LeffaModule(**SETTINGS)


def write_sharded_folder(path: Path, module: LeffaModule) -> Path:
    """A sharded checkpoint folder as ModelParallelStrategy writes it (index, shards, meta.pt), in one process."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"state_dict": module.state_dict()}, checkpoint_id=path, no_dist=True)
    torch.save({"global_step": 1, "hyper_parameters": dict(module.hparams)}, path / "meta.pt")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A module and its checkpoints: Lightning's .ckpt (one step, EMA off) and a sharded folder."""
    root = tmp_path_factory.mktemp("trained")
    module = tiny_module()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, train_dataloaders=batch_loader())
    trainer.save_checkpoint(root / "last.ckpt")
    write_sharded_folder(root / "sharded", module)
    return module, root / "last.ckpt", root / "sharded"


def same_weights(module: LeffaModule, expected: dict) -> bool:
    own = module.state_dict()
    return own.keys() == expected.keys() and all(torch.equal(own[k], expected[k]) for k in expected)


# ---------------------------------------------------------------- crafted payloads

def _unicode(text: str) -> bytes:
    data = text.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data


def index_payload(marker: Path, opcode: str) -> bytes:
    """A shard index (pickle protocol 4) that calls os.system through a dotted name of a module the
    index itself comes from: STACK_GLOBAL / GLOBAL resolve "os.system" as an attribute path."""
    if opcode == "STACK_GLOBAL":
        callable_ = _unicode("torch.distributed.checkpoint.filesystem") + _unicode("os.system") + pickle.STACK_GLOBAL
    else:
        callable_ = pickle.GLOBAL + b"torch.distributed.checkpoint.metadata\nos.system\n"
    return (pickle.PROTO + b"\x04" + callable_ + _unicode(f"touch {marker}") + pickle.TUPLE1 + pickle.REDUCE
            + pickle.STOP)


class RunsCode:
    """Pickles as a call of os.system (what a hostile .ckpt / .pth holds)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(params=["STACK_GLOBAL", "GLOBAL", "ckpt"])
def crafted(request, trained, tmp_path):
    """(hostile checkpoint, marker file that exists if its code ran): a real sharded folder whose
    index is a dotted-name payload, or a torch.save'd checkpoint holding a call of os.system."""
    module, _, _ = trained
    marker = tmp_path / "ran"
    if request.param == "ckpt":
        path = tmp_path / "hostile.ckpt"
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"tau": RunsCode(marker)}}, path)
    else:
        path = write_sharded_folder(tmp_path / "hostile", module)
        (path / ".metadata").write_bytes(index_payload(marker, request.param))
    return path, marker


def assert_one_line_exit(capsys, error: pytest.ExceptionInfo, path: Path) -> str:
    assert error.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(path) in err
    return err


# ---------------------------------------------------------------- point 1: crafted payloads never run

@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_init_from_refuses_a_crafted_checkpoint_without_running_it(crafted):
    path, marker = crafted
    with pytest.raises(UserError, match="refusing") as error:
        LeffaModule(**SETTINGS, init_from=str(path), init_from_weights="live")
    assert not marker.exists()
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("command", ["export", "visualize"])
def test_export_and_visualize_refuse_a_crafted_checkpoint(command, crafted, tmp_path, capsys):
    path, marker = crafted
    args = ["--ckpt", str(path), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as error:
        cli_main([command, *args] + (["--shards", str(tmp_path / "none")] if command == "visualize" else []))
    assert "refusing" in assert_one_line_exit(capsys, error, path)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_predict_init_from_refuses_a_crafted_checkpoint(crafted, shards, tmp_path, capsys):
    path, marker = crafted
    with pytest.raises(SystemExit) as error:
        cli_main(["predict", "--config", str(CONFIG), f"--model.init_from={path}", "--trainer.logger=false",
                  f"--trainer.default_root_dir={tmp_path}", f"--data.predict_shards={shards}",
                  "--data.height=64", "--data.width=48", "--data.num_workers=0"])
    assert_one_line_exit(capsys, error, path)
    assert not marker.exists()


def test_fit_ckpt_path_refuses_a_crafted_checkpoint(crafted, shards, tmp_path, capsys):
    path, marker = crafted
    with pytest.raises(SystemExit) as error:
        cli_main(["fit", "--config", str(CONFIG), f"--ckpt_path={path}", "--trainer.max_steps=1",
                  f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                  f"--data.train_shards={shards}", f"--data.val_shards={shards}", "--data.height=64",
                  "--data.width=48", "--data.batch_size=2", "--data.num_workers=0"])
    assert_one_line_exit(capsys, error, path)
    assert not marker.exists()


def test_ckpt_path_under_a_sharded_strategy_checks_the_index_before_torch_reads_it(trained, tmp_path,
                                                                                   own_process_group):
    # torch.distributed.checkpoint would pickle.load this index itself when the Trainer resumes from it
    from lightning.pytorch.strategies import ModelParallelStrategy

    module, _, _ = trained
    folder = write_sharded_folder(tmp_path / "hostile", module)
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(index_payload(marker, "STACK_GLOBAL"))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=tmp_path,
                        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    with pytest.raises(UserError, match="refusing.*os.system"):
        trainer.fit(tiny_module(), train_dataloaders=batch_loader(), ckpt_path=folder)
    assert not marker.exists()


def test_ckpt_path_file_is_read_weights_only_whatever_the_environment(tmp_path, monkeypatch):
    # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD (or the Trainer's weights_only=False) would unpickle anything
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker, path = tmp_path / "ran", tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {}, "loops": RunsCode(marker)}, path)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(UserError, match="refusing.*system"):
        trainer.fit(tiny_module(), train_dataloaders=batch_loader(), ckpt_path=path, weights_only=False)
    assert not marker.exists()


def test_shard_index_naming_a_file_outside_its_folder_is_refused(trained, tmp_path):
    from leffa.checkpoints import _read_shard_index

    module, _, _ = trained
    folder = write_sharded_folder(tmp_path / "sharded", module)
    index = _read_shard_index(folder)
    for info in index.storage_data.values():
        info.relative_path = "../../outside.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(index))
    with pytest.raises(UserError, match="outside.distcp.*not a file of this folder"):
        read_state_dict(folder, "live")


# ---------------------------------------------------------------- point 11: one loader for every form

@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_one_loader_for_every_form_with_settings(trained, tmp_path):
    from leffa.checkpoints import read_settings
    from leffa.module import LeffaModule

    module, ckpt, sharded = trained
    expected = module.state_dict()
    from_ckpt = LeffaModule.from_checkpoint(ckpt)
    with pytest.warns(UserWarning, match="no EMA weights"):
        from_folder = LeffaModule.from_checkpoint(sharded)
    assert same_weights(from_ckpt, expected) and same_weights(from_folder, expected)
    assert from_folder.hparams.architecture["init_args"]["num_registers"] == 1
    assert from_folder.hparams.init_from == str(sharded)
    cli_main(["export", "--ckpt", str(sharded), "--weights", "live", "--out", str(tmp_path / "export")])
    assert same_weights(LeffaModule.from_checkpoint(tmp_path / "export"), expected)
    assert same_weights(load_exported(tmp_path / "export", use_leffa_loss=True), expected)
    assert read_settings(tmp_path / "export")["architecture"]["init_args"]["num_registers"] == 1


def test_weights_only_forms_say_to_use_init_from(trained, tmp_path, capsys):
    from leffa.module import LeffaModule

    module, _, _ = trained
    released = tmp_path / "virtual_tryon.pth"
    torch.save({"unet.conv_in.weight": torch.zeros(1), "unet_encoder.conv_in.weight": torch.zeros(1)}, released)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(weights))
    for path in (released, weights):
        with pytest.raises(UserError, match="weights only.*model.init_from"):
            LeffaModule.from_checkpoint(path)
        with pytest.raises(SystemExit) as error:
            cli_main(["export", "--ckpt", str(path), "--out", str(tmp_path / "out")])
        assert "model.init_from" in assert_one_line_exit(capsys, error, path)
    # as model.init_from with a config they load
    assert same_weights(LeffaModule(**SETTINGS, init_from=str(weights)), module.state_dict())


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_export_and_visualize_read_a_sharded_folder(trained, shards, tmp_path):
    from leffa.visualize import visualize_main

    module, _, sharded = trained
    with pytest.warns(UserWarning, match="no EMA weights"):
        cli_main(["export", "--ckpt", str(sharded), "--out", str(tmp_path / "export")])
    assert same_weights(load_exported(tmp_path / "export"), module.state_dict())
    written = visualize_main(["--ckpt", str(sharded), "--weights", "live", "--shards", f"{shards}@test",
                              "--out", str(tmp_path / "pictures"), "--num-samples", "1",
                              "--height", "64", "--width", "48"])
    assert written and all(p.is_file() for p in written)


def test_export_never_writes_into_a_folder_that_holds_something(trained, tmp_path, capsys):
    _, ckpt, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(SystemExit) as error:
        cli_main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    assert_one_line_exit(capsys, error, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------- point 15: one line naming the path

@pytest.fixture(params=["missing", "truncated", "empty folder", "other folder", "truncated index"])
def broken(request, trained, tmp_path):
    module, ckpt, _ = trained
    path = tmp_path / request.param.replace(" ", "_")
    if request.param == "truncated":
        data = ckpt.read_bytes()
        path = path.with_suffix(".ckpt")
        path.write_bytes(data[: len(data) // 2])
    elif request.param == "empty folder":
        path.mkdir()
    elif request.param == "other folder":
        path.mkdir()
        (path / "notes.txt").write_text("not a checkpoint")
    elif request.param == "truncated index":
        write_sharded_folder(path, module)
        index = (path / ".metadata").read_bytes()
        (path / ".metadata").write_bytes(index[: len(index) // 2])
    return path


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_a_missing_or_broken_checkpoint_is_one_line_naming_it(broken, tmp_path, capsys):
    with pytest.raises(UserError) as error:
        LeffaModule(**SETTINGS, init_from=str(broken))
    assert str(broken) in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(SystemExit) as error:
        cli_main(["export", "--ckpt", str(broken), "--out", str(tmp_path / "out")])
    assert_one_line_exit(capsys, error, broken)
    assert not (tmp_path / "out").exists()
