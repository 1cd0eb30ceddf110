"""``leffa predict`` with hostile sample keys, a user's config.yaml in the way, and per-sample seeds.

Every test runs the real command on the tiny config (random weights, ``seed_everything: 0``) over
shards made by ``data_prep synthetic``, rewritten here with the keys a test needs.
"""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.__main__ import main as data_prep_main
from leffa.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny_synthetic.yaml"


@pytest.fixture(scope="module")
def test_shard(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    data_prep_main(["synthetic", "--out", str(out), "--count", "4", "--split", "test", "--shard-size", "4",
                    "--height", "64", "--width", "48"])
    return out / "test-000000.tar"


def _samples(shard: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a shard, in its order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, extension = member.name.split(".", 1)
            samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return list(samples.items())


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar shard holding ``samples`` under their (possibly hostile) keys, names taken as given."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for extension, data in files.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def predict(shard: Path, out: Path, root: Path, *extra: str) -> None:
    cli_main([
        "predict", "--config", str(CONFIG), "--model.sampling.num_steps=2", "--model.sampling.guidance_scale=2.0",
        "--trainer.callbacks+=leffa.callbacks.ImageWriter", f"--trainer.callbacks.output_dir={out}",
        f"--trainer.default_root_dir={root}", "--trainer.logger=false",
        f"--data.predict_shards={shard}", "--data.height=64", "--data.width=48", "--data.num_workers=0",
        "--data.val_batch_size=3", *extra,
    ])


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


# -- point 2: keys from data files never become paths outside the output folder -----------------

@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_hostile_keys_are_refused_named_once_and_nothing_leaves_the_output_folder(test_shard, tmp_path):
    work, out = tmp_path / "work", tmp_path / "work" / "out"
    (work / "abs").mkdir(parents=True)
    victim = work / "abs" / "victim"
    samples = [data for _, data in _samples(test_shard)]
    hostile = ["../escape", str(victim), "sub/dir/key", "back\\slash"]
    keys = ["good_0", hostile[0], hostile[1], "good_1", hostile[2], hostile[3]]
    shard = write_shard(tmp_path / "hostile.tar", [(k, samples[i % len(samples)]) for i, k in enumerate(keys)])
    before = _tree(work)

    with pytest.warns(UserWarning) as warned:
        predict(shard, out, work)

    written = sorted(p.name for p in out.iterdir())
    assert written == ["config.yaml", "good_0.png", "good_1.png", "settings.json"]
    after = {k: v for k, v in _tree(work).items() if not k.startswith("out")}
    assert after == before  # nothing outside the output folder was written, moved or changed
    assert not victim.with_suffix(".png").exists() and not (tmp_path / "escape.png").exists()
    refusals = [str(w.message) for w in warned if "ImageWriter refused" in str(w.message)]
    assert len(refusals) == 1 and "4 samples" in refusals[0]
    assert all(repr(key) in refusals[0] for key in hostile)


@pytest.mark.parametrize("key", ["", ".", "..", "../x", "/abs", "a/b", "a\\b", "x\0y", ".hidden", "k" * 201])
def test_unsafe_keys_are_named_with_a_reason(key):
    from leffa.callbacks import unsafe_key_reason

    assert unsafe_key_reason(key)


@pytest.mark.parametrize("key", ["synthetic_test_paired_000000", "00001_00__05006_00", "a.b", "k" * 200])
def test_ordinary_keys_are_safe(key):
    from leffa.callbacks import unsafe_key_reason

    assert unsafe_key_reason(key) is None


# -- point 3: predict never overwrites a config.yaml it did not write ---------------------------

def test_predict_leaves_a_users_config_yaml_alone_and_saves_its_own_beside_the_outputs(
        test_shard, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "config.yaml"
    mine.write_text("mine: true\n")
    out = tmp_path / "out"
    predict(test_shard, out, tmp_path)  # default_root_dir is the current folder, as in the issue
    assert mine.read_text() == "mine: true\n"
    assert "ImageWriter" in (out / "config.yaml").read_text()  # the resolved config, beside the images
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "out"]


def test_predict_refuses_to_overwrite_a_config_yaml_in_the_output_folder(test_shard, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("mine: true\n")
    with pytest.raises(SystemExit) as exit_info:
        predict(test_shard, out, tmp_path)
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(out / "config.yaml") in line
    assert (out / "config.yaml").read_text() == "mine: true\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]  # no image of this run either


# -- point 12: a sample's image depends on its key, not on the batch it came in ------------------

@pytest.mark.slow  # over 10 s on 2 cores: make test runs it, make test-fast does not
def test_a_samples_image_does_not_depend_on_batch_size_or_order(test_shard, tmp_path):
    samples = _samples(test_shard)
    reversed_shard = write_shard(tmp_path / "reversed.tar", samples[::-1])
    # euler_a draws fresh noise at every step too, not only the initial noise
    extra = ("--model.sampling.scheduler=euler_a",)
    predict(test_shard, tmp_path / "bs1", tmp_path, "--data.val_batch_size=1", *extra)
    predict(test_shard, tmp_path / "bs3", tmp_path, "--data.val_batch_size=3", *extra)
    predict(reversed_shard, tmp_path / "bs3_reversed", tmp_path, "--data.val_batch_size=3", *extra)
    predict(test_shard, tmp_path / "seed1", tmp_path, "--data.val_batch_size=1", "--model.sampling.seed=1", *extra)
    keys = [key for key, _ in samples]
    for key in keys:
        one = _pixels(tmp_path / "bs1" / f"{key}.png")
        for run in ("bs3", "bs3_reversed"):
            # the same noise; the 8-bit rounding of tiny float differences may move a value by one
            assert np.abs(one - _pixels(tmp_path / run / f"{key}.png")).max() <= 1, (key, run)
        assert np.abs(one - _pixels(tmp_path / "seed1" / f"{key}.png")).max() > 8  # the seed still matters


def test_the_last_guard_refuses_a_path_that_resolves_outside_the_output_folder(tmp_path):
    from leffa.callbacks import ImageWriter

    out = tmp_path / "out"
    out.mkdir()
    (out / "link.png").symlink_to(tmp_path / "victim.png")  # a safe key whose file leads elsewhere
    writer = ImageWriter(str(out))
    assert writer.image_path("link") is None and "outside" in writer.refused["link"]
    assert writer.image_path("fine") == out.resolve() / "fine.png"
