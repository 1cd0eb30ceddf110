"""User errors at the ``leffa`` command line: one line naming the file or key, exit status 2, no
traceback (``LEFFA_DEBUG=1`` shows it)."""

import subprocess
import sys
from pathlib import Path

import pytest

from leffa.cli import cli_main
from leffa.errors import MissingFileError, UserError, user_errors_as_one_line

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def readable_data(shards) -> list[str]:
    """Shards that pass the data checks, which come before the model is built."""
    return [f"--data.train_shards={shards}", f"--data.val_shards={shards}"]


def test_missing_pretrained_folder_is_one_line_naming_it(capsys, monkeypatch, tmp_path, shards):
    monkeypatch.setenv("LEFFA_SD15", str(tmp_path / "no_sd15"))
    line = one_line_error(capsys, ["fit", "--config", str(CONFIGS / "vton_512.yaml"), *readable_data(shards)])
    assert str(tmp_path / "no_sd15" / "unet" / "config.json") in line


def test_bad_model_value_is_one_line_naming_the_key(capsys, shards):
    line = one_line_error(capsys, ["fit", "--config", str(CONFIGS / "tiny_synthetic.yaml"), "--model.p_drop_ref=2",
                                   *readable_data(shards)])
    assert "model.p_drop_ref" in line


def test_config_base_cycle_is_one_line(capsys, tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    assert "config base cycle" in one_line_error(capsys, ["fit", "--config", str(tmp_path / "a.yaml")])


def test_debug_variable_shows_the_traceback(monkeypatch):
    def fail():
        raise MissingFileError("no such file: x.ckpt")

    monkeypatch.setenv("LEFFA_DEBUG", "1")
    with pytest.raises(MissingFileError):
        user_errors_as_one_line(fail)
    monkeypatch.setenv("LEFFA_DEBUG", "0")
    with pytest.raises(SystemExit):
        user_errors_as_one_line(fail)
    # a bug is not a user error: its traceback stays
    with pytest.raises(ZeroDivisionError):
        user_errors_as_one_line(lambda: 1 / 0)
    assert issubclass(MissingFileError, FileNotFoundError) and issubclass(UserError, ValueError)


@pytest.mark.slow
def test_console_script_prints_one_line_and_exits_2(tmp_path, shards):
    leffa = Path(sys.executable).parent / "leffa"
    result = subprocess.run([leffa, "fit", "--config", str(CONFIGS / "vton_512.yaml"), *readable_data(shards)],
                            capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "LEFFA_SD15": str(tmp_path / "none")})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: no diffusers unet at {tmp_path / 'none'}")
    assert "Traceback" not in result.stderr


def test_help_says_what_leffa_is_and_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Lightning Trainer command line tool" not in out and out.count("leffa") > 1
    for command in ("fit", "validate", "test", "predict", "leffa eval", "leffa export", "leffa visualize"):
        assert command in out
