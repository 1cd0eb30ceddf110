"""The Leffa LightningModule: frozen VAE, the denoiser of ``model.architecture`` (the paper's
Generative and Reference UNets by default), diffusion loss (Eq. 1) plus lambda * Leffa loss (Eq.
2-5); the optimizer and learning-rate schedule from the config (``leffa.optimizers``). EMA comes from
the ``leffa.ema.TrainableEMA`` callback (configured on the Trainer), parallelism from the Trainer's
strategy (``leffa.parallel``).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from jsonargparse.typing import Path_fr, path_type
from lightning.pytorch.cli import OptimizerCallable

from leffa import losses
from leffa.architectures import ArchitectureName, DenoiserFactory, DenoiserSettings, ReferenceDenoiser, build_denoiser
from leffa.checkpoints import read_settings
from leffa.conditioning import build_conditioning, samples_posterior
from leffa.initial_weights import init_weights
from leffa.leffa_layers import check_image_size, check_theta_timestep, leffa_layers
from leffa.module_settings import build_settings
from leffa.nonfinite import LOSS_TERMS, NonFiniteStop
from leffa.optimizers import configure_optimizers
from leffa.parallel import clip_gradients, shard_for_strategy
from leffa.pretrained import (
    load_scheduler, load_vae, load_vae_folder, read_config, vae_latent_channels, vae_scale_factor,
)
from leffa.resume_settings import check_resume_settings
from leffa.rng_state import generator_states, restore_generator_state
from leffa.sampling import SamplingConfig, key_generators, sample
from leffa.schedules import LRSchedule
from leffa.selection import SelectionWindow, leffa_rows
from leffa.speed import SpeedSettings, apply_speed, pinned_copy
from leffa.stage_checks import check_first_batch, check_loaded_checkpoint, prepare_stage
from leffa.trainable import LoraSettings
from leffa.unets import is_sdxl
from leffa.vae_encoding import encode_latent

__all__ = ["LeffaModule"]

Path_dr = path_type("dr")  # a readable folder; in a YAML config, relative to the config file's folder


class LeffaModule(L.LightningModule):
    """Latent diffusion with reference attention for virtual try-on and pose transfer, with the Leffa loss.

    Args:
        pretrained_model: the backbone: a local SD1.5(-inpainting) or SDXL(-inpainting) diffusers
            folder (UNets, VAE, scheduler; never downloaded). SDXL trains as the released pose model
            does: without its added embedding, with zero-terminal-SNR betas.
        architecture: how the reference reaches the denoiser (``leffa.architectures``): ``dual_unet``
            (the paper's), ``concat_unet`` (CatVTON-style), or ``class_path`` and ``init_args`` of
            any ``ReferenceDenoiser`` subclass with its own arguments.
        unet_config: ``UNet2DConditionModel`` config (a mapping, or a JSON/YAML file such as a
            diffusers ``config.json``), used when no folder is given; tests and the demo use it.
        vae_config: ``AutoencoderKL`` config (mapping or file), used when no folder is given.
        vae_pretrained: a local diffusers ``AutoencoderKL`` folder (in a YAML config, relative to
            its folder); it takes precedence over ``vae_config`` and ``pretrained_model``'s VAE.
        conditioning: the denoiser's input layout: ``tryon``, ``pose``, ``pose_image`` or
            ``released`` (``leffa.conditioning``).
        cross_attention: the UNets' text cross-attention: ``passthrough`` (the released code's) or
            ``removed`` (the paper's text); ``leffa.unets``.
        use_leffa_loss: add lambda * Leffa (Eq. 5); the paper turns it on in the last stage.
        lambda_leffa: weight of the Leffa loss (paper: 1e-3).
        theta_resolution: only layers whose token grid height h has h/H > theta take part (paper: 1/32).
        theta_timestep: only samples with t < theta take part (paper: 500 of 1000).
        tau: softmax temperature of the Leffa attention map (paper: 2.0).
        average_heads: average the attention over heads before the loss (paper); False: Tab. 8's per head.
        upsample_flow: upsample flow fields to image size (paper); False is Tab. 8's ablation.
        p_drop_ref: probability of zeroing a sample's reference latent in training (for guidance).
        learning_rate: AdamW learning rate (paper: 1e-5), when no ``optimizer`` is given.
        weight_decay: AdamW weight decay, when no ``optimizer`` is given.
        optimizer: the optimizer as a config names a class (``class_path``/``init_args``; 8-bit
            AdamW: ``leffa.optimizers.AdamW8bit``). None: AdamW with the two settings above.
        lr_schedule: warmup then constant or cosine (``leffa.schedules``); None: a constant rate.
        trainable: ``all`` (the paper), ``attention`` or ``lora`` (``leffa.trainable``).
        lora: the adapters of ``trainable: lora`` (rank, alpha, target modules).
        gradient_checkpointing: recompute UNet blocks in backward to save activation memory.
        init_from: weights of a previous stage (any checkpoint form; ``leffa.initial_weights``),
            never optimizer state. Resuming a stage is the Trainer's ``--ckpt_path``.
        init_from_weights: ``ema`` or ``live`` weights of ``init_from``.
        sampling: how ``leffa predict`` and the sample grids sample (``leffa.sampling``).
        speed: training-speed switches (``leffa.speed``), applied when the Trainer sets the module up.
    """

    #: FLOPs of one training batch, for ThroughputMonitor's MFU (set at the first batch: leffa.throughput)
    flops_per_batch: int | None = None

    def __init__(
        self,
        pretrained_model: str | None = None,
        architecture: ArchitectureName | DenoiserFactory = "dual_unet",
        unet_config: Path_fr | dict | None = None,
        vae_config: Path_fr | dict | None = None,
        vae_pretrained: Path_dr | str | None = None,
        conditioning: str = "tryon",
        cross_attention: str = "passthrough",
        use_leffa_loss: bool = False,
        lambda_leffa: float = 1e-3,
        theta_resolution: float = 1.0 / 32,
        theta_timestep: int = 500,
        tau: float = 2.0,
        average_heads: bool = True,
        upsample_flow: bool = True,
        p_drop_ref: float = 0.1,
        learning_rate: float = 1e-5,
        weight_decay: float = 1e-2,
        optimizer: OptimizerCallable | None = None,
        lr_schedule: LRSchedule | None = None,
        trainable: str = "all",
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        init_from: str | None = None,
        init_from_weights: str = "ema",
        sampling: SamplingConfig | None = None,
        speed: SpeedSettings | None = None,
    ):
        super().__init__()
        # read files now, so the checkpoint's hyper-parameters hold the model's configs themselves
        unet_config, vae_config = read_config(unet_config), read_config(vae_config)
        self.save_hyperparameters()
        record = build_settings(self, optimizer, unet_config, vae_config, vae_pretrained)  # each settings object, once
        self.denoiser: ReferenceDenoiser = build_denoiser(record, DenoiserSettings(
            pretrained_model, unet_config, vae_latent_channels(pretrained_model, vae_config, vae_pretrained),
            conditioning, cross_attention, theta_resolution, trainable, self.lora_settings, gradient_checkpointing))
        for name, component in self.denoiser.components().items():
            self.add_module(name, component)  # their names are the checkpoint keys' prefixes
        self.bank = self.denoiser.bank
        vae = load_vae_folder(vae_pretrained) if vae_pretrained else load_vae(pretrained_model, vae_config)
        self.vae = vae.requires_grad_(False).eval()
        # the released code rescales SDXL's betas to zero terminal SNR (and SD1.5's not)
        self.scheduler = load_scheduler(pretrained_model, zero_terminal_snr=is_sdxl(pretrained_model, unet_config))
        check_theta_timestep(theta_timestep, self.scheduler.config.num_train_timesteps)
        # Why a generator of our own: each data-parallel rank needs its own stream of noise, timesteps
        # and reference drops, and its state goes into checkpoints so a resumed run draws what an
        # uninterrupted one would have drawn. Seeded per rank in setup().
        self.noise_generator = torch.Generator()
        self._window = SelectionWindow()  # the selection draws of the optimizer step in progress
        self.step_terms: dict[str, torch.Tensor] = {}  # the last training micro-batch's, for NonFiniteStop
        self._speed_applied: set[str] = set()
        if init_from:
            init_weights(self, init_from, init_from_weights)

    @classmethod
    def from_checkpoint(cls, path: str | Path, weights: str = "ema", **overrides) -> LeffaModule:
        """The module rebuilt from a checkpoint that carries its settings (``.ckpt``, sharded folder,
        export) with its ``weights``; ``overrides`` change settings. Weights-only files: one error line."""
        settings = read_settings(path)
        settings.pop("optimizer", None)  # training-only, and a record of the config rather than a callable
        return cls(**{**settings, "init_from": str(path), "init_from_weights": weights, **overrides})

    def setup(self, stage: str) -> None:
        self.noise_generator.manual_seed(torch.initial_seed() + self.global_rank)
        self._checked_size, self._starting = None, True
        if self._trainer is not None:
            prepare_stage(self, stage)  # leffa.stage_checks

    def apply_speed(self, bf16: bool) -> None:
        """``leffa.speed.apply_speed``: each switch of ``self.speed`` once, before any sharding."""
        apply_speed(self, self.speed, self._speed_applied, bf16)

    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (``leffa.pretrained.vae_scale_factor``)."""
        return vae_scale_factor(self.vae)

    def check_image_size(self, height: int, width: int, stage: str) -> None:
        """``leffa.leffa_layers.check_image_size`` for this module."""
        self._checked_size = (height, width)
        check_image_size(self, height, width, stage)

    def leffa_layers(self, height: int, width: int) -> dict[str, tuple[int, int]]:
        """The attention layers (and token grids) of the Leffa loss at this image size (``leffa.leffa_layers``)."""
        return leffa_layers(self, height, width)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen: keep it in eval mode whatever the Trainer does
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["noise_generator"] = generator_states(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_loaded_checkpoint(self, checkpoint)  # leffa.stage_checks
        restore_generator_state(self, checkpoint.get("noise_generator"))

    def check_resume_settings(self, saved: dict, fitting: bool, source: str = "--ckpt_path") -> None:
        """``leffa.resume_settings.check_resume_settings`` of this module's settings against ``saved``."""
        check_resume_settings(dict(self.hparams), saved, fitting, source)

    def configure_model(self) -> None:
        """``leffa.parallel.shard_for_strategy`` (the architecture shards its networks); safe to
        call more than once (``leffa.ema.TrainableEMA`` calls it too)."""
        if self._trainer is not None:
            shard_for_strategy(self, self.trainer)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """``leffa.parallel.clip_gradients``: Lightning's, or FSDP's own by norm under ``FSDPStrategy``."""
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        """The optimizer over the trainable parameters only, and the schedule (``leffa.optimizers``)."""
        return configure_optimizers(self)

    def encode(self, image: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None,
               moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latent of this VAE (``leffa.vae_encoding.encode_latent``)."""
        return encode_latent(self.vae, image, generator, moments)

    def encode_inputs(self, batch: dict, generator: torch.Generator | list[torch.Generator] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference latent and conditioning channels of ``batch``: posterior samples from
        ``generator`` (the conditioning's, then the reference's: the released pipeline's order) for
        a layout that samples them (``released``), else modes; cached ``batch["moments"]`` reused."""
        encode_with = generator if samples_posterior(self.hparams.conditioning) else None
        moments = batch.get("moments") or {}
        height, width = batch["ref"].shape[-2:]
        factor = self.vae_scale_factor()
        conditioning = build_conditioning(self.hparams.conditioning, batch,
                                          lambda x, name: self.encode(x, encode_with, moments.get(name)),
                                          (height // factor, width // factor))
        return self.encode(batch["ref"], encode_with, moments.get("ref")), conditioning

    def run_reference(self, ref_latent: torch.Tensor, timesteps: torch.Tensor) -> None:
        """Encode the reference for the next ``denoise`` calls (the Reference UNet, for ``dual_unet``)."""
        self.denoiser.encode_reference(ref_latent, timesteps)

    def denoise(self, noisy_latent: torch.Tensor, timesteps: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        """Epsilon prediction (B, C, h, w) given the encoded reference."""
        return self.denoiser.denoise(noisy_latent, timesteps, conditioning)

    def forward(self, noisy_latent, timesteps, conditioning, ref_latent, image_hw=None, capture_rows=None):
        """Reference pass then generative pass; Leffa captures for ``capture_rows`` land in ``self.bank``."""
        self.bank.begin(noisy_latent.shape[-2:], image_hw, capture_rows)
        self.run_reference(ref_latent, timesteps)
        return self.denoise(noisy_latent, timesteps, conditioning)

    def noised_forward(self, batch: dict, generator: torch.Generator, timesteps: torch.Tensor,
                       keep_ref: torch.Tensor | None = None,
                       capture_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The one forward of training, validation and the flow pictures: targets noised to
        ``timesteps``, references zeroed where ``keep_ref`` is False, Leffa captures for
        ``capture_rows``; returns (prediction, noise). Draws from ``generator`` (CPU): the targets'
        posterior sample, then :meth:`encode_inputs`' draws, then the noise."""
        tgt = batch["tgt"]
        latents = self.encode(tgt, generator, (batch.get("moments") or {}).get("tgt"))
        ref_latent, conditioning = self.encode_inputs(batch, generator)
        # random draws on the CPU generator, then moved: cheap, and identical on every device type
        # (copies from the CPU through pinned memory: the host does not wait for the GPU)
        noise = pinned_copy(torch.randn(latents.shape, generator=generator), latents.device, latents.dtype)
        timesteps = pinned_copy(timesteps, self.device)
        if keep_ref is not None:
            ref_latent = ref_latent * pinned_copy(keep_ref, self.device, ref_latent.dtype).view(-1, 1, 1, 1)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        return self(noisy, timesteps, conditioning, ref_latent, tuple(tgt.shape[-2:]), capture_rows), noise

    def leffa_loss(self, ref_image: torch.Tensor, tgt_image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 4 summed over the layers the bank captured, per selected sample, shape (b,)."""
        hp = self.hparams
        return losses.leffa_loss(self.bank.captures.values(), ref_image, tgt_image, mask, tau=hp.tau,
                                 average_heads=hp.average_heads, upsample=hp.upsample_flow)

    def loss_terms(self, batch: dict, generator: torch.Generator, timesteps: torch.Tensor,
                   keep_ref: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample terms of one batch with the given draws: ``diffusion`` (b,), and with the Leffa loss
        ``rows`` (the selected samples) and ``leffa`` (one per row; absent when no layer took part)."""
        hp = self.hparams
        # the selected rows from the draws on the CPU: no device sync (and leffa.throughput's meta copy gets them)
        rows = leffa_rows(timesteps.cpu(), keep_ref.cpu(), hp.theta_timestep) if hp.use_leffa_loss else None
        rows = None if rows is None else pinned_copy(rows, self.device)
        timesteps, keep_ref = pinned_copy(timesteps, self.device), pinned_copy(keep_ref, self.device)
        prediction, noise = self.noised_forward(batch, generator, timesteps, keep_ref, rows)
        tgt, ref, mask = batch["tgt"], batch["ref"], batch["mask"]
        terms = {"diffusion": losses.diffusion_loss(prediction, noise)}
        if hp.use_leffa_loss:
            terms["rows"] = rows
            if self.bank.captures:
                terms["leffa"] = self.leffa_loss(ref[rows], tgt[rows], mask[rows])
        return terms

    def compute_loss(self, batch: dict, generator: torch.Generator, train: bool,
                     batch_idx: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Eq. 5 on one batch: (loss, metrics); ``train``: reference dropout and, in a Trainer, the Leffa
        term's mean over the optimizer step (``leffa.selection``); ``generator``: the random stream."""
        hp = self.hparams
        b = batch["tgt"].shape[0]
        timesteps, keep_ref, leffa_weight = self._window.select(self, b, train, generator, batch_idx)
        terms = self.loss_terms(batch, generator, timesteps, keep_ref)
        loss = terms["diffusion"].mean()
        metrics = {"diffusion": loss}
        if hp.use_leffa_loss:
            rows = terms["rows"]
            if "leffa" in terms:
                leffa = terms["leffa"]
                # the mean over the selected samples (over the whole optimizer step in training), then Eq. 5
                weight = leffa_weight if leffa_weight is not None else 1.0 / max(rows.numel(), 1)
                loss = loss + hp.lambda_leffa * weight * leffa.sum()
                metrics["leffa"] = leffa.mean()
            metrics.update(leffa_layers=float(len(self.bank.captures)), leffa_samples=float(rows.numel()))
        if train:  # read by leffa.nonfinite.NonFiniteStop before backward
            self.step_terms = {t: metrics[t].detach() for t in LOSS_TERMS if t in metrics}
        metrics["loss"] = loss
        return loss, metrics

    def _step(self, stage: str, batch: dict, generator: torch.Generator, batch_idx: int | None = None):
        loss, metrics = self.compute_loss(batch, generator, stage == "train", batch_idx)
        self._log_metrics(stage, metrics, batch)
        return loss

    def configure_callbacks(self) -> list[L.Callback]:
        """``leffa.nonfinite.NonFiniteStop``, on every Trainer that fits the model."""
        return [NonFiniteStop()]

    def _log_metrics(self, stage: str, metrics: dict, batch: dict) -> None:
        if self._trainer is None:  # called outside a Trainer (tests, benchmarks)
            return
        b = batch["tgt"].shape[0]
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, batch_size=b, sync_dist=stage != "train", prog_bar=name == "loss")
        if "skipped" in batch:
            self.log("data/skipped", batch["skipped"].sum().float(), reduce_fx="sum", batch_size=b)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if getattr(self, "_starting", False):
            self._starting = False
            check_first_batch(self, batch)  # leffa.stage_checks

    def on_after_backward(self) -> None:
        self.bank.release()  # nothing reads a training step's features or captures after its backward

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step("train", batch, self.noise_generator, batch_idx)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # a fixed draw per batch, so validation losses of different checkpoints are comparable
        generator = torch.Generator().manual_seed(10_000 * self.global_rank + batch_idx)
        return self._step("val", batch, generator)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """The batch's targets sampled with ``self.sampling``, each from a generator seeded by its key
        (so independent of batch size, order and ranks); keys and images in [-1, 1]."""
        images = sample(self, batch, self.sampling, key_generators(batch["key"], self.sampling.seed))
        return {"key": batch["key"], "image": images}

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(10_000 * self.global_rank + batch_idx)
        return self._step("test", batch, generator)
