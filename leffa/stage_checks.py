"""What a ``LeffaModule`` checks and prepares when a Trainer sets it up, starts training and loads a
checkpoint: each refusal one line, before anything is computed or written.

* :func:`prepare_stage` (``setup``): the checkpoint loader guarded, ``model.speed.compile`` against
  the strategy, cached latents against this VAE and conditioning, the speed switches applied, the
  data's image size (where the data module says it).
* :func:`check_first_batch` (the first training batch): the image size of data that do not say it,
  then the global batch and FLOPs (``leffa.throughput``).
* :func:`check_loaded_checkpoint` (``--ckpt_path``): the cross-attention mode of its weights, its
  settings against the config's (``leffa.resume_settings``), its optimizer state against the
  trainable set.
"""

from __future__ import annotations

from leffa.checkpoints import guard_checkpoint_loading
from leffa.initial_weights import check_cross_attention
from leffa.resume_settings import check_optimizer_covers
from leffa.speed import refuse_compile_with
from leffa.throughput import report_training_start

__all__ = ["prepare_stage", "check_latent_cache", "check_first_batch", "check_loaded_checkpoint"]


def prepare_stage(module, stage: str) -> None:
    """``LeffaModule.setup`` inside a Trainer (the Trainer reads its ``ckpt_path`` after this hook)."""
    trainer = module.trainer
    guard_checkpoint_loading(trainer.strategy)
    if module.speed.compile:
        refuse_compile_with(strategy=trainer.strategy)
    # cached latents (data.latents) must come from this VAE: checked before its weights may be
    # stored in bf16 (model.speed.frozen_bf16), which would change its fingerprint
    cache = getattr(trainer.datamodule, "latent_cache", None)
    if cache:
        check_latent_cache(module, cache)
    module.apply_speed(bf16=str(trainer.precision).startswith("bf16"))
    # the data's image size, where the data module says it (LeffaDataModule): checked now, before
    # any batch; other data are checked at the first training batch
    settings = getattr(trainer.datamodule, "hparams", None) or {}
    if isinstance(settings.get("height"), int) and isinstance(settings.get("width"), int):
        module.check_image_size(settings["height"], settings["width"], stage)


def check_latent_cache(module, record: dict) -> None:
    """One error line when cached latents (``record``: the ``latents`` entry of the cache's
    manifest, ``leffa.data.latents``) were made by another VAE than the module's (the fingerprint of
    its weights as loaded, computed once) or lack an image that its conditioning encodes. Their
    image size is checked by the data module (``data.height``, ``data.width``)."""
    from leffa.data.latents import check_cache_fits, vae_fingerprint

    if getattr(module, "_vae_fingerprint", None) is None:
        module._vae_fingerprint = vae_fingerprint(module.vae)
    check_cache_fits(record, module._vae_fingerprint, module.hparams.conditioning)


def check_first_batch(module, batch: dict) -> None:
    """At the first training batch: its image size, unless the data module said it (checked by
    :func:`prepare_stage`), then the global batch and FLOPs for ThroughputMonitor."""
    size = tuple(batch["tgt"].shape[-2:])
    if size != getattr(module, "_checked_size", None):
        module.check_image_size(*size, "fit")
    report_training_start(module, batch)


def check_loaded_checkpoint(module, checkpoint: dict) -> None:
    """``LeffaModule.on_load_checkpoint``: one error line for a checkpoint this module cannot go on
    from (see the module docstring)."""
    check_cross_attention(checkpoint.get("state_dict", {}), module.hparams.cross_attention, "--ckpt_path")
    if module._trainer is not None:  # the Trainer's ckpt_path (not load_from_checkpoint's overrides)
        path = module.trainer.ckpt_path
        module.check_resume_settings(checkpoint.get("hyper_parameters") or {}, module.trainer.state.fn == "fit",
                                     f"--ckpt_path {path}" if path else "--ckpt_path")
    check_optimizer_covers(checkpoint, sum(p.requires_grad for p in module.parameters()))
