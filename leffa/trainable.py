"""Which parameters of the architecture's networks train (``model.trainable``); each architecture
applies it to its own networks (:func:`select_trainable`).

* ``all``: every parameter (the paper).
* ``attention``: the self-attention layers (``attn1``: ``to_q``, ``to_k``, ``to_v``, ``to_out``,
  and its register tokens when there are any) of every network, plus what the architecture names
  (``dual_unet``: the Generative UNet's ``conv_in``, whose input channels are the conditioning
  layout's, which the pretrained UNet may not have had). Everything else is frozen. For SD1.5
  shapes this is about 50 M parameters per UNet.
* ``lora``: low-rank adapters (``peft``'s LoRA, injected with :func:`peft.inject_adapter_in_model`)
  on the layers named by :class:`LoraSettings` (the self-attention projections by default) of
  every network, plus what the architecture names; every pretrained weight is frozen. The
  adapted layers' pretrained weights move to ``<layer>.base_layer.*`` in the state dict, the
  adapters are ``<layer>.lora_A.default.weight`` and ``<layer>.lora_B.default.weight``
  (:func:`base_layer_names` maps plain checkpoints onto them).

Frozen parameters (``requires_grad=False``) are left out of the optimizer, of DDP's gradient
buckets (DDP builds them from parameters that require gradients), and of the EMA
(:class:`leffa.ema.TrainableEMA`).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from leffa.errors import UserError

__all__ = ["TRAINABLE", "LoraSettings", "select_trainable", "base_layer_names", "merge_lora", "merge_lora_state_dict",
           "has_lora"]

TRAINABLE = ("all", "attention", "lora")
ADAPTER = "default"  # peft's adapter name
LORA_MARKERS = (".lora_A.", ".lora_B.")


@dataclasses.dataclass
class LoraSettings:
    """LoRA adapters for ``model.trainable: lora``.

    Args:
        rank: the adapters' rank r.
        alpha: scaling numerator; the update is ``(alpha / rank) * B @ A``.
        target_modules: module names (suffixes of their full names) that get adapters; the default
            is the self-attention projections (``attn1``) of every transformer block.
        dropout: dropout on the adapters' input.
    """

    rank: int = 16
    alpha: float = 16.0
    target_modules: list[str] = dataclasses.field(
        default_factory=lambda: ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"])
    dropout: float = 0.0

    def config(self):
        from peft import LoraConfig

        if self.rank < 1:
            raise UserError(f"model.lora.rank must be at least 1, got {self.rank}")
        # init_lora_weights=True: A random, B zero, so an adapted UNet starts as the pretrained one
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.target_modules),
                          lora_dropout=self.dropout, init_lora_weights=True)


def select_trainable(networks: dict[str, nn.Module], kind: str, lora: LoraSettings | None = None,
                     also_train: tuple[str, ...] = ()) -> None:
    """Make ``kind`` (see the module docstring) the trainable parameters of the architecture's
    ``networks`` (by component name), in place. Parameters frozen before (e.g. a frozen Reference
    UNet) stay frozen. ``also_train``: prefixes of ``<component>.<parameter>`` names that train with
    ``attention`` and ``lora`` too (the architecture's say, e.g. a ``conv_in`` whose input channels
    are new)."""
    if kind not in TRAINABLE:
        raise UserError(f"model.trainable: unknown {kind!r}; valid: {', '.join(TRAINABLE)}")
    if kind == "all":
        return
    # a network frozen as a whole (e.g. model.architecture.init_args.freeze_reference_unet) stays
    # so, and gets no adapters
    networks = {name: net for name, net in networks.items() if any(p.requires_grad for p in net.parameters())}
    was_trainable = {id(p) for net in networks.values() for p in net.parameters() if p.requires_grad}
    if kind == "lora":
        from peft import inject_adapter_in_model

        config = (lora or LoraSettings()).config()
        for net in networks.values():
            try:
                inject_adapter_in_model(config, net, adapter_name=ADAPTER)
            except ValueError as error:  # e.g. no module matches target_modules
                raise UserError(f"model.lora.target_modules {list(config.target_modules)}: "
                                f"{str(error).splitlines()[0]}") from error
    for component, net in networks.items():
        for name, parameter in net.named_parameters():
            wanted = _is_adapter(name) if kind == "lora" else ".attn1." in f".{name}"
            wanted = wanted or f"{component}.{name}".startswith(also_train)
            # nothing frozen before becomes trainable, except the new adapters
            parameter.requires_grad_(wanted and (id(parameter) in was_trainable or _is_adapter(name)))


def _is_adapter(name: str) -> bool:
    return any(m in f".{name}" for m in LORA_MARKERS)


def has_lora(state_dict_or_module) -> bool:
    """Whether a state dict (or module) holds LoRA adapters."""
    names = (state_dict_or_module.state_dict() if isinstance(state_dict_or_module, nn.Module)
             else state_dict_or_module)
    return any(_is_adapter(k) for k in names)


def base_layer_names(state_dict: dict, own_keys) -> dict:
    """``state_dict`` with a plain layer's weights renamed to where a LoRA-adapted model keeps them
    (``...to_q.weight`` -> ``...to_q.base_layer.weight``) for every such key of ``own_keys``; other
    keys unchanged. Lets a full checkpoint initialise a ``lora`` module (the adapters then start
    as peft initialises them: ``B = 0``, the pretrained function)."""
    renamed = dict(state_dict)
    for key in own_keys:
        if ".base_layer." in key:
            plain = key.replace(".base_layer.", ".")
            if plain in renamed and key not in renamed:
                renamed[key] = renamed.pop(plain)
    return renamed


def merge_lora(module: nn.Module) -> int:
    """Merge every LoRA adapter of ``module`` into its base layer (peft's ``merge``) and put the
    base layer back in the adapter's place, in place; returns how many layers were merged. The
    module then has the plain layout (no ``base_layer``/``lora_*`` keys) and computes the same
    function."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapted = [(name, m) for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in adapted:
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    return len(adapted)


def merge_lora_state_dict(state_dict: dict, lora: LoraSettings, source: str = "checkpoint") -> dict:
    """``state_dict`` of a ``lora`` module in the plain layout, every adapter merged into its layer
    (peft's ``merge``, one layer at a time, so no UNet needs to be built); other tensors unchanged."""
    from peft import inject_adapter_in_model

    config = dataclasses.replace(lora, target_modules=["layer"]).config()
    adapted = sorted({k.split(".base_layer.")[0] for k in state_dict if ".base_layer." in k})
    merged = {k: v for k, v in state_dict.items()
              if not _is_adapter(k) and not any(k.startswith(p + ".") for p in adapted)}
    for prefix in adapted:
        own = {k[len(prefix) + 1:]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
        weight, bias = own["base_layer.weight"], own.get("base_layer.bias")
        if weight.ndim != 2:
            raise UserError(f"{source}: {prefix} is not a linear layer; only LoRA on linear layers is merged")
        holder = nn.Module()
        holder.layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        inject_adapter_in_model(config, holder, adapter_name=ADAPTER)
        try:
            holder.load_state_dict({f"layer.{k}": v for k, v in own.items()})
        except RuntimeError as error:
            raise UserError(f"{source}: the LoRA tensors of {prefix} do not match model.lora "
                            f"({str(error).splitlines()[0]})") from error
        merge_lora(holder)
        merged[f"{prefix}.weight"] = holder.layer.weight.detach()
        if bias is not None:
            merged[f"{prefix}.bias"] = holder.layer.bias.detach()
    return merged
