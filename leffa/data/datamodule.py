"""LeffaDataModule: streams WebDataset shards into batches of the batch contract (batch.py)."""

import lightning as L
import torch
from torch.utils.data import DataLoader

from leffa.data.batch import Collate, to_model_batch
from leffa.data.distributed import node_info
from leffa.errors import UserError
from leffa.data.eval_split import batches_per_rank
from leffa.data.global_batch import split_global_batch
from leffa.data.latents import cache_record
from leffa.data.pipeline import ExactlyOnce, eval_pipeline, train_pipeline
from leffa.data.predict_folder import FolderPairs
from leffa.data.preflight import check_sources
from leffa.data.shards import resolve_sources
from leffa.data.skips import SkipCounter
from leffa.data.tar_samples import count_samples, is_local

ShardSpec = str | list[str] | None

# Manifest split read when a specification names none (``dir@split`` overrides); the first
# one the manifest has wins. The public person datasets ship train and test splits only.
DEFAULT_SPLITS = {"train": ("train",), "val": ("val", "test"), "test": ("test",), "predict": ("test",)}
# the shard sources each Trainer stage reads
STAGE_SOURCES = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
# the sources whose cached latents data.latents reads (those leffa cache-latents writes)
LATENT_SOURCES = ("train", "val")


class LeffaDataModule(L.LightningDataModule):
    """Shards -> batches of ``{tgt, ref, mask, densepose, key, flow?, skipped}`` at (height, width).

    The dataloaders yield compact uint8 batches; ``on_after_batch_transfer`` turns them into
    the float batch contract on the device (batch.py), so a LightningModule receives the
    contract. Outside a Trainer, call ``leffa.data.to_model_batch`` on each batch.

    Training is an endless stream of resampled shards: there are no epochs, so give the
    Trainer ``max_steps`` and an integer ``val_check_interval`` (steps; with
    ``check_val_every_n_epoch: null``). Validation, test and predict read every sample
    exactly once across all ranks and workers, split by sample (``eval_split``): ranks hold
    within one sample of each other and make the same number of batches, some of them short,
    whatever the number of shards. Streamed shards (``pipe:``, URLs) cannot be counted
    beforehand: they are split by shard, and ranks may then get different numbers of batches.
    """

    def __init__(
        self,
        train_shards: ShardSpec = None,
        val_shards: ShardSpec = None,
        test_shards: ShardSpec = None,
        predict_shards: ShardSpec = None,
        predict_folder: str | None = None,
        train_weights: list[float] | None = None,
        height: int = 512,
        width: int = 384,
        batch_size: int = 4,
        global_batch_size: int | None = None,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        hflip: bool = False,
        seed: int = 0,
        latents: bool = False,
    ):
        """Configure the data of one stage.

        Args:
            train_shards: training shards. Each string is a manifest.json or its folder
                (``shards/vitonhd``; a split other than "train" with ``shards/vitonhd@name``),
                a brace pattern (``shards/x/train-{000000..000009}.tar``) or a glob
                (``shards/x/train-*.tar``). A list gives several sources, mixed by
                ``train_weights``.
            val_shards: validation shards, same forms (default manifest split: "val", else
                "test"); a list is concatenated. None: no validation.
            test_shards: test shards (default split "test"). None: no test.
            predict_shards: shards to run ``predict`` on (default split "test").
            predict_folder: instead of shards, a folder of ``person/``, ``reference/``, ``mask/``,
                ``densepose/`` images (and an optional ``pairs.txt``; see ``leffa.data.predict_folder``).
            train_weights: one mixing weight per ``train_shards`` entry (relative; 0 drops a
                source). None: all shards pooled, so each source counts by its shard count.
            height: image height of this stage, in pixels; every key is resized to it.
            width: image width of this stage, in pixels.
            batch_size: training samples per batch, per device; with ``global_batch_size``, the
                largest per-device batch that fits in memory.
            global_batch_size: the optimisation batch over all devices (the paper's number).
                At start-up the per-device batch and ``trainer.accumulate_grad_batches`` are
                derived from the world size: per_device * accumulation * world == global, with
                the fewest accumulation steps; an impossible split is an error showing the sums.
            val_batch_size: samples per batch for validation/test/predict (default: batch_size).
            num_workers: DataLoader worker processes per device (0: load in the main process).
                Evaluation splits local shards by sample, so any number of shards serves
                every rank and worker.
            shuffle_buffer: training samples held per worker to shuffle across shards. They are
                held encoded: ~0.25 MB each for 1024x768 images, ~3.4 MB with a float16 flow, so
                1000 costs ~0.25 GB (3.4 GB with flow) per worker. 0 or 1: samples come in shard
                order (shards are still drawn at random).
            hflip: mirror each training sample with probability 0.5 (all keys together; the
                flow is mirrored with its x component negated). Refused for samples whose json
                ``pose_source`` is "densepose" or "keypoints" (every data_prep converter's): their
                pose images have sides that a mirror does not swap.
            seed: base seed of the training stream (shard draws, shuffle, flips); each rank and
                worker derives its own from it and from the step training starts at.
            latents: read the cached VAE latents of the training and validation shards (folders
                written by ``leffa cache-latents``; ``leffa.data.latents``) into ``batch["moments"]``,
                so the module skips the VAE for those images. Refused in one line: shards without
                them, latents of another size, ``hflip``; the module refuses another VAE or a
                conditioning whose images they lack. Test and predict shards are read as images.
        """
        super().__init__()
        _check_positive(height=height, width=width, batch_size=batch_size, val_batch_size=val_batch_size or 1)
        if num_workers < 0 or shuffle_buffer < 0:
            raise UserError(f"num_workers ({num_workers}) and shuffle_buffer ({shuffle_buffer}) must be >= 0")
        if train_weights is not None:
            _check_weights(train_shards, train_weights)
        if latents and hflip:
            cache_record({}, height, width, hflip)  # its one-line refusal
        self.save_hyperparameters()
        self.micro_batch_size = batch_size
        self.shards: dict[str, list[list[str]]] = {}
        self.counts: dict[str, list[int] | None] = {}
        #: the ``latents`` record of the cached latents read (data.latents), set by setup
        self.latent_cache: dict | None = None

    def setup(self, stage: str) -> None:
        """Resolve the shard lists the Trainer stage needs (errors name the missing pattern), check
        the first sample of each source, and split the global batch over the Trainer's devices.
        Every refusal is one line (``UserError``, ``MissingFileError``)."""
        self.micro_batch_size = self.hparams.batch_size
        if stage == "fit" and self.hparams.global_batch_size and self.trainer is not None:
            if self.trainer.accumulate_grad_batches != 1:
                raise UserError("set either data.global_batch_size or trainer.accumulate_grad_batches, not both")
            self.micro_batch_size, accumulation = split_global_batch(
                self.hparams.global_batch_size, self.trainer.world_size, self.hparams.batch_size)
            self.trainer.accumulate_grad_batches = accumulation
        if stage not in STAGE_SOURCES:
            raise UserError(f"unknown stage {stage!r}; valid: {sorted(STAGE_SOURCES)}")
        if stage == "predict" and self.hparams.predict_folder:
            return
        for name in STAGE_SOURCES[stage]:
            spec = self.hparams[f"{name}_shards"]
            if spec is None and name != "val":  # no val_shards: fit without validation
                raise UserError(f"Trainer stage {stage!r} needs data.{name}_shards")
            self._sources(name)
        if self.hparams.get("latents") and set(STAGE_SOURCES[stage]) & set(LATENT_SOURCES):
            self.latent_cache = cache_record(
                {n: self._sources(n) for n in LATENT_SOURCES if self.hparams[f"{n}_shards"] is not None},
                self.hparams.height, self.hparams.width, self.hparams.hflip)

    @staticmethod
    def check_stage(stage: str, settings: dict) -> None:
        """The checks of :meth:`setup` on the shard sources ``stage`` reads, from the data settings
        alone (``data.*`` of a config), so that the ``leffa`` command makes them before it builds
        the model: a missing pattern, a source with nothing readable, a sample without a member."""
        if stage not in STAGE_SOURCES or (stage == "predict" and settings.get("predict_folder")):
            return  # setup says so
        if settings.get("latents") and settings.get("hflip"):
            cache_record({}, 0, 0, hflip=True)  # its one-line refusal, before any other about flips
        resolved = {}
        for name in STAGE_SOURCES[stage]:
            spec = settings.get(f"{name}_shards")
            if spec is None:
                if name != "val":
                    raise UserError(f"Trainer stage {stage!r} needs data.{name}_shards")
                continue
            sources = resolve_sources(spec, DEFAULT_SPLITS[name])
            check_sources(name, sources, hflip=bool(settings.get("hflip")) and name == "train", specs=_specs(spec))
            resolved[name] = sources
        if settings.get("latents") and set(STAGE_SOURCES[stage]) & set(LATENT_SOURCES):
            cache_record({n: s for n, s in resolved.items() if n in LATENT_SOURCES}, settings.get("height", 512),
                         settings.get("width", 384), bool(settings.get("hflip")))

    def train_dataloader(self) -> DataLoader:
        """Endless batches of ``batch_size`` (see class docstring)."""
        hp = self.hparams
        rank, _ = node_info()
        start_step = self.trainer.global_step if self.trainer is not None else 0
        dataset = train_pipeline(
            self._sources("train"),
            hp.train_weights,
            height=hp.height,
            width=hp.width,
            batch_size=self.micro_batch_size,
            shuffle_buffer=hp.shuffle_buffer,
            hflip=hp.hflip,
            seed=hp.seed,
            rank=rank,
            start_step=start_step,
            latents=self._latent_spec("train"),
        )
        return self._loader(dataset)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Wire batch (uint8, on the device now) -> the float batch contract (batch.py)."""
        return to_model_batch(batch)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader | list:
        if self.hparams.predict_folder:
            # map-style: Lightning's distributed sampler gives each rank its own samples
            dataset = FolderPairs(self.hparams.predict_folder, self.hparams.height, self.hparams.width)
            return DataLoader(dataset, batch_size=self.hparams.val_batch_size or self.hparams.batch_size,
                              num_workers=self.hparams.num_workers, collate_fn=Collate(SkipCounter()))
        return self._eval_loader("predict")

    # Helpers

    def _sources(self, name: str) -> list[list[str]]:
        """Resolved, checked shard lists of ``name`` (once; also when called outside a Trainer)."""
        if name not in self.shards:
            spec = self.hparams[f"{name}_shards"]
            sources = resolve_sources(spec, DEFAULT_SPLITS[name])
            check_sources(name, sources, hflip=self.hparams.hflip and name == "train", specs=_specs(spec))
            self.shards[name] = sources
        return self.shards[name]

    def _latent_spec(self, name: str) -> tuple | None:
        """``(images, latent shape)`` of the cached latents that source ``name`` reads, or None."""
        if not self.hparams.get("latents") or name not in LATENT_SOURCES:
            return None
        if self.latent_cache is None:  # a dataloader asked for outside a Trainer: setup's checks first
            self.latent_cache = cache_record(
                {n: self._sources(n) for n in LATENT_SOURCES if self.hparams[f"{n}_shards"] is not None},
                self.hparams.height, self.hparams.width, self.hparams.hflip)
        return tuple(self.latent_cache["images"]), tuple(int(v) for v in self.latent_cache["latent_shape"])

    def _counts(self, name: str, shards: list[str]) -> list[int] | None:
        """Samples per shard of ``name`` (once), or None when a shard is streamed, not a local file."""
        if name not in self.counts:
            self.counts[name] = [count_samples(s) for s in shards] if all(map(is_local, shards)) else None
        return self.counts[name]

    def _eval_loader(self, name: str) -> DataLoader | list:
        """One exactly-once pass; ``[]`` (no batches) when ``<name>_shards`` is None."""
        shards = [s for source in self._sources(name) for s in source]
        if not shards:
            return []
        hp = self.hparams
        rank, world_size = node_info()
        batch_size = hp.val_batch_size or hp.batch_size
        counts = self._counts(name, shards)
        if counts is not None:
            batches_per_rank(sum(counts), world_size, batch_size, f"{name}_shards")  # refuse here, not in a worker
            dataset = ExactlyOnce(shards, counts, height=hp.height, width=hp.width, batch_size=batch_size,
                                  rank=rank, world_size=world_size, latents=self._latent_spec(name))
        else:
            if len(shards) < world_size:
                raise UserError(
                    f"data.{name}_shards: {len(shards)} streamed shard(s) for {world_size} ranks; each rank needs"
                    f" at least one (use local shard files, which are split by sample, or fewer devices)"
                )
            dataset = eval_pipeline(shards, height=hp.height, width=hp.width, batch_size=batch_size,
                                    rank=rank, world_size=world_size, latents=self._latent_spec(name))
        return self._loader(dataset)

    def _loader(self, dataset) -> DataLoader:
        # batch_size=None: the pipeline already yields whole batches.
        workers = self.hparams.num_workers
        return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=torch.cuda.is_available())


def _specs(spec: ShardSpec) -> list[str]:
    """The source specifications as given, one per source (``resolve_sources``' order)."""
    return [] if spec is None else [spec] if isinstance(spec, str) else [str(s) for s in spec]


def _check_positive(**values: int) -> None:
    bad = {k: v for k, v in values.items() if v < 1}
    if bad:
        raise UserError(f"must be >= 1: {bad}")


def _check_weights(train_shards: ShardSpec, weights: list[float]) -> None:
    n_sources = 0 if train_shards is None else 1 if isinstance(train_shards, str) else len(train_shards)
    if len(weights) != n_sources:
        raise UserError(f"train_weights has {len(weights)} entries but train_shards has {n_sources} source(s)")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"train_weights must be >= 0 with a positive sum, got {weights}")
