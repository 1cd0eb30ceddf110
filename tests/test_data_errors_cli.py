"""``leffa fit`` on the tiny config with shards that cannot be used: one line naming the pattern
or folder (exit status 2, no traceback), before training starts."""

from pathlib import Path

import pytest

from data_prep.__main__ import main as data_prep_main
from data_prep.synthetic_shards import synthetic_sample, write_samples
from leffa.cli import cli_main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_synthetic.yaml"


@pytest.fixture(scope="module")
def synthetic_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    data_prep_main(["synthetic", "--out", str(out), "--count", "4", "--split", "all", "--shard-size", "4",
                    "--height", "32", "--width", "24"])
    return str(out)


def _fit_error(capsys, root, train, val, *extra):
    args = ["fit", "--config", str(CONFIG), "--trainer.max_steps=1", "--trainer.val_check_interval=1",
            f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
            f"--data.train_shards={train}", f"--data.val_shards={val}", "--data.height=32", "--data.width=24",
            "--data.batch_size=2", "--data.num_workers=0", *extra]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_a_shard_pattern_that_matches_nothing_is_one_line(capsys, tmp_path, synthetic_shards):
    pattern = str(tmp_path / "nowhere" / "train-*.tar")
    line = _fit_error(capsys, tmp_path, pattern, synthetic_shards)
    assert pattern in line


def test_a_shard_folder_without_densepose_is_one_line_naming_it(capsys, tmp_path, synthetic_shards):
    folder = tmp_path / "no_densepose"
    samples = [synthetic_sample(i, 32, 24) for i in range(4)]
    for sample in samples:
        del sample["densepose.png"]
    write_samples(folder, "train", samples, shard_size=4)
    line = _fit_error(capsys, tmp_path, folder, synthetic_shards)
    assert f"'{folder}'" in line and "densepose.png" in line and "data.train_shards" in line


def test_hflip_on_densepose_shards_is_one_line(capsys, tmp_path, synthetic_shards):
    line = _fit_error(capsys, tmp_path, synthetic_shards, synthetic_shards, "--data.hflip=true")
    assert line.startswith("error: data.hflip:") and "densepose" in line
