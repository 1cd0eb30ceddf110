"""The Leffa LightningModule: frozen VAE, Reference and Generative UNets, diffusion loss (Eq. 1)
plus lambda * Leffa loss (Eq. 2-5), AdamW. EMA comes from Lightning's ``EMAWeightAveraging``
callback (configured on the Trainer), parallelism from the Trainer's strategy.
"""

from __future__ import annotations

import dataclasses
import os

import lightning as L
import torch
from jsonargparse.typing import Path_fr, path_type

from leffa.attention import ReferenceBank, attach_reference_attention
from leffa.checkpoints import guard_checkpoint_loading, load_weights, read_state_dict
from leffa.conditioning import build_conditioning, conditioning_channels
from leffa.errors import UserError
from leffa.losses import attention_flow, diffusion_loss, warp_loss
from leffa.pretrained import load_scheduler, load_vae, load_vae_folder, read_config
from leffa.sampling import SamplingConfig, key_generators, make_scheduler, sample
from leffa.unets import build_unet

__all__ = ["LeffaModule"]

LATENT_CHANNELS = 4
Path_dr = path_type("dr")  # a readable folder; in a YAML config, relative to the config file's folder
# the loss terms checked for non-finite values before each optimizer step
LOSS_TERMS = ("diffusion", "leffa")


class LeffaModule(L.LightningModule):
    """Dual-UNet latent diffusion for virtual try-on and pose transfer, with the Leffa loss.

    Args:
        pretrained_model: local SD1.5 (or SD1.5-inpainting) diffusers folder: both UNets, the VAE
            and the scheduler come from it. Never downloaded.
        reference_pretrained_model: another folder for the Reference UNet (default: the same).
        unet_config: ``UNet2DConditionModel`` config (a mapping, or a JSON/YAML file such as a
            diffusers ``config.json``), used when no folder is given; tests and the demo use it.
        vae_config: ``AutoencoderKL`` config (mapping or file), used when no folder is given.
        vae_pretrained: a local diffusers ``AutoencoderKL`` folder (e.g. ``assets/tiny_vae_synthetic``,
            written by ``python -m data_prep.train_tiny_vae``; in a YAML config, relative to the
            config file's folder); it takes precedence over ``vae_config`` and over
            ``pretrained_model``'s VAE.
        conditioning: Generative UNet input layout: ``tryon``, ``pose``, ``pose_image`` or
            ``released`` (see ``leffa.conditioning``).
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
        learning_rate: AdamW learning rate (paper: 1e-5).
        weight_decay: AdamW weight decay.
        gradient_checkpointing: recompute UNet blocks in backward to save activation memory.
        init_from: weights of a previous stage (Lightning checkpoint or safetensors); only the
            weights, never optimizer state. Resuming a stage is the Trainer's ``--ckpt_path``.
        init_from_weights: ``ema`` or ``live`` weights of ``init_from``.
        sampling: how ``leffa predict`` samples (scheduler, steps, guidance, ...).
    """

    def __init__(
        self,
        pretrained_model: str | None = None,
        reference_pretrained_model: str | None = None,
        unet_config: Path_fr | dict | None = None,
        vae_config: Path_fr | dict | None = None,
        vae_pretrained: Path_dr | str | None = None,
        conditioning: str = "tryon",
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
        gradient_checkpointing: bool = False,
        init_from: str | None = None,
        init_from_weights: str = "ema",
        sampling: SamplingConfig | None = None,
    ):
        super().__init__()
        # read files now, so the checkpoint's hyper-parameters hold the architecture itself
        unet_config, vae_config = read_config(unet_config), read_config(vae_config)
        self.save_hyperparameters()
        # (LightningCLI hands save_hyperparameters the values as written in the YAML: store the mappings)
        self.hparams.update(unet_config=unet_config, vae_config=vae_config,
                            vae_pretrained=None if vae_pretrained is None else os.fspath(vae_pretrained))
        if not 0.0 <= p_drop_ref < 1.0:
            raise UserError(f"model.p_drop_ref must be in [0, 1), got {p_drop_ref}")
        in_channels = LATENT_CHANNELS + conditioning_channels(conditioning)
        self.generative_unet = build_unet(pretrained_model, unet_config, in_channels)
        self.reference_unet = build_unet(reference_pretrained_model or pretrained_model, unet_config, LATENT_CHANNELS)
        self.bank: ReferenceBank = attach_reference_attention(
            self.generative_unet, self.reference_unet, num_registers, ReferenceBank(theta_resolution=theta_resolution)
        )
        vae = load_vae_folder(vae_pretrained) if vae_pretrained else load_vae(pretrained_model, vae_config)
        self.vae = vae.requires_grad_(False).eval()
        self.scheduler = load_scheduler(pretrained_model)
        if freeze_reference_unet:
            self.reference_unet.requires_grad_(False)
        if gradient_checkpointing:
            self.generative_unet.enable_gradient_checkpointing()
            self.reference_unet.enable_gradient_checkpointing()
        # Why a generator of our own: each data-parallel rank needs its own stream of noise, timesteps
        # and reference drops, and its state goes into checkpoints so a resumed run draws what an
        # uninterrupted one would have drawn. Seeded per rank in setup().
        self.noise_generator = torch.Generator()
        # the selection draws of the optimizer step in progress, one pair per micro-batch still to
        # come, and its Leffa weight (see the comment above draw_selection)
        self._pending_selection: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._leffa_weight: torch.Tensor | None = None
        # which loss terms went non-finite since the last optimizer step (see on_before_optimizer_step)
        self._nonfinite: torch.Tensor | None = None
        self.sampling = SamplingConfig(**sampling) if isinstance(sampling, dict) else sampling or SamplingConfig()
        # checkpoints hold plain values only (they are read with weights_only=True)
        self.hparams.update(sampling=dataclasses.asdict(self.sampling))
        if init_from:
            load_weights(self, read_state_dict(init_from, init_from_weights), optional=("processor.registers",),
                         source=f"model.init_from={init_from}")

    # ---------------------------------------------------------------- Lightning plumbing

    def setup(self, stage: str) -> None:
        self.noise_generator.manual_seed(torch.initial_seed() + self.global_rank)
        if self._trainer is not None:  # the Trainer reads its ckpt_path after this hook: check it first
            guard_checkpoint_loading(self.trainer.strategy)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen: keep it in eval mode whatever the Trainer does
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # every rank's generator state, (world, n) bytes: Lightning writes rank 0's dict only
        state = self.noise_generator.get_state()
        if self._trainer is not None and self.trainer.world_size > 1:
            state = self.all_gather(state.to(self.device)).cpu()
        checkpoint["noise_generator"] = state.reshape(-1, state.shape[-1])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("noise_generator")
        if states is None:
            return
        states = states.reshape(-1, states.shape[-1])
        if self.global_rank < len(states):
            self.noise_generator.set_state(states[self.global_rank].clone())
        else:  # more ranks than when saved: a fresh stream of its own for this rank
            self.noise_generator.manual_seed(torch.initial_seed() + self.global_rank + 1_000_003 * self.global_step)

    def configure_model(self) -> None:
        """Prepare for a sharding strategy (``leffa.parallel``); under DDP or one device, nothing.

        Under ``ModelParallelStrategy`` (it gives a device mesh) the Reference UNet's head, which no
        loss reaches, is frozen (so its checkpoints can be resumed) and both UNets are sharded with
        FSDP2; ``FSDPStrategy`` wraps the model itself. Under either, callbacks that cannot work
        with a sharded model (``EMAWeightAveraging``, ``SampleGrid``, ``FlowPictures``) are an
        error. Safe to call more than once.

        Because this hook exists, ``EMAWeightAveraging`` warns at start-up that it "doesn't support
        sharding model layers" and calls it itself; under DDP or one device nothing is sharded and
        the warning can be ignored.
        """
        from leffa import parallel

        if self._trainer is None or not parallel.is_sharding(self.trainer.strategy):
            return
        parallel.refuse_unshardable_callbacks(self.trainer.strategy, self.trainer.callbacks)
        mesh = self.device_mesh
        if mesh is None:  # FSDPStrategy: it wraps the model after this hook
            return
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise UserError(f"the UNets have no tensor-parallel plan: use tensor_parallel_size=1, "
                             f"got {mesh['tensor_parallel'].size()} (mesh {mesh})")
        parallel.freeze_unused_reference_parameters(self.reference_unet, self.bank)
        # a bf16 Trainer ("bf16-mixed", "bf16-true") also all-gathers and computes in bf16;
        # the sharded master weights and the gradient reduction stay float32
        param_dtype = torch.bfloat16 if str(self.trainer.precision).startswith("bf16") else None
        parallel.shard_unets(self.generative_unet, self.reference_unet, mesh["data_parallel"], param_dtype)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)

    # ---------------------------------------------------------------- model

    @torch.no_grad()
    def encode(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled VAE latent (B, 4, H/8, W/8).

        With a generator, a sample of the VAE's posterior drawn from it (the diffusion target, so a
        run's randomness stays in the module's own generator); without, the posterior mode.
        """
        dist = self.vae.encode(image.to(self.vae.dtype)).latent_dist
        latent = dist.mode()
        if generator is not None:
            latent = latent + dist.std * torch.randn(latent.shape, generator=generator).to(latent)
        return latent * self.vae.config.scaling_factor

    def run_reference(self, ref_latent: torch.Tensor, timesteps: torch.Tensor) -> None:
        """Run the Reference UNet; its processors record every self-attention input in the bank."""
        self.bank.features.clear()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.hparams.freeze_reference_unet):
            self.reference_unet(ref_latent, timesteps, encoder_hidden_states=None)

    def denoise(self, noisy_latent: torch.Tensor, timesteps: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        """Generative UNet: epsilon prediction (B, 4, h, w) given the recorded reference features."""
        x = torch.cat([noisy_latent, conditioning.to(noisy_latent.dtype)], dim=1)
        return self.generative_unet(x, timesteps, encoder_hidden_states=None).sample

    def forward(self, noisy_latent, timesteps, conditioning, ref_latent, image_hw=None, capture_rows=None):
        """Reference pass then generative pass; Leffa captures for ``capture_rows`` land in ``self.bank``."""
        self.bank.latent_hw = tuple(noisy_latent.shape[-2:])
        self.bank.image_hw = image_hw
        self.bank.capture_rows = capture_rows
        self.bank.captures.clear()
        self.run_reference(ref_latent, timesteps)
        return self.denoise(noisy_latent, timesteps, conditioning)

    # ---------------------------------------------------------------- losses

    def leffa_loss(self, ref_image: torch.Tensor, tgt_image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Eq. 4 summed over the captured layers, per selected sample, shape (b,)."""
        hp = self.hparams
        total = tgt_image.new_zeros(tgt_image.shape[0], dtype=torch.float32)
        # the flow is computed in float32 even under bf16 autocast: coordinates need the precision
        with torch.autocast(device_type=tgt_image.device.type, enabled=False):
            for capture in self.bank.captures.values():
                h, w = capture.grid
                reg = capture.register_key.float() if capture.register_key is not None else None
                flow = attention_flow(capture.query.float(), capture.key.float(), (h, w), hp.tau,
                                      hp.average_heads, register_key=reg)
                if hp.average_heads:
                    # (b, n, 2) -> (b, h, w, 2)
                    loss = warp_loss(flow.view(-1, h, w, 2), ref_image, tgt_image, mask, hp.upsample_flow)
                else:
                    # (b, heads, n, 2) -> (b*heads, h, w, 2): one loss per head, then the mean over heads
                    heads = flow.shape[1]
                    loss = warp_loss(
                        flow.reshape(-1, h, w, 2), ref_image.repeat_interleave(heads, 0),
                        tgt_image.repeat_interleave(heads, 0), mask.repeat_interleave(heads, 0), hp.upsample_flow,
                    ).view(-1, heads).mean(1)
                total = total + loss
        return total

    # Random stream of a training step (``noise_generator``, one per rank). Per optimizer step, i.e.
    # per window of ``accumulate_grad_batches`` micro-batches of b samples each: first the
    # timesteps of all A * b samples, then their reference keeps; then, per micro-batch, the VAE
    # posterior sample of the target and the noise. Drawing the window's selection up front lets
    # its first micro-batch know how many samples the whole optimizer step selects for the Leffa
    # term. Outside training (and outside a Trainer) a window is one batch.

    def draw_selection(self, generator: torch.Generator, n: int, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps and reference keeps (no dropout outside training) of ``n`` samples, on the CPU."""
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator)
        keep_ref = torch.rand(n, generator=generator) >= (self.hparams.p_drop_ref if stage == "train" else 0.0)
        return timesteps, keep_ref

    def leffa_rows(self, timesteps: torch.Tensor, keep_ref: torch.Tensor) -> torch.Tensor:
        """Samples of the Leffa term: Sec. 3.3's t < theta, and a reference to attend to."""
        return torch.nonzero((timesteps < self.hparams.theta_timestep) & keep_ref).flatten()

    def loss_terms(self, batch: dict, generator: torch.Generator, timesteps: torch.Tensor,
                   keep_ref: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample terms of one batch with the given selection draws: ``diffusion`` (b,), and
        with the Leffa loss on ``rows`` (the selected samples) and ``leffa`` (one per row captured
        by the bank; absent when no layer took part)."""
        hp = self.hparams
        tgt, ref, mask = batch["tgt"], batch["ref"], batch["mask"]
        b = tgt.shape[0]
        latents = self.encode(tgt, generator)
        ref_latent = self.encode(ref)
        conditioning = build_conditioning(hp.conditioning, batch, self.encode, tuple(latents.shape[-2:]))

        # random draws on the CPU generator, then moved: cheap, and identical on every device type
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        timesteps, keep_ref = timesteps.to(self.device), keep_ref.to(self.device)
        ref_latent = ref_latent * keep_ref.view(b, 1, 1, 1).to(ref_latent.dtype)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)

        rows = self.leffa_rows(timesteps, keep_ref) if hp.use_leffa_loss else None
        prediction = self(noisy, timesteps, conditioning, ref_latent, tuple(tgt.shape[-2:]), rows)
        terms = {"diffusion": diffusion_loss(prediction, noise)}
        if hp.use_leffa_loss:
            terms["rows"] = rows
            if self.bank.captures:
                terms["leffa"] = self.leffa_loss(ref[rows], tgt[rows], mask[rows])
        return terms

    def _selection(self, b: int, stage: str, generator: torch.Generator,
                   batch_idx: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This micro-batch's timesteps and reference keeps, and the Leffa term's weight per
        selected sample: (ranks x micro-batches) / (samples the whole optimizer step selects on
        all ranks), so that after Lightning's division by the micro-batches and data
        parallelism's mean over ranks the term is the mean over the global batch's selected
        samples. ``None`` outside training: the term is then this batch's mean."""
        trainer = self._trainer
        if stage != "train" or batch_idx is None or trainer is None:
            return (*self.draw_selection(generator, b, stage), None)
        accumulate = trainer.accumulate_grad_batches
        position = batch_idx % accumulate
        pending = self._pending_selection
        if position == 0 or not pending:
            # this micro-batch and the rest of its window (fewer at the end of a finite epoch)
            size = accumulate - position
            if trainer.num_training_batches != float("inf"):
                size = min(size, int(trainer.num_training_batches) - batch_idx)
            timesteps, keep_ref = self.draw_selection(generator, size * b, stage)
            count = torch.tensor(0.0, device=self.device)
            if self.hparams.use_leffa_loss:
                count = count + self.leffa_rows(timesteps, keep_ref).numel()
                if trainer.world_size > 1:  # one scalar, once per optimizer step
                    count = trainer.strategy.reduce(count, reduce_op="sum")
            self._leffa_weight = trainer.world_size * accumulate / count.clamp(min=1.0)
            pending = self._pending_selection = list(zip(timesteps.split(b), keep_ref.split(b)))
        timesteps, keep_ref = pending.pop(0)
        if len(timesteps) != b:
            raise ValueError(f"the micro-batches of one optimizer step must have one size: got {b} after "
                             f"{len(timesteps)} (training batches are never partial)")
        return timesteps, keep_ref, self._leffa_weight

    def _common_step(self, batch: dict, stage: str, generator: torch.Generator,
                     batch_idx: int | None = None) -> torch.Tensor:
        hp = self.hparams
        timesteps, keep_ref, leffa_weight = self._selection(batch["tgt"].shape[0], stage, generator, batch_idx)
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
        if stage == "train":
            self._track_nonfinite(metrics)
        metrics["loss"] = loss
        self._log_metrics(stage, metrics, batch)
        return loss

    def _track_nonfinite(self, metrics: dict) -> None:
        """Remember which loss terms of this micro-batch are not finite; checked (and reduced over
        the ranks) once per optimizer step, in ``on_before_optimizer_step``."""
        if self._trainer is None:
            return
        zero = torch.zeros((), dtype=torch.bool, device=self.device)
        flags = torch.stack([~torch.isfinite(metrics[t].detach()) if t in metrics else zero for t in LOSS_TERMS])
        self._nonfinite = flags if self._nonfinite is None else self._nonfinite | flags

    def on_before_optimizer_step(self, optimizer) -> None:
        """Stop before a non-finite loss or gradient reaches the weights.

        Stopping (rather than skipping the step) because a learning rate or a batch that makes the
        loss overflow does so again at the next step: skipping would hide it behind a run that
        no longer learns. The error comes before the optimizer step, hence before any checkpoint
        of poisoned weights; the last checkpoint written stays the last good one. Every rank
        raises at the same step: the flags are summed over the ranks (one small all-reduce).
        """
        flags = self._nonfinite if self._nonfinite is not None else torch.zeros(len(LOSS_TERMS), dtype=torch.bool)
        self._nonfinite = None
        flags = flags.to(self.device, torch.float32)
        # under a GradScaler (16-mixed) inf gradients are routine: it skips those steps itself
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # sharded: this rank's part
            # the largest magnitude: finite exactly when every entry is (no overflow, unlike a 2-norm)
            largest = torch.nn.utils.get_total_norm(grads, norm_type=float("inf")) if grads else flags.new_zeros(())
            flags = torch.cat([flags, (~torch.isfinite(largest)).float().view(1).to(flags.device)])
        if self.trainer.world_size > 1:
            flags = self.trainer.strategy.reduce(flags, reduce_op="sum")
        bad = [name for name, flag in zip((*LOSS_TERMS, "gradient"), flags.tolist()) if flag]
        if bad:
            what = f"{bad[0]} loss" if bad[0] in LOSS_TERMS else "gradient (the losses were finite)"
            step = self.trainer.global_step
            raise UserError(f"the {what} is not finite at global step {step}: training stopped before that step's "
                            f"optimizer update, so the weights and checkpoints of step {step} are intact; lower "
                            f"model.learning_rate or check the data")

    def _log_metrics(self, stage: str, metrics: dict, batch: dict) -> None:
        if self._trainer is None:  # called outside a Trainer (tests, benchmarks)
            return
        b = batch["tgt"].shape[0]
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, batch_size=b, sync_dist=stage != "train", prog_bar=name == "loss")
        if "skipped" in batch:
            self.log("data/skipped", batch["skipped"].sum().float(), reduce_fx="sum", batch_size=b)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._common_step(batch, "train", self.noise_generator, batch_idx)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # a fixed draw per batch, so validation losses of different checkpoints are comparable
        generator = torch.Generator().manual_seed(10_000 * self.global_rank + batch_idx)
        return self._common_step(batch, "val", generator)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Generate the batch's targets with ``self.sampling``; returns keys and images in [-1, 1].

        Each sample's noise comes from a generator seeded by its key and ``sampling.seed``, so its
        image does not depend on the batch size, the order of the samples or the number of ranks.
        """
        cfg = self.sampling
        generator = key_generators(batch["key"], cfg.seed)
        images = sample(self, batch, make_scheduler(cfg.scheduler, self.scheduler), cfg.num_steps,
                        cfg.guidance_scale, cfg.guidance_rescale, generator, cfg.reference_timestep, cfg.repaint)
        return {"key": batch["key"], "image": images}

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(10_000 * self.global_rank + batch_idx)
        return self._common_step(batch, "test", generator)
