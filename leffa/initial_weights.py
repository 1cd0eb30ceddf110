"""A module's weights from a previous stage or another model (``model.init_from``), and the check
that a state dict was written with the module's own ``model.cross_attention``."""

from __future__ import annotations

from leffa.checkpoints import load_weights, read_state_dict
from leffa.errors import UserError
from leffa.released import RELEASED_CROSS_ATTENTION, has_cross_attention_norm
from leffa.trainable import LORA_MARKERS, base_layer_names, has_lora

__all__ = ["init_weights", "check_cross_attention"]


def init_weights(module, path: str, weights: str = "ema") -> None:
    """Load the weights of ``path`` into ``module`` (a ``LeffaModule``; see its ``init_from``): a
    checkpoint of any form, the authors' released files read with the architecture's
    ``released_components``. A plain checkpoint initialises a ``lora`` module's pretrained weights
    (new adapters start as peft initialises them); adapters into a module without LoRA are refused."""
    state = read_state_dict(path, weights, module.denoiser.released_components)
    optional = ("processor.registers",)
    check_cross_attention(state, module.hparams.cross_attention, f"model.init_from={path}")
    if has_lora(module) and not has_lora(state):
        # a plain checkpoint: its adapted layers' weights go to their base_layer; new adapters
        state, optional = base_layer_names(state, module.state_dict().keys()), optional + LORA_MARKERS
    elif has_lora(state) and not has_lora(module):
        raise UserError(f"model.init_from={path} holds LoRA adapters: set model.trainable: lora (with the same "
                        "model.lora) to go on training them, or export it merged first (leffa export)")
    hp = module.hparams
    base = (f"model.pretrained_model={hp.pretrained_model}" if hp.pretrained_model
            else "model.unet_config" if hp.unet_config else "the model")
    load_weights(module, state, optional=optional, source=f"model.init_from={path}",
                 target=f"the model built from {base}")


def check_cross_attention(state: dict, ours: str, source: str) -> None:
    """One error line when ``state`` was written with another ``model.cross_attention`` than
    ``ours`` (its transformer blocks' ``norm2`` tells: ``passthrough`` keeps it, ``removed`` has none)."""
    theirs = "passthrough" if has_cross_attention_norm(state) else "removed"
    if theirs == ours or not any(".transformer_blocks." in k for k in state):
        return
    hint = " (the released checkpoints compute with passthrough)" if theirs == RELEASED_CROSS_ATTENTION else ""
    raise UserError(f"{source} was written with model.cross_attention: {theirs}, this model is built with "
                    f"{ours}; set model.cross_attention: {theirs}{hint}")
