"""The Leffa LightningModule: frozen VAE, Reference and Generative UNets, diffusion loss (Eq. 1)
plus lambda * Leffa loss (Eq. 2-5); the optimizer and learning-rate schedule from the config
(AdamW by default). EMA comes from the ``leffa.ema.TrainableEMA`` callback (configured on the
Trainer), parallelism from the Trainer's strategy.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import lightning as L
import torch
from diffusers.utils.torch_utils import randn_tensor
from jsonargparse.typing import Path_fr, path_type
from lightning.pytorch.cli import OptimizerCallable

from leffa import losses
from leffa.architectures import LATENT_CHANNELS, ReferenceDenoiser, architecture_class
from leffa.attention import ReferenceBank
from leffa.checkpoints import guard_checkpoint_loading, load_weights, read_settings, read_state_dict
from leffa.conditioning import build_conditioning, conditioning_channels, samples_posterior
from leffa.errors import UserError
from leffa.leffa_layers import check_image_size, check_leffa_settings, leffa_layers
from leffa.nonfinite import LOSS_TERMS, NonFiniteStop
from leffa.pretrained import load_scheduler, load_vae, load_vae_folder, read_config, vae_scale_factor
from leffa.released import RELEASED_CROSS_ATTENTION, has_cross_attention_norm
from leffa.parallel import shard_for_strategy
from leffa.resume_settings import check_optimizer_covers, check_resume_settings
from leffa.rng_state import generator_states, restore_generator_state
from leffa.sampling import SamplingConfig, key_generators, sample
from leffa.schedules import LRSchedule, build_scheduler
from leffa.selection import SelectionWindow, draw_selection, leffa_rows
from leffa.speed import SpeedSettings, apply_speed, autocast_on, pinned_copy, refuse_compile_with
from leffa.throughput import report_training_start
from leffa.trainable import LORA_MARKERS, LoraSettings, base_layer_names, has_lora
from leffa.unets import check_cross_attention_mode, is_sdxl

__all__ = ["LeffaModule"]

Path_dr = path_type("dr")  # a readable folder; in a YAML config, relative to the config file's folder


class LeffaModule(L.LightningModule):
    """Dual-UNet latent diffusion for virtual try-on and pose transfer, with the Leffa loss.

    Args:
        pretrained_model: local SD1.5(-inpainting) or SDXL(-inpainting) diffusers folder: both
            UNets, the VAE and the scheduler come from it. Never downloaded. An SDXL UNet (its
            config has the ``text_time`` added embedding) trains, as the released pose-transfer
            model does, without that embedding and with betas rescaled to zero terminal SNR.
        architecture: the denoiser with reference attention (``leffa.architectures``): ``dual_unet``,
            the paper's Generative + Reference UNet; ``concat_unet``, a CatVTON-style single UNet
            over person and garment side by side (try-on conditioning; its configs train
            ``trainable: attention``).
        reference_pretrained_model: another folder for the Reference UNet (default: the same).
        unet_config: ``UNet2DConditionModel`` config (a mapping, or a JSON/YAML file such as a
            diffusers ``config.json``), used when no folder is given; tests and the demo use it.
        vae_config: ``AutoencoderKL`` config (mapping or file), used when no folder is given.
        vae_pretrained: a local diffusers ``AutoencoderKL`` folder (e.g. ``assets/tiny_vae_synthetic``,
            written by ``python -m replicate.train_tiny_vae``; in a YAML config, relative to the
            config file's folder); it takes precedence over ``vae_config`` and over
            ``pretrained_model``'s VAE.
        conditioning: Generative UNet input layout: ``tryon``, ``pose``, ``pose_image`` or
            ``released`` (see ``leffa.conditioning``).
        cross_attention: what becomes of the UNets' text cross-attention: ``passthrough`` (the
            authors' code and checkpoints: each transformer block adds ``norm2(h)``) or
            ``removed`` (the paper's text: the step is gone); see ``leffa.unets``. A checkpoint
            loads only into a module with its own setting.
        use_leffa_loss: add lambda * Leffa (Eq. 5); the paper turns it on in the last stage.
        lambda_leffa: weight of the Leffa loss (paper: 1e-3).
        theta_resolution: only layers whose token grid height h satisfies h/H > theta take part
            (paper: 1/32).
        theta_timestep: only samples with t < theta take part (paper: 500 of 1000).
        tau: softmax temperature of the Leffa attention map (paper: 2.0).
        average_heads: average the attention over heads before the loss (paper); False is the
            per-head ablation of Tab. 8.
        upsample_flow: upsample flow fields to image size (paper); False is Tab. 8's ablation.
        freeze_reference_unet: freeze the Reference UNet (Tab. 9 ablation; the paper trains both).
        num_registers: learnable register tokens per self-attention layer (0: off).
        p_drop_ref: probability of replacing a sample's reference latent by zeros in training, so
            that sampling can use classifier-free guidance over the reference.
        learning_rate: AdamW learning rate (paper: 1e-5), when no ``optimizer`` is given.
        weight_decay: AdamW weight decay, when no ``optimizer`` is given.
        optimizer: the optimizer, as a config names a class (``class_path: torch.optim.AdamW``,
            ``init_args: {lr: ...}``; 8-bit AdamW: ``leffa.optimizers.AdamW8bit``); called with the
            trainable parameters. None: AdamW with ``learning_rate`` and ``weight_decay``.
        lr_schedule: warmup then constant or cosine (``leffa.schedules``); None: a constant rate.
        trainable: which parameters train: ``all`` (the paper), ``attention`` (self-attention of
            both UNets and the Generative UNet's ``conv_in``) or ``lora`` (``leffa.trainable``).
        lora: the adapters of ``trainable: lora`` (rank, alpha, target modules).
        gradient_checkpointing: recompute UNet blocks in backward to save activation memory.
        init_from: weights of a previous stage (Lightning checkpoint or safetensors); only the
            weights, never optimizer state. Resuming a stage is the Trainer's ``--ckpt_path``. A
            plain (not LoRA) checkpoint initialises a ``lora`` module's pretrained weights; its
            adapters then start as peft initialises them (the pretrained function).
        init_from_weights: ``ema`` or ``live`` weights of ``init_from``.
        sampling: how ``leffa predict`` samples (scheduler, steps, guidance, ...).
        speed: training-speed switches (``leffa.speed``: regional ``compile``, ``channels_last``,
            ``frozen_bf16``), applied when the Trainer sets the module up (:meth:`apply_speed`).
    """

    #: FLOPs of one training batch, for ThroughputMonitor's MFU (set at the first batch: leffa.throughput)
    flops_per_batch: int | None = None

    def __init__(
        self,
        pretrained_model: str | None = None,
        architecture: str = "dual_unet",
        reference_pretrained_model: str | None = None,
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
        freeze_reference_unet: bool = False,
        num_registers: int = 0,
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
        # read files now, so the checkpoint's hyper-parameters hold the architecture itself
        unet_config, vae_config = read_config(unet_config), read_config(vae_config)
        self.save_hyperparameters()
        if isinstance(optimizer, dict):  # a checkpoint's record of it: only the CLI's parser makes it callable
            raise UserError("model.optimizer: give the optimizer through the config (class_path and init_args) "
                            "or as a callable, not as a mapping")
        self.optimizer_factory = optimizer
        self.lora_settings = LoraSettings(**lora) if isinstance(lora, dict) else lora or LoraSettings()
        # (LightningCLI hands save_hyperparameters the values as written in the YAML: store the mappings)
        self.hparams.update(unet_config=unet_config, vae_config=vae_config,
                            vae_pretrained=None if vae_pretrained is None else os.fspath(vae_pretrained))
        if not 0.0 <= p_drop_ref < 1.0:
            raise UserError(f"model.p_drop_ref must be in [0, 1), got {p_drop_ref}")
        check_cross_attention_mode(cross_attention)
        check_leffa_settings(lambda_leffa, theta_resolution, tau)
        self.denoiser: ReferenceDenoiser = architecture_class(architecture)(
            pretrained_model, reference_pretrained_model, unet_config,
            in_channels=LATENT_CHANNELS + conditioning_channels(conditioning), num_registers=num_registers,
            theta_resolution=theta_resolution, freeze_reference=freeze_reference_unet,
            gradient_checkpointing=gradient_checkpointing, trainable=trainable,
            lora=self.lora_settings, conditioning=conditioning, cross_attention=cross_attention,
        )
        for name, component in self.denoiser.components().items():
            self.add_module(name, component)  # their names are the checkpoint keys' prefixes
        self.bank: ReferenceBank = self.denoiser.bank
        vae = load_vae_folder(vae_pretrained) if vae_pretrained else load_vae(pretrained_model, vae_config)
        self.vae = vae.requires_grad_(False).eval()
        # the released code rescales SDXL's betas to zero terminal SNR (and SD1.5's not)
        self.scheduler = load_scheduler(pretrained_model, zero_terminal_snr=is_sdxl(pretrained_model, unet_config))
        steps = self.scheduler.config.num_train_timesteps
        if not 1 <= theta_timestep <= steps:
            raise UserError(f"model.theta_timestep must be in 1..{steps} (samples with t < theta_timestep take part in "
                            f"the Leffa loss; the scheduler has {steps} timesteps), got {theta_timestep}")
        # Why a generator of our own: each data-parallel rank needs its own stream of noise, timesteps
        # and reference drops, and its state goes into checkpoints so a resumed run draws what an
        # uninterrupted one would have drawn. Seeded per rank in setup().
        self.noise_generator = torch.Generator()
        # the selection draws of the optimizer step in progress (leffa.selection)
        self._window = SelectionWindow()
        # the loss terms of the last training micro-batch (checked by leffa.nonfinite.NonFiniteStop)
        self.step_terms: dict[str, torch.Tensor] = {}
        self.sampling = SamplingConfig(**sampling) if isinstance(sampling, dict) else sampling or SamplingConfig()
        self.speed = SpeedSettings(**speed) if isinstance(speed, dict) else speed or SpeedSettings()
        if self.speed.compile:
            refuse_compile_with(gradient_checkpointing=gradient_checkpointing)
        self._speed_applied: set[str] = set()
        self.lr_schedule = LRSchedule(**lr_schedule) if isinstance(lr_schedule, dict) else lr_schedule
        if self.lr_schedule is not None:
            self.lr_schedule.check()
        # checkpoints hold plain values only (they are read with weights_only=True): the settings
        # as mappings, the optimizer as the config named it (a class path and its arguments) or
        # not at all when given as a Python callable
        given_optimizer = self.hparams.get("optimizer")
        self.hparams.update(
            sampling=dataclasses.asdict(self.sampling),
            speed=dataclasses.asdict(self.speed),
            lr_schedule=dataclasses.asdict(self.lr_schedule) if self.lr_schedule else None,
            lora=dataclasses.asdict(self.lora_settings),
            optimizer=given_optimizer if isinstance(given_optimizer, dict) else None,
        )
        if init_from:
            self.init_weights(init_from, init_from_weights)

    def init_weights(self, path: str, weights: str = "ema") -> None:
        """Load the weights of ``path`` (``model.init_from``); see the class docstring."""
        state, optional = read_state_dict(path, weights), ("processor.registers",)
        self.check_cross_attention(state, f"model.init_from={path}")
        if has_lora(self) and not has_lora(state):
            # a plain checkpoint: its adapted layers' weights go to their base_layer; new adapters
            state, optional = base_layer_names(state, self.state_dict().keys()), optional + LORA_MARKERS
        elif has_lora(state) and not has_lora(self):
            raise UserError(f"model.init_from={path} holds LoRA adapters: set model.trainable: lora (with the same "
                            "model.lora) to go on training them, or export it merged first (leffa export)")
        hp = self.hparams
        base = (f"model.pretrained_model={hp.pretrained_model}" if hp.pretrained_model
                else "model.unet_config" if hp.unet_config else "the model")
        load_weights(self, state, optional=optional, source=f"model.init_from={path}",
                     target=f"the model built from {base}")

    def check_cross_attention(self, state: dict, source: str) -> None:
        """One error line when ``state`` was written with the other ``model.cross_attention`` (its
        transformer blocks' ``norm2`` tells: ``passthrough`` keeps it, ``removed`` has none)."""
        theirs = "passthrough" if has_cross_attention_norm(state) else "removed"
        ours = self.hparams.cross_attention
        if theirs == ours or not any(".transformer_blocks." in k for k in state):
            return
        hint = " (the released checkpoints compute with passthrough)" if theirs == RELEASED_CROSS_ATTENTION else ""
        raise UserError(f"{source} was written with model.cross_attention: {theirs}, this model is built with "
                        f"{ours}; set model.cross_attention: {theirs}{hint}")

    @classmethod
    def from_checkpoint(cls, path: str | Path, weights: str = "ema", **overrides) -> LeffaModule:
        """The module rebuilt from a checkpoint that carries its settings (Lightning ``.ckpt``,
        sharded folder, ``leffa export`` folder) with its ``weights`` (``ema`` or ``live``);
        ``overrides`` change settings (e.g. ``use_leffa_loss``). Weights-only forms (released
        ``.pth``, ``.safetensors``) are a one-line error: give them as ``init_from`` with a config."""
        settings = read_settings(path)
        settings.pop("optimizer", None)  # training-only, and a record of the config rather than a callable
        return cls(**{**settings, "init_from": str(path), "init_from_weights": weights, **overrides})

    # ---------------------------------------------------------------- Lightning plumbing

    def setup(self, stage: str) -> None:
        self.noise_generator.manual_seed(torch.initial_seed() + self.global_rank)
        self._checked_size = None
        if self._trainer is not None:  # the Trainer reads its ckpt_path after this hook: check it first
            guard_checkpoint_loading(self.trainer.strategy)
            if self.speed.compile:
                refuse_compile_with(strategy=self.trainer.strategy)
            # cached latents (data.latents) must come from this VAE: checked before its weights may
            # be stored in bf16 (model.speed.frozen_bf16), which would change its fingerprint
            cache = getattr(self.trainer.datamodule, "latent_cache", None)
            if cache:
                self.check_latent_cache(cache)
            self.apply_speed(bf16=str(self.trainer.precision).startswith("bf16"))
            # the data's image size, where the data module says it (LeffaDataModule): checked now,
            # before any batch; other data are checked at the first training batch
            settings = getattr(self.trainer.datamodule, "hparams", None) or {}
            if isinstance(settings.get("height"), int) and isinstance(settings.get("width"), int):
                self.check_image_size(settings["height"], settings["width"], stage)

    def apply_speed(self, bf16: bool) -> None:
        """``leffa.speed.apply_speed``: each switch of ``self.speed`` once, before any sharding."""
        apply_speed(self, self.speed, self._speed_applied, bf16)

    def vae_fingerprint(self) -> str:
        """The frozen VAE's fingerprint (``leffa.data.latents.vae_fingerprint``), computed once, from
        the weights as loaded (before ``model.speed.frozen_bf16`` may store them in bf16)."""
        if getattr(self, "_vae_fingerprint", None) is None:
            from leffa.data.latents import vae_fingerprint

            self._vae_fingerprint = vae_fingerprint(self.vae)
        return self._vae_fingerprint

    def check_latent_cache(self, record: dict) -> None:
        """One error line when cached latents (``record``: the ``latents`` entry of the cache's
        manifest, ``leffa.data.latents``) were made by another VAE than this module's or lack an
        image that this module's conditioning encodes. Their image size is checked by the data
        module (``data.height``, ``data.width``)."""
        from leffa.data.latents import check_cache_fits

        check_cache_fits(record, self.vae_fingerprint(), self.hparams.conditioning)

    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (``leffa.pretrained.vae_scale_factor``)."""
        return vae_scale_factor(self.vae)

    def check_image_size(self, height: int, width: int, stage: str) -> None:
        """``leffa.leffa_layers.check_image_size`` for this module (one line for a size the VAE or the
        Leffa layer selection cannot take; then which layers take part)."""
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
        self.check_cross_attention(checkpoint.get("state_dict", {}), "--ckpt_path")
        if self._trainer is not None:  # the Trainer's ckpt_path (not load_from_checkpoint's overrides)
            path = self.trainer.ckpt_path
            self.check_resume_settings(checkpoint.get("hyper_parameters") or {}, self.trainer.state.fn == "fit",
                                       f"--ckpt_path {path}" if path else "--ckpt_path")
        check_optimizer_covers(checkpoint, sum(p.requires_grad for p in self.parameters()))
        restore_generator_state(self, checkpoint.get("noise_generator"))

    def check_resume_settings(self, saved: dict, fitting: bool, source: str = "--ckpt_path") -> None:
        """``leffa.resume_settings.check_resume_settings`` of this module's settings against ``saved``."""
        check_resume_settings(dict(self.hparams), saved, fitting, source)

    def configure_model(self) -> None:
        """Prepare for a sharding strategy (``leffa.parallel``); under DDP or one device, nothing.

        Under ``ModelParallelStrategy`` (it gives a device mesh) both UNets are sharded with FSDP2;
        ``FSDPStrategy`` wraps the model itself. Under either, callbacks that cannot work
        with a sharded model (``EMAWeightAveraging``, ``SampleGrid``, ``FlowPictures``) are an
        error. Safe to call more than once.

        Because this hook exists, Lightning's ``EMAWeightAveraging`` warns at start-up that it
        "doesn't support sharding model layers" and calls it itself (``leffa.ema.TrainableEMA``
        calls it without the warning); under DDP or one device nothing is sharded.
        """
        if self._trainer is not None:
            shard_for_strategy(self, self.trainer)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping (``trainer.gradient_clip_val``), except by norm under
        ``FSDPStrategy``: its precision plugin refuses that (a norm over one rank's shards is not
        the total), so the FSDP root module's own ``clip_grad_norm_`` (over all ranks) clips."""
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = self.trainer.strategy
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(strategy, FSDPStrategy):
            strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        """The optimizer over the trainable parameters only, and the learning-rate schedule."""
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:  # one fused kernel for every tensor on a GPU
            optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay,
                                          fused=self.device.type == "cuda" or None)
        else:
            optimizer = self.optimizer_factory(params)
        if self.lr_schedule is None:
            return optimizer
        max_steps = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else None
        return {"optimizer": optimizer, "lr_scheduler": build_scheduler(optimizer, self.lr_schedule, max_steps)}

    # ---------------------------------------------------------------- model

    @torch.no_grad()
    def encode(self, image: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None,
               moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled VAE latent (B, 4, H/8, W/8).

        With a generator, a sample of the VAE's posterior drawn from it on the CPU (so a run's
        randomness stays in the module's own generator), or from one generator per sample (each
        draws its own sample's noise); without, the posterior mode.

        With ``moments``, the image's cached posterior ``(mean, std)`` (``leffa cache-latents``;
        ``batch["moments"]``) stand for the VAE, which does not run: the same latent, drawn the same
        way (the mean is the mode; the sample is ``mean + std * noise``, with the same draw).
        """
        if moments is None:
            dist = self.vae.encode(image.to(self.vae.dtype)).latent_dist
            moments = dist.mode(), dist.std
        # float32 also from a VAE stored in bf16 (model.speed.frozen_bf16)
        latent = moments[0].float()
        if generator is not None:
            noise = randn_tensor(latent.shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
            latent = latent + moments[1].float() * pinned_copy(noise, latent.device)
        # float32 under autocast (bf16-mixed) and in float32 runs; under bf16-true (no autocast, every
        # weight in bf16) the UNets take the VAE's own dtype
        dtype = torch.float32 if autocast_on(latent.device) else self.vae.dtype
        return (latent * self.vae.config.scaling_factor).to(dtype)

    def encode_inputs(self, batch: dict, generator: torch.Generator | list[torch.Generator] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference latent and the conditioning channels of ``batch``. For a layout that draws
        posterior samples (``leffa.conditioning.samples_posterior``: ``released``) they come from
        ``generator``, the conditioning's first and the reference's second, the released pipeline's
        order; otherwise both are posterior modes and nothing is drawn. Images whose cached moments
        the batch carries (``batch["moments"]``, from cached latents) are not encoded again."""
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
        """Epsilon prediction (B, 4, h, w) given the encoded reference."""
        return self.denoiser.denoise(noisy_latent, timesteps, conditioning)

    def forward(self, noisy_latent, timesteps, conditioning, ref_latent, image_hw=None, capture_rows=None):
        """Reference pass then generative pass; Leffa captures for ``capture_rows`` land in ``self.bank``."""
        self.bank.begin(noisy_latent.shape[-2:], image_hw, capture_rows)
        self.run_reference(ref_latent, timesteps)
        return self.denoise(noisy_latent, timesteps, conditioning)

    def noised_forward(self, batch: dict, generator: torch.Generator, timesteps: torch.Tensor,
                       keep_ref: torch.Tensor | None = None,
                       capture_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The one forward of training, validation and the flow pictures: the batch's targets noised
        to ``timesteps`` (B,), the references zeroed where ``keep_ref`` is False, both UNets run,
        Leffa captures taken for ``capture_rows`` (in ``self.bank.captures``); returns
        (prediction, noise). Draws from ``generator`` (CPU): the VAE posterior sample of the
        targets, those of the conditioning and the reference where the layout samples them
        (:meth:`encode_inputs`), then the noise. Cached latents (``batch["moments"]``) replace the
        VAE with the same draws."""
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

    # ---------------------------------------------------------------- losses

    def leffa_loss(self, ref_image: torch.Tensor, tgt_image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 4 summed over the layers the bank captured, per selected sample, shape (b,)."""
        hp = self.hparams
        return losses.leffa_loss(self.bank.captures.values(), ref_image, tgt_image, mask, tau=hp.tau,
                                 average_heads=hp.average_heads, upsample=hp.upsample_flow)

    def draw_selection(self, generator: torch.Generator, n: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps and reference keeps (reference dropout in training only) of ``n`` samples, on the
        CPU (``leffa.selection``: the random stream of a training step)."""
        p_drop_ref = self.hparams.p_drop_ref if train else 0.0
        return draw_selection(generator, n, self.scheduler.config.num_train_timesteps, p_drop_ref)

    def leffa_rows(self, timesteps: torch.Tensor, keep_ref: torch.Tensor) -> torch.Tensor:
        """Samples of the Leffa term: Sec. 3.3's t < theta, and a reference to attend to."""
        return leffa_rows(timesteps, keep_ref, self.hparams.theta_timestep)

    def loss_terms(self, batch: dict, generator: torch.Generator, timesteps: torch.Tensor,
                   keep_ref: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample terms of one batch with the given selection draws: ``diffusion`` (b,), and
        with the Leffa loss on ``rows`` (the selected samples) and ``leffa`` (one per row captured
        by the bank; absent when no layer took part)."""
        hp = self.hparams
        # the selected rows from the draws on the CPU: no device sync, and a copy of the module on
        # the meta device (leffa.throughput counts its FLOPs) gets them too
        rows = self.leffa_rows(timesteps.cpu(), keep_ref.cpu()) if hp.use_leffa_loss else None
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

    def _selection(self, b: int, train: bool, generator: torch.Generator,
                   batch_idx: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float | None]:
        """This micro-batch's timesteps, reference keeps and Leffa weight per selected sample (the
        window of its optimizer step: ``leffa.selection.SelectionWindow``); ``None`` as the weight
        outside training: the term is then this batch's mean."""
        trainer = self._trainer
        if not train or batch_idx is None or trainer is None:
            return (*self.draw_selection(generator, b, train), None)
        count = (lambda t, k: float(self.leffa_rows(t, k).numel())) if self.hparams.use_leffa_loss else None
        return self._window.take(b, batch_idx, trainer, lambda n: self.draw_selection(generator, n, train), count,
                                 self.device)

    def compute_loss(self, batch: dict, generator: torch.Generator, train: bool,
                     batch_idx: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Eq. 5 on one batch: (loss, metrics). ``train`` turns on reference dropout and, inside a
        Trainer with ``batch_idx``, the global normalisation of the Leffa term over the optimizer
        step (see ``_selection``); ``generator`` is the random stream (the module's own in training)."""
        hp = self.hparams
        timesteps, keep_ref, leffa_weight = self._selection(batch["tgt"].shape[0], train, generator, batch_idx)
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
        """The callback that stops before a non-finite loss or gradient reaches the weights and logs
        ``train/grad_norm`` (``leffa.nonfinite``): part of the model, on every Trainer that fits it."""
        return [NonFiniteStop()]

    def _log_metrics(self, stage: str, metrics: dict, batch: dict) -> None:
        if self._trainer is None:  # called outside a Trainer (tests, benchmarks)
            return
        b = batch["tgt"].shape[0]
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, batch_size=b, sync_dist=stage != "train", prog_bar=name == "loss")
        if "skipped" in batch:
            self.log("data/skipped", batch["skipped"].sum().float(), reduce_fx="sum", batch_size=b)

    def on_train_start(self) -> None:
        self._starting = True

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if getattr(self, "_starting", False):  # the global batch, and FLOPs for ThroughputMonitor
            self._starting = False
            size = tuple(batch["tgt"].shape[-2:])
            if size != getattr(self, "_checked_size", None):  # data that do not say their size (see setup)
                self.check_image_size(*size, "fit")
            report_training_start(self, batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step("train", batch, self.noise_generator, batch_idx)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # a fixed draw per batch, so validation losses of different checkpoints are comparable
        generator = torch.Generator().manual_seed(10_000 * self.global_rank + batch_idx)
        return self._step("val", batch, generator)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Generate the batch's targets with ``self.sampling``; returns keys and images in [-1, 1].

        Each sample's noise comes from a generator seeded by its key and ``sampling.seed``, so its
        image does not depend on the batch size, the order of the samples or the number of ranks.
        """
        images = sample(self, batch, self.sampling, key_generators(batch["key"], self.sampling.seed))
        return {"key": batch["key"], "image": images}

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(10_000 * self.global_rank + batch_idx)
        return self._step("test", batch, generator)
