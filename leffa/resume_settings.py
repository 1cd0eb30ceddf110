"""What a resumed run may change, and the one-line refusal of the rest (``--ckpt_path``).

A resume uses the config as given (``leffa.cli`` keeps LightningCLI from copying a checkpoint's
settings over it); the module then compares its settings with the checkpoint's record when the
checkpoint loads (``LeffaModule.on_load_checkpoint``) and refuses every difference but the ones
listed in :data:`RESUME_MAY_CHANGE`, naming each key with both values.
"""

from __future__ import annotations

import json

from leffa.architectures.registry import comparable_record, upgrade_settings
from leffa.errors import UserError

__all__ = ["RESUME_MAY_CHANGE", "WEIGHT_SETTINGS", "check_resume_settings", "check_optimizer_covers"]

#: model settings that a resumed run (``--ckpt_path``) may change: where the same files lie on this
#: machine (the weights come from the checkpoint), the weights a new run would start from (the
#: checkpoint's replace them), memory for compute (the same function), the speed switches (the same
#: function, ``leffa.speed``) and how pictures are sampled.
#: Every other setting the checkpoint records must equal the config's (:func:`check_resume_settings`);
#: within ``architecture``, the architecture's own ``local_args`` may change too.
RESUME_MAY_CHANGE = ("pretrained_model", "vae_pretrained", "init_from", "init_from_weights", "gradient_checkpointing",
                     "speed", "sampling")
#: what a checkpoint's weights are: the settings checked when validate, test or predict read a
#: ``ckpt_path`` (plus ``trainable`` and ``lora`` when either side has LoRA adapters); within
#: ``architecture``, its class and the architecture's own ``weight_args``
WEIGHT_SETTINGS = ("architecture", "unet_config", "vae_config", "conditioning", "cross_attention")


def check_resume_settings(given: dict, saved: dict, fitting: bool, source: str = "--ckpt_path") -> None:
    """One error line naming each model setting of this run that differs from the checkpoint's
    record ``saved`` (its ``hyper_parameters``), with both values. Resuming (``fitting``)
    compares every setting but ``RESUME_MAY_CHANGE``; validate, test and predict compare what
    the weights are (``WEIGHT_SETTINGS``). Settings the checkpoint does not record (it predates
    them) are not compared; a checkpoint's older record is read as this version reads it
    (``leffa.architectures.upgrade_settings``)."""
    saved, given = upgrade_settings(saved), dict(given)
    for side in (saved, given):
        if "architecture" in side:
            side["architecture"] = comparable_record(side["architecture"], fitting)
    keys = [k for k in saved if k in given and not str(k).startswith("_")]
    if fitting:
        keys = [k for k in keys if k not in RESUME_MAY_CHANGE]
    else:
        lora = "lora" in (saved.get("trainable"), given.get("trainable"))
        keys = [k for k in keys if k in WEIGHT_SETTINGS or (lora and k in ("trainable", "lora"))]
    differences = [line for k in keys for line in _differences(saved[k], given[k], f"model.{k}")]
    if not differences:
        return
    way = ("resume with the checkpoint's settings, or start a new run from its weights with model.init_from"
           if fitting else "give the settings it was trained with")
    raise UserError(f"{source} was written with other model settings: {'; '.join(differences)}; {way}")


def _differences(saved, given, key: str) -> list[str]:
    """``key: <saved> in the checkpoint, <given> given`` for each (nested) value that differs. A
    nested key on one side only is not compared: a record from another version (e.g. an optimizer
    argument that a newer torch added, filled in with its default) is no difference of settings."""
    if isinstance(saved, dict) and isinstance(given, dict):
        return [line for k in sorted(set(saved) & set(given), key=str)
                for line in _differences(saved[k], given[k], f"{key}.{k}")]
    if _plain(saved) == _plain(given):
        return []
    return [f"{key}: {_shown(saved)} in the checkpoint, {_shown(given)} given"]


def _plain(value):
    """Tuples as lists, recursively: a checkpoint's record and a config's value compare as YAML would."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _shown(value) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(_plain(value))
    except (TypeError, ValueError):
        return repr(value)


def check_optimizer_covers(checkpoint: dict, trainable: int) -> None:
    """One error line when the checkpoint's optimizer state covers another number of parameter
    tensors than the ``trainable`` ones this model's optimizer holds (``configure_optimizers``)."""
    saved = [group for state in checkpoint.get("optimizer_states", ()) if isinstance(state, dict)
             for group in state.get("param_groups", ())]
    held = sum(len(g["params"]) for g in saved)
    if saved and held != trainable:
        raise UserError(f"--ckpt_path: its optimizer state covers {held} parameter tensors, this model trains "
                        f"{trainable} (another model.trainable, or written before the Reference UNet's unused "
                        "head was frozen): start a new run from its weights with model.init_from instead")
