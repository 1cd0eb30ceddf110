"""A ``LeffaModule``'s settings, built once when it is made: the settings objects from the config's
mappings, their one-line refusals, and the plain record its checkpoints keep (they are read with
``weights_only=True``: mappings, the architecture as its ``class_path``/``init_args`` record, the
optimizer as the config named it or not at all)."""

from __future__ import annotations

import dataclasses
import os

from leffa.architectures import architecture_record
from leffa.errors import UserError
from leffa.leffa_layers import check_leffa_settings
from leffa.sampling import SamplingConfig
from leffa.schedules import LRSchedule
from leffa.speed import SpeedSettings, refuse_compile_with
from leffa.trainable import LoraSettings
from leffa.unets import check_cross_attention_mode

__all__ = ["build_settings"]


def _settings(cls, value):
    """A settings dataclass from a config's mapping, or the value itself (an instance, or None)."""
    return cls(**value) if isinstance(value, dict) else value


def build_settings(module, optimizer, unet_config: dict | None, vae_config: dict | None, vae_pretrained) -> dict:
    """Set ``module``'s settings objects (``optimizer_factory`` from the ``optimizer`` argument,
    ``lora_settings``, ``sampling``, ``speed``, ``lr_schedule``) from its ``hparams`` as
    ``save_hyperparameters`` stored them (under LightningCLI: the config's values), refuse bad values
    in one line, store the plain record in ``hparams`` (with the configs read from their files, and
    ``vae_pretrained`` as the argument's absolute path: the config holds it relative to its own
    folder) and return the architecture's record."""
    if isinstance(optimizer, dict):  # a checkpoint's record of it: only the CLI's parser makes it callable
        raise UserError("model.optimizer: give the optimizer through the config (class_path and init_args) "
                        "or as a callable, not as a mapping")
    module.optimizer_factory = optimizer
    hp = module.hparams
    given_optimizer = hp.get("optimizer")
    module.lora_settings = _settings(LoraSettings, hp.lora) or LoraSettings()
    module.sampling = _settings(SamplingConfig, hp.sampling) or SamplingConfig()
    module.speed = _settings(SpeedSettings, hp.speed) or SpeedSettings()
    module.lr_schedule = _settings(LRSchedule, hp.lr_schedule)
    record = architecture_record(hp.architecture)
    if not 0.0 <= hp.p_drop_ref < 1.0:
        raise UserError(f"model.p_drop_ref must be in [0, 1), got {hp.p_drop_ref}")
    check_cross_attention_mode(hp.cross_attention)
    check_leffa_settings(hp.lambda_leffa, hp.theta_resolution, hp.tau)
    if module.lr_schedule is not None:
        module.lr_schedule.check()
    if module.speed.compile:
        refuse_compile_with(gradient_checkpointing=hp.gradient_checkpointing)
    hp.update(
        unet_config=unet_config, vae_config=vae_config, architecture=record,
        vae_pretrained=None if vae_pretrained is None else os.fspath(vae_pretrained),
        sampling=dataclasses.asdict(module.sampling), speed=dataclasses.asdict(module.speed),
        lr_schedule=dataclasses.asdict(module.lr_schedule) if module.lr_schedule else None,
        lora=dataclasses.asdict(module.lora_settings),
        # the optimizer as the config named it (a class path and its arguments); a Python callable: none
        optimizer=given_optimizer if isinstance(given_optimizer, dict) else None,
    )
    return record
