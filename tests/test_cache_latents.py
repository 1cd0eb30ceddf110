"""Cached latents (issue 21): ``leffa cache-latents`` writes the VAE posterior moments beside every
member of the source shards; ``data.latents: true`` reads them and the module skips the VAE, with
the loss of the uncached path; mismatches (size, VAE, conditioning), ``data.hflip`` and a
non-empty ``--out`` are one error line."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from one_line_errors import refused
from tiny_runs import CONFIG, ROOT

from data_prep.synthetic_shards import synthetic_sample, write_samples
from leffa.cache_latents import cache_latents_main
from leffa.cli import cli_main
from leffa.data import LeffaDataModule, to_model_batch
from leffa.data.batch import Collate
from leffa.data.decode import decode_sample
from leffa.data.latents import moment_member, vae_fingerprint
from leffa.data.skips import SkipCounter
from leffa.data.tar_samples import read_samples
from leffa.data.transforms import resize_sample
from leffa.errors import UserError
from leffa.module import LeffaModule
from leffa.pretrained import load_vae_folder
from leffa.stage_checks import check_latent_cache

TINY_VAE = ROOT / "assets" / "tiny_vae_synthetic"
# the model of configs/tiny_synthetic.yaml (conditioning released: the reference and masked-image
# latents are posterior samples, the hardest case for an exact cache)
TINY_MODEL = dict(unet_config=str(ROOT / "configs" / "model" / "tiny_unet.yaml"), vae_pretrained=str(TINY_VAE),
                  conditioning="released", use_leffa_loss=True, lambda_leffa=0.1)


def data_args(shards) -> list[str]:
    return [f"--data.train_shards={shards}", f"--data.val_shards={shards}", "--data.height=64", "--data.width=48",
            "--data.batch_size=2", "--data.num_workers=0"]


def cache(shards, out: Path, *extra: str) -> dict:
    return cache_latents_main(["--config", str(CONFIG), "--out", str(out), *data_args(shards), *extra])


@pytest.fixture(scope="module")
def cached(shards, tmp_path_factory):
    """The tiny config's latents (released layout) of the 8 + 8 synthetic samples: (folder, manifest)."""
    out = tmp_path_factory.mktemp("cache") / "latents"
    return out, cache(shards, out)


def members(shard: Path) -> list[dict]:
    return list(read_samples(str(shard), 0, None, handler=lambda error: False))



@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_cache_keeps_every_member_and_adds_the_vae_moments(shards, cached):
    out, manifest = cached
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test-000000.tar", "test-000001.tar",
                                                     "train-000000.tar", "train-000001.tar"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    vae = load_vae_folder(TINY_VAE)
    images = ("tgt", "ref", "masked")
    for split in ("train", "test"):
        for i in range(2):
            source, written = members(Path(shards) / f"{split}-{i:06d}.tar"), members(out / f"{split}-{i:06d}.tar")
            assert [s["__key__"] for s in written] == [s["__key__"] for s in source]
            for src, new in zip(source, written):  # every source member, byte for byte, plus the moments
                latent = {moment_member(image, m) for image in images for m in ("mean", "std")}
                assert set(new) - {"__url__"} == set(src) - {"__url__"} | latent
                assert all(new[k] == src[k] for k in src if k != "__url__")
    # the moments are the VAE's on the images as training decodes and resizes them; the masked
    # image by the layout's rule
    source = members(Path(shards) / "train-000000.tar")
    batch = to_model_batch(Collate(SkipCounter())([resize_sample(decode_sample(r, (64, 48)), 64, 48) for r in source]))
    written = members(out / "train-000000.tar")
    with torch.no_grad():
        for image, pixels in (("tgt", batch["tgt"]), ("ref", batch["ref"]), ("masked", batch["tgt"] * (1 - batch["mask"]))):
            posterior = vae.encode(pixels).latent_dist
            for moment, expected in (("mean", posterior.mean), ("std", posterior.std)):
                stored = np.stack([np.load(io.BytesIO(s[moment_member(image, moment)]), allow_pickle=False)
                                   for s in written])
                assert stored.dtype == np.float32 and stored.shape == (4, 4, 8, 6)
                torch.testing.assert_close(torch.from_numpy(stored), expected, atol=1e-5, rtol=1e-5)
    record = manifest["latents"]
    assert record["vae"]["fingerprint"] == vae_fingerprint(vae)
    assert record["vae"]["scaling_factor"] == vae.config.scaling_factor and record["vae"]["downsampling"] == 8
    assert (record["height"], record["width"], record["latent_shape"]) == (64, 48, [4, 8, 6])
    assert record["conditioning"] == "released" and record["images"] == list(images)
    train = manifest["splits"]["train"]
    assert [s["path"] for s in train["source_shards"]] == [str(Path(shards, f"train-{i:06d}.tar").resolve())
                                                           for i in range(2)]
    assert (train["num_samples_in"], train["num_written"], train["num_skipped"]) == (8, 8, 0)
    assert [s["name"] for s in train["shards"]] == ["train-000000.tar", "train-000001.tar"]
    assert manifest["dataset"] == "synthetic" and manifest["schema_version"] == 1


def batches(spec: str, latents: bool) -> dict:
    data = LeffaDataModule(train_shards=spec, height=64, width=48, batch_size=4, num_workers=0, shuffle_buffer=0,
                           latents=latents)
    data.setup("fit")
    return to_model_batch(next(iter(data.train_dataloader())))


def loss_and_grads(module: LeffaModule, batch: dict) -> tuple[torch.Tensor, dict]:
    module.zero_grad()
    loss, metrics = module.compute_loss(batch, torch.Generator().manual_seed(1), train=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def same_loss_cached_and_not(module: LeffaModule, source: str, cache_spec: str) -> None:
    plain, fast = batches(source, False), batches(cache_spec, True)
    assert fast["key"] == plain["key"] and "moments" not in plain
    loss, grads = loss_and_grads(module, plain)

    def no_vae(*args, **kwargs):
        raise AssertionError("the VAE ran on cached latents")

    encode, module.vae.encode = module.vae.encode, no_vae
    try:
        cached_loss, cached_grads = loss_and_grads(module, fast)
    finally:
        module.vae.encode = encode
    torch.testing.assert_close(cached_loss, loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == cached_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(cached_grads[name], grads[name], atol=1e-5, rtol=1e-4)


def test_cached_latents_give_the_uncached_loss_and_gradients(shards, cached):
    torch.manual_seed(0)
    module = LeffaModule(**TINY_MODEL)
    same_loss_cached_and_not(module, str(shards), str(cached[0]))


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
@pytest.mark.parametrize("layout", ["tryon", "pose"])
def test_cached_latents_of_the_other_encoding_layouts(shards, tmp_path, layout):
    """tryon: the masked image at the posterior mode; pose: the DensePose latent."""
    manifest = cache(shards, tmp_path / "latents", f"--model.conditioning={layout}", "--data.val_shards=null")
    assert manifest["latents"]["images"] == ["tgt", "ref", "masked" if layout == "tryon" else "densepose"]
    assert list(manifest["splits"]) == ["train"]
    torch.manual_seed(0)
    module = LeffaModule(**{**TINY_MODEL, "conditioning": layout})
    same_loss_cached_and_not(module, str(shards), str(tmp_path / "latents"))


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_two_fit_steps_log_the_same_losses_on_cached_and_source_shards(shards, cached, tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("trainer:\n  callbacks: null\n  enable_checkpointing: false\n  enable_progress_bar: false\n"
                       "  log_every_n_steps: 1\n  limit_val_batches: 1\n  val_check_interval: 2\n"
                       "data:\n  shuffle_buffer: 0\n")
    logged = {}
    for name, extra in (("source", []), ("cached", [f"--data.train_shards={cached[0]}@train",
                                                    f"--data.val_shards={cached[0]}@test", "--data.latents=true"])):
        root = tmp_path / name
        cli_main(["fit", "--config", str(CONFIG), "--config", str(overlay), *data_args(shards), *extra,
                  "--trainer.max_steps=2", f"--trainer.default_root_dir={root}",
                  "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={root}"])
        rows = next(root.rglob("metrics.csv")).read_text().splitlines()
        header = rows[0].split(",")
        logged[name] = [{k: float(v) for k, v in zip(header, row.split(",")) if v and k.startswith(("train/", "val/"))}
                        for row in rows[1:]]
    train_losses = [row["train/loss"] for row in logged["source"] if "train/loss" in row]
    assert len(train_losses) == 2 and any("val/loss" in row for row in logged["source"])
    assert len(logged["cached"]) == len(logged["source"])
    for plain, fast in zip(logged["source"], logged["cached"]):
        assert plain.keys() == fast.keys()
        for key in plain:
            assert fast[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key  # float tolerance


def fit_on_cache(shards, cached, *extra: str) -> list[str]:
    return ["fit", "--config", str(CONFIG), *data_args(shards), f"--data.train_shards={cached[0]}@train",
            f"--data.val_shards={cached[0]}@test", "--data.latents=true", "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0", "--trainer.logger=false", *extra]  # nothing under ./demo_out


def test_latents_of_another_size_are_one_line(capsys, shards, cached):
    refused(capsys, fit_on_cache(shards, cached, "--data.height=32", "--data.width=24"), "cached at 64x48", "32x24")
    with pytest.raises(UserError, match="cached at 64x48"):
        LeffaDataModule(train_shards=str(cached[0]), height=128, width=96, latents=True).setup("fit")


def test_latents_of_another_vae_are_one_line_before_training(capsys, shards, cached, tmp_path):
    line = refused(capsys, fit_on_cache(shards, cached, "--model.vae_pretrained=null",
                                        f"--model.vae_config={ROOT / 'configs' / 'model' / 'tiny_vae.yaml'}",
                                        f"--trainer.default_root_dir={tmp_path}"),
                   "another VAE", cached[1]["latents"]["vae"]["fingerprint"][:19])
    assert "leffa cache-latents" in line
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
def test_a_conditioning_whose_images_the_cache_lacks_is_one_line(capsys, shards, cached, tmp_path):
    # the released layout's cache has no DensePose latent; pose_image needs none and is accepted
    refused(capsys, fit_on_cache(shards, cached, "--model.conditioning=pose", f"--trainer.default_root_dir={tmp_path}"),
            "model.conditioning released", "also encodes densepose")
    check_latent_cache(LeffaModule(**{**TINY_MODEL, "conditioning": "pose_image"}),
                       {**cached[1]["latents"], "folder": str(cached[0])})


def test_uncached_validation_shards_with_latents_are_one_line(capsys, shards, cached):
    refused(capsys, fit_on_cache(shards, cached, f"--data.val_shards={shards}"), "no cached latents",
            "data.val_shards")


def test_hflip_with_cached_latents_is_refused(capsys, shards, cached, tmp_path):
    refused(capsys, fit_on_cache(shards, cached, "--data.hflip=true"), "data.hflip with data.latents")
    with pytest.raises(UserError, match="data.hflip with data.latents"):
        LeffaDataModule(train_shards=str(cached[0]), latents=True, hflip=True)
    refused(capsys, ["cache-latents", "--config", str(CONFIG), "--out", str(tmp_path / "new"), *data_args(shards),
                     "--data.hflip=true"], "data.hflip")
    assert not (tmp_path / "new").exists()


def test_a_non_empty_out_is_refused_and_left_as_it_was(capsys, shards, cached):
    out = cached[0]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    refused(capsys, ["cache-latents", "--config", str(CONFIG), "--out", str(out), *data_args(shards)],
            f"--out {out} already exists and is not empty")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_corrupt_sample_is_skipped_and_listed(tmp_path):
    samples = [synthetic_sample(i, height=64, width=48) for i in range(3)]
    samples[1]["tgt.jpg"] = b"not a jpeg"
    write_samples(tmp_path / "src", "train", samples, shard_size=3)
    manifest = cache_latents_main(["--config", str(CONFIG), "--out", str(tmp_path / "latents"),
                                   f"--data.train_shards={tmp_path / 'src'}", "--data.val_shards=null",
                                   "--data.height=64", "--data.width=48", "--data.num_workers=0", "--batch-size=1"])
    train = manifest["splits"]["train"]
    assert (train["num_samples_in"], train["num_written"], train["num_skipped"]) == (3, 2, 1)
    assert [s["key"] for s in manifest["skipped"]] == [samples[1]["__key__"]]
    written = members(tmp_path / "latents" / "train-000000.tar")
    assert [s["__key__"] for s in written] == [samples[0]["__key__"], samples[2]["__key__"]]
    with tarfile.open(tmp_path / "latents" / "train-000000.tar") as tar:  # only final names, no temporaries
        assert all(not Path(m.name).name.startswith(".") for m in tar)
    assert sorted(p.name for p in (tmp_path / "latents").iterdir()) == ["manifest.json", "train-000000.tar"]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_write_the_shards_of_one_rank(shards, cached, tmp_path):
    """Lightning's predict loop over 2 CPU processes (gloo): each rank writes its own shards, rank 0
    the manifest; the same files as one process writes."""
    import os
    import subprocess
    import sys

    out = tmp_path / "latents"
    leffa = Path(sys.executable).with_name("leffa")
    subprocess.run([str(leffa), "cache-latents", "--config", str(CONFIG), "--out", str(out), *data_args(shards),
                    "--trainer.devices=2"], check=True, cwd=tmp_path, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    one = cached[0]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one.iterdir())
    for shard in one.glob("*.tar"):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("splits", "latents", "skipped", "dataset"):
        assert manifest[key] == cached[1][key], key
