"""``leffa cache-latents``: the frozen VAE run once over a stage's shards, its posterior moments
written into new shards beside every member of the source (``leffa.data.latents`` has the format).

    leffa cache-latents --config configs/vton_1024.yaml --out shards/vitonhd_1024_latents
    leffa fit --config configs/vton_1024.yaml --data.train_shards shards/vitonhd_1024_latents@train \\
        --data.val_shards shards/vitonhd_1024_latents@test --data.latents true

The stage's config gives the VAE (the model is built as ``leffa fit`` builds it, ``init_from``
and ``seed_everything`` included, so the fingerprint is the one training checks), the size
(``data.height``, ``data.width``), the conditioning layout (which images a training step encodes:
the target, the reference, the masked image of ``tryon``/``released``, the DensePose image of
``pose``) and the shards: ``data.train_shards`` and ``data.val_shards`` when given, each into
``--out`` under its source's split name (a manifest's split, else ``train``/``val``), source shard
i of a split becoming ``<split>-<i:06d>.tar`` with the same samples in the same order. Images are
decoded and resized exactly as the training pipeline does (no flip: ``data.hflip`` is refused),
the VAE runs in float32. ``--config`` files and ``--model.*``/``--data.*``/``--trainer.*``
overrides are those of ``leffa fit``; of the trainer only ``accelerator``, ``devices`` and
``num_nodes`` are used.

It is Lightning's predict loop (``Trainer.predict``) with a prediction writer, so several devices
split the work: each rank takes every world-size-th source shard (each DataLoader worker every
num_workers-th of those) and writes its own output shards, under temporary names in ``--out``;
when all ranks are done, rank 0 gathers their records, writes the manifest under a temporary name,
renames every shard, then the manifest. ``--out`` must therefore be on a file system that all
ranks share (as checkpoints are). Nothing is written outside ``--out``, and an existing non-empty
``--out`` is refused. A corrupt sample is skipped and listed in the manifest, as the training
pipeline would skip it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, IterableDataset

from leffa.conditioning import encoded_images
from leffa.data.batch import Collate, to_model_batch
from leffa.data.decode import decode_sample
from leffa.data.distributed import node_info, worker_info
from leffa.data.latents import MANIFEST_KEY, MEMBER_PREFIX, MOMENTS, moment_member, npy_bytes, vae_fingerprint
from leffa.data.shards import _split_suffix, resolve_sources
from leffa.data.skips import DATA_ERRORS, SkipCounter
from leffa.data.tar_samples import count_samples, is_local, read_samples
from leffa.data.transforms import resize_sample
from leffa.errors import UserError
from leffa.pretrained import vae_scale_factor
from leffa.vae_encoding import posterior_moments
from leffa.schema import MANIFEST_NAME, SCHEMA_VERSION

__all__ = ["cache_latents_main", "CacheSamples", "LatentEncoder", "LatentShardWriter"]

# the data sources cached, and the split names their data module reads by default
CACHED_SOURCES = {"train": ("train",), "val": ("val", "test")}
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# the trainer settings used: where to run (the rest of a stage's trainer is about training)
TRAINER_KEYS = ("accelerator", "devices", "num_nodes")


class CacheSamples(IterableDataset):
    """Batches of one source shard at a time, for this rank's and DataLoader worker's shards.

    ``work``: ``(split, output name, source path)`` for every source shard, in order; rank r takes
    items r, r + world, ...; worker j of a rank every num_workers-th of those. Each batch is the
    wire batch (``Collate``) of up to ``batch_size`` samples of one shard, decoded and resized as the
    training pipeline does, plus ``raw`` (the samples' members as stored), ``split``, ``shard``
    (the output name), ``source``, ``last`` (the shard's last batch) and ``skips`` (corrupt samples
    met since the previous batch of the shard).
    """

    def __init__(self, work: list[tuple[str, str, str]], height: int, width: int, batch_size: int):
        self.work, self.height, self.width, self.batch_size = work, height, width, batch_size
        self.rank, self.world_size = 0, 1  # set in the main process once the process group exists

    def __iter__(self):
        worker, workers = worker_info()
        for item in self.work[self.rank::self.world_size][worker::workers]:
            yield from self._shard_batches(*item)

    def _shard_batches(self, split: str, name: str, source: str):
        skips: list[dict] = []

        def handler(error: Exception) -> bool:
            skips.append({"key": None, "reason": f"{type(error).__name__}: {error}"})
            return True

        collate = Collate(SkipCounter())
        held, pending = None, []
        size = (self.height, self.width)
        for raw in read_samples(source, 0, None, handler):
            try:
                sample = resize_sample(decode_sample(raw, draft_size=size), *size)
            except DATA_ERRORS as error:
                skips.append({"key": raw.get("__key__"), "reason": f"{type(error).__name__}: {error}"})
                continue
            pending.append((sample, raw))
            if len(pending) == self.batch_size:
                if held is not None:
                    yield self._batch(collate, held, split, name, source, False, skips)
                    skips = []
                held, pending = pending, []
        if pending:
            if held is not None:
                yield self._batch(collate, held, split, name, source, False, skips)
                skips = []
            held = pending
        if held is not None:  # a shard with no readable sample writes nothing (its count is in the manifest)
            yield self._batch(collate, held, split, name, source, True, skips)

    @staticmethod
    def _batch(collate, items, split, name, source, last, skips) -> dict:
        batch = collate([sample for sample, _ in items])
        raw = [{k: v for k, v in r.items() if k != "__url__" and not k.startswith(MEMBER_PREFIX)} for _, r in items]
        return {**batch, "raw": raw, "split": split, "shard": name, "source": source, "last": last,
                "skips": list(skips)}


class LatentEncoder(L.LightningModule):
    """The frozen VAE of a stage, for ``Trainer.predict``: each batch's images that a training step
    of ``conditioning`` encodes (``leffa.conditioning.encoded_images``; the masked image made by
    ``build_conditioning`` itself, so by the layout's own rule) -> ``{image: (mean, std)}``,
    float32 numpy arrays (B, C, h, w) of the VAE posterior."""

    def __init__(self, vae, conditioning: str, dataset: CacheSamples, num_workers: int):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.conditioning, self.dataset, self.num_workers = conditioning, dataset, num_workers

    def predict_dataloader(self) -> DataLoader:
        # here, after Lightning has set up the process group: this rank's share of the shards
        self.dataset.rank, self.dataset.world_size = node_info()
        return DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available())

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        return to_model_batch(batch)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        moments = posterior_moments(self.vae, self.conditioning, batch)
        return {name: (mean.cpu().numpy(), std.cpu().numpy()) for name, (mean, std) in moments.items()}


class LatentShardWriter(BasePredictionWriter):
    """Writes each batch's samples with their moments into ``<out>/.<split>-NNNNNN.tar.tmp`` (each
    rank its own shards); at the end of predict, rank 0 gathers every rank's records and publishes:
    the manifest under a temporary name, every shard renamed, then the manifest renamed. A failed
    run removes this rank's temporary files.

    Args:
        out: the output folder (new or empty: checked by the command).
        manifest: the manifest without its splits' shard lists (``splits`` holds each split's
            source description), completed and written by rank 0.
    """

    def __init__(self, out: Path, manifest: dict):
        super().__init__(write_interval="batch")
        self.out, self.manifest = Path(out), manifest
        self.open: dict[str, dict] = {}
        self.done: list[dict] = []
        self.skips: list[dict] = []
        self.temps: list[Path] = []
        self.published: dict | None = None

    def on_predict_start(self, trainer, pl_module) -> None:
        from leffa.shard_writer import reporting_write_errors

        self.open, self.done, self.skips, self.temps = {}, [], [], []
        with reporting_write_errors(self.out):
            self.out.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        from leffa.shard_writer import write_error

        name = batch["shard"]
        entry = self.open.get(name) or self._open(name, batch)
        try:
            for i, raw in enumerate(batch["raw"]):
                sample = dict(raw)
                for image, pair in prediction.items():
                    for moment, values in zip(MOMENTS, pair):
                        sample[moment_member(image, moment)] = npy_bytes(values[i])
                entry["tar"].write(sample)
                entry["count"] += 1
            if batch["last"]:
                entry["tar"].close()  # flushes into the stream, which it does not close
                entry["stream"].flush()
                os.fsync(entry["stream"].fileno())
                entry["stream"].close()
                del self.open[name]
                self.done.append({"split": batch["split"], "name": name, "source": batch["source"],
                                  "size_bytes": entry["path"].stat().st_size, "num_samples": entry["count"]})
        except OSError as error:
            raise write_error(error, self.out / name) from error
        self.skips += [{"split": batch["split"], "source": batch["source"], **s} for s in batch["skips"]]

    def _open(self, name: str, batch: dict) -> dict:
        import webdataset as wds

        from leffa.shard_writer import TAR_OPTIONS, reporting_write_errors, temp_path

        path = temp_path(self.out / name)
        if path.resolve().parent != self.out.resolve():  # names come from split names: never outside --out
            raise UserError(f"refusing to write {path}: outside --out {self.out}")
        with reporting_write_errors(path):
            stream = open(path, "xb")
        self.temps.append(path)
        entry = {"path": path, "stream": stream, "tar": wds.TarWriter(stream, **TAR_OPTIONS), "count": 0}
        self.open[name] = entry
        return entry

    def on_predict_end(self, trainer, pl_module) -> None:
        from leffa.manifest import discard_staged_manifest, publish_manifest, staged_manifest_path
        from leffa.shard_writer import reporting_write_errors, temp_path

        if self.open:  # every shard ends with a batch marked last
            raise RuntimeError(f"shards left open: {sorted(self.open)}")
        parts = [(self.done, self.skips)]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (self.done, self.skips))
        if trainer.is_global_zero:
            done = sorted((d for part in parts for d in part[0]), key=lambda d: d["name"])
            skips = [s for part in parts for s in part[1]]
            manifest = self._complete(done, skips)
            staged = staged_manifest_path(self.out)
            try:
                with reporting_write_errors(self.out / MANIFEST_NAME), open(staged, "w", encoding="utf-8") as handle:
                    json.dump(manifest, handle, indent=2)
                    handle.write("\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                with reporting_write_errors(self.out):
                    for record in done:
                        os.replace(temp_path(self.out / record["name"]), self.out / record["name"])
                publish_manifest(self.out)
            except BaseException:
                discard_staged_manifest(self.out)
                raise
            self.published = manifest
        self.temps = []
        trainer.strategy.barrier("cache-latents published")

    def _complete(self, done: list[dict], skips: list[dict]) -> dict:
        manifest = json.loads(json.dumps(self.manifest))  # a copy
        for split, entry in manifest["splits"].items():
            shards = [{k: d[k] for k in ("name", "size_bytes", "num_samples", "source")}
                      for d in done if d["split"] == split]
            written = sum(s["num_samples"] for s in shards)
            entry.update(shards=shards, num_written=written, num_skipped=entry["num_samples_in"] - written)
        manifest["skipped"] = skips
        return manifest

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Remove this rank's temporary shards (never a final-named file: none exists before the end)."""
        for entry in self.open.values():
            for closing in (entry["tar"].close, entry["stream"].close):
                try:
                    closing()
                except (OSError, ValueError):
                    pass
        self.open = {}
        for path in self.temps:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
        self.temps = []


def check_new_folder(out: Path) -> None:
    """``--out`` is a new folder, or an empty one: else one error line (nothing is overwritten)."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"--out {out} is a file, not a folder; choose a new folder for the cached shards")
        if any(out.iterdir()):
            raise UserError(f"--out {out} already exists and is not empty (an earlier cache?); nothing is overwritten: "
                            f"choose a new folder, or remove that one first")
        return
    parent = out.parent
    while not (parent.exists() or parent == parent.parent):
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, not a folder; choose a new folder for the cached shards")


def _split_name(spec, name: str) -> str:
    """The split a source specification reads: a manifest's (``dir@split`` or the data module's
    default for ``name``), else ``name`` (globs, brace patterns and lists of specifications)."""
    if isinstance(spec, str):
        path, split = _split_suffix(spec)
        if os.path.isdir(path) or path.endswith(".json"):
            if split:
                return split
            manifest_path = os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path
            with open(manifest_path, encoding="utf-8") as handle:  # resolve_sources has read it already
                available = json.load(handle).get("splits", {})
            return next((s for s in CACHED_SOURCES[name] if s in available), name)
    return name


def _source_dataset(shards: list[str]) -> str | None:
    """The ``dataset`` that the manifests beside ``shards`` name, when they name one and the same."""
    names = set()
    for folder in {os.path.dirname(s) for s in shards}:
        try:
            with open(os.path.join(folder or ".", MANIFEST_NAME), encoding="utf-8") as handle:
                names.add(json.load(handle).get("dataset"))
        except (OSError, ValueError, AttributeError, RecursionError):
            names.add(None)
    return names.pop() if len(names) == 1 else None


def plan(data: dict) -> tuple[list[tuple[str, str, str]], dict[str, dict], dict[str, str]]:
    """The work of a cache of ``data`` (a config's ``data.*``): ``(split, output name, source shard)``
    per source shard, each split's manifest entry without its outputs, and the data setting each
    split came from. One error line for what cannot be cached (streamed shards, weighted training
    sources, two sources with one split name)."""
    if data.get("hflip"):
        raise UserError("data.hflip: cached latents are those of the unmirrored images (a VAE latent cannot be "
                        "mirrored exactly), so training on them refuses data.hflip; set data.hflip: false")
    if data.get("train_weights") is not None and not isinstance(data.get("train_shards"), str):
        raise UserError("data.train_weights: a cache pools the sources of data.train_shards into one split; cache each "
                        "source into its own folder (--data.train_shards <one source> --data.train_weights null) and "
                        "mix the caches with data.train_weights")
    work, entries, settings, lists = [], {}, {}, {}
    for name, defaults in CACHED_SOURCES.items():
        spec = data.get(f"{name}_shards")
        if spec is None:
            continue
        shards = [s for source in resolve_sources(spec, defaults) for s in source]
        streamed = [s for s in shards if not is_local(s)]
        if streamed:
            raise UserError(f"data.{name}_shards: {streamed[0]} is streamed; leffa cache-latents reads local shard files")
        split = _split_name(spec, name)
        if not _SPLIT_NAME.fullmatch(split):
            raise UserError(f"data.{name}_shards: split name {split!r} cannot name a shard file (letters, digits, '_' "
                            f"and '-')")
        if split in lists:
            if lists[split] == shards:  # the same shards twice (e.g. train and val of one split): cached once
                continue
            raise UserError(f"data.{settings[split]}_shards and data.{name}_shards are different shards of one split "
                            f"name {split!r}; cache them into two folders (one with --data.{name}_shards null)")
        lists[split], settings[split] = shards, name
        counts = [count_samples(s) for s in shards]
        entries[split] = {
            "source": spec if isinstance(spec, str) else list(spec),
            "source_dataset": _source_dataset(shards),
            "source_shards": [{"path": os.path.abspath(s), "size_bytes": os.path.getsize(s), "num_samples": c}
                              for s, c in zip(shards, counts)],
            "num_samples_in": sum(counts),
        }
        work += [(split, f"{split}-{i:06d}.tar", os.path.abspath(s)) for i, s in enumerate(shards)]
    return work, entries, settings


def _vae_source(model_settings: dict) -> str:
    """Where the module's VAE came from, for the manifest (the fingerprint is what is checked)."""
    if model_settings.get("vae_pretrained"):
        where = f"model.vae_pretrained={model_settings['vae_pretrained']}"
    elif model_settings.get("pretrained_model"):
        where = f"model.pretrained_model={model_settings['pretrained_model']}"
    else:
        where = "model.vae_config (random weights from seed_everything)"
    init = model_settings.get("init_from")
    return f"{where}, weights of model.init_from={init}" if init else where


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="leffa cache-latents", allow_abbrev=False, add_help=False,
        description="Run the frozen VAE of a stage config once over its training and validation shards and write "
                    "new shards with the VAE posterior moments of every image a training step encodes (train on them "
                    "with --data.latents true). Every other option is that of `leffa fit` (--config, --model.*, "
                    "--data.*, --trainer.accelerator/devices/num_nodes, --seed_everything).")
    p.add_argument("--out", help="a new (or empty) folder for the cached shards and their manifest.json")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per VAE call (default: data.val_batch_size, else data.batch_size)")
    p.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    args, rest = p.parse_known_args(argv)
    if args.help:
        p.print_help()
        raise SystemExit(0)
    if not args.out:
        raise UserError("leffa cache-latents needs --out DIR (a new folder for the cached shards)")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    return args, rest


def cache_latents_main(argv: list[str] | None = None) -> dict | None:
    """``leffa cache-latents --config <stage config> --out DIR [--batch-size N] [overrides]`` (module
    docstring). Returns the published manifest on rank 0 (None on the other ranks)."""
    from leffa.data import LeffaDataModule
    from leffa.lightning_cli import LeffaCLI, build_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = _parse(argv)
    # an iterable dataset has no batch indices; the writer does not need them
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
    out = Path(args.out)
    check_new_folder(out)
    found: dict = {}

    class CacheCLI(LeffaCLI):
        """The stage config parsed as ``leffa fit`` parses it; only the model and data are built."""

        def before_instantiate_classes(self) -> None:
            config = self.config
            data = config["data"].as_dict() if hasattr(config["data"], "as_dict") else dict(config["data"])
            found["work"], found["splits"], found["settings"] = plan(data)
            LeffaDataModule.check_stage("fit", {**data, "latents": False, "hflip": False})
            found["trainer"] = {k: config["trainer"][k] for k in TRAINER_KEYS if config["trainer"].get(k) is not None}
            for key in ("callbacks", "logger", "plugins", "strategy"):  # built for training only: not at all
                config["trainer"][key] = None

        def instantiate_trainer(self, **kwargs):
            return None

    cli = build_cli(rest, CacheCLI, parser_kwargs={"prog": "leffa cache-latents"}, save_config_callback=None,
                    run=False)
    module, data = cli.model, cli.datamodule.hparams
    height, width, layout = data["height"], data["width"], module.hparams.conditioning
    module.check_image_size(height, width, "cache")  # a size the VAE cannot encode: one line
    vae = module.vae
    factor = vae_scale_factor(vae)
    channels = int(vae.config.latent_channels)
    images = list(encoded_images(layout))
    record = {
        "vae": {"fingerprint": vae_fingerprint(vae), "scaling_factor": float(vae.config.scaling_factor),
                "downsampling": factor, "latent_channels": channels, "source": _vae_source(dict(module.hparams))},
        "height": height, "width": width, "latent_shape": [channels, height // factor, width // factor],
        "conditioning": layout, "images": images,
        "members": {i: [moment_member(i, m) for m in MOMENTS] for i in images}, "dtype": "float32",
    }
    datasets = {e.pop("source_dataset") for e in found["splits"].values()}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "dataset": datasets.pop() if len(datasets) == 1 else None,
        "splits": found["splits"],
        "skipped": [],
        MANIFEST_KEY: record,
        "command": "leffa cache-latents " + shlex.join(argv),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    batch_size = args.batch_size or data.get("val_batch_size") or data["batch_size"]
    dataset = CacheSamples(found["work"], height, width, batch_size)
    encoder = LatentEncoder(vae, layout, dataset, data["num_workers"])
    cli.model = cli.config_init = module = None  # the UNets are not needed
    writer = LatentShardWriter(out, manifest)
    trainer = L.Trainer(**found["trainer"], precision="32-true", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=sys.stderr.isatty(), callbacks=[writer],
                        default_root_dir=str(out))
    trainer.predict(encoder, return_predictions=False)
    if writer.published is None:
        return None
    counts = ", ".join(f"{split}: {e['num_written']}" + (f" ({e['num_skipped']} skipped)" if e["num_skipped"] else "")
                       for split, e in writer.published["splits"].items())
    use = " ".join(f"--data.{name}_shards {out}@{split}" for split, name in found["settings"].items())
    print(f"cached the VAE latents of {counts} samples at {height}x{width} ({layout}: {', '.join(images)}) in {out}; "
          f"train on them with {use} --data.latents true")
    return writer.published
