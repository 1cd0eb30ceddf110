"""The authors' released checkpoints in our layout: ``virtual_tryon.pth``, ``virtual_tryon_dc.pth``
(SD1.5-inpainting UNets) and ``pose_transfer.pth`` (SDXL-inpainting UNets).

Each is one flat state dict: ``unet.*`` the Generative UNet (12 input channels: noisy latent 4,
mask 1, masked-image latent 4, DensePose resized to the latent grid 3, i.e. our ``released``
conditioning), ``unet_encoder.*`` the Reference UNet, ``vae.*``; stock diffusers module names.
What the released code never uses is dropped on import: the text cross-attention's projections
(``attn2``: its processor returns its input) and SDXL's added text/time embedding
(``add_embedding``: ``addition_embed_type`` is set to None). ``norm2`` stays: each transformer
block adds ``norm2(h)``, our ``model.cross_attention: passthrough``. :func:`to_released_state_dict`
goes back: our weights in the released layout, the unused tensors taken from a released file.
"""

from __future__ import annotations

import torch

from leffa.errors import UserError

__all__ = ["is_released_state_dict", "convert_released_state_dict", "to_released_state_dict", "RELEASED_CONDITIONING",
           "RELEASED_CROSS_ATTENTION", "has_cross_attention_norm"]

RELEASED_CONDITIONING = "released"
#: the ``model.cross_attention`` that computes what the released code computes
RELEASED_CROSS_ATTENTION = "passthrough"


def is_released_state_dict(state_dict: dict) -> bool:
    """True for the released flat layout (``unet.*`` and ``unet_encoder.*`` keys)."""
    return any(k.startswith("unet.") for k in state_dict) and any(k.startswith("unet_encoder.") for k in state_dict)


def _is_unused(name: str) -> bool:
    """A weight the released code holds but never uses: cross-attention projections, added embedding."""
    parts = name.split(".")
    return ("transformer_blocks" in parts and "attn2" in parts) or parts[1] == "add_embedding"


def has_cross_attention_norm(state_dict) -> bool:
    """Whether a (``LeffaModule``-keyed) state dict holds the transformer blocks' ``norm2``: it
    was written with ``model.cross_attention: passthrough`` (not ``removed``)."""
    return any(".transformer_blocks." in k and ".norm2." in k for k in state_dict)


def own_name(name: str, components: dict[str, str]) -> str | None:
    """The ``LeffaModule`` key of a released key, its network renamed by ``components`` (released
    prefix -> component; the VAE keeps its name); None for the weights the released code never uses."""
    prefix, _, rest = name.partition(".")
    prefixes = {**components, "vae": "vae"}
    if prefix not in prefixes or not rest:
        raise UserError(f"unexpected key in a released checkpoint: {name} (expected "
                        f"{', '.join(f'{p}.*' for p in prefixes)})")
    return None if _is_unused(name) else f"{prefixes[prefix]}.{rest}"


def convert_released_state_dict(state_dict: dict[str, torch.Tensor],
                                components: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """Released keys -> ``LeffaModule`` keys (a ``cross_attention: passthrough`` module) of an
    architecture whose ``released_components`` are ``components``, without the weights the released
    code never uses. An architecture without them (None) is one error line."""
    if components is None:
        raise UserError("a released checkpoint holds the paper's Generative and Reference UNets "
                        "(model.architecture: dual_unet); this architecture has no such layout")
    return {own: tensor for name, tensor in state_dict.items() if (own := own_name(name, components)) is not None}


def to_released_state_dict(
    own: dict[str, torch.Tensor], base: dict[str, torch.Tensor], components: dict[str, str] | None,
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """``own`` (``LeffaModule`` keys) in the layout of ``base`` (a released state dict).

    The result has exactly ``base``'s keys, in its order, with its shapes and dtypes: every tensor
    is ours (cast to the base's dtype) except the ones the released code never uses (text
    cross-attention projections, SDXL's added embedding), which our UNets do not have and which are
    taken from ``base``. A tensor of another shape (another architecture, conditioning layout or
    base model), a tensor the base needs and ``own`` lacks (``model.cross_attention: removed``
    has no ``norm2``), or one of ``own`` that has no place in the released layout (register
    tokens, ...) is a :class:`UserError` naming it.
    """
    if not is_released_state_dict(base):
        raise UserError("the base is not a released checkpoint (no unet.* and unet_encoder.* keys); give "
                        "the authors' virtual_tryon.pth, virtual_tryon_dc.pth or pose_transfer.pth")
    if has_cross_attention_norm(base) and not has_cross_attention_norm(own):
        raise UserError(f"{source} was trained with model.cross_attention: removed (no norm2 in its transformer "
                        f"blocks); the released layout computes with model.cross_attention: "
                        f"{RELEASED_CROSS_ATTENTION}, so it cannot be exported to it")
    if components is None:
        raise UserError(f"{source}: only model.architecture dual_unet has the released layout")
    released, used = {}, set()
    for name, base_tensor in base.items():
        key = own_name(name, components)
        if key is None:
            released[name] = base_tensor
            continue
        if key not in own:
            raise UserError(f"{source} has no {key}, which the released layout needs as {name}; "
                            "was it trained with another architecture?")
        tensor = own[key]
        if tensor.shape != base_tensor.shape:
            raise UserError(f"{source}: {key} has shape {tuple(tensor.shape)} but the base's {name} has "
                            f"{tuple(base_tensor.shape)}; its architecture or conditioning does not match the base")
        tensor = tensor.detach().to(device="cpu", dtype=base_tensor.dtype)
        # a view would make torch.save write the whole storage it views
        released[name] = tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()
        used.add(key)
    extra = [key for key in own if key not in used]
    if extra:
        raise UserError(f"{source} holds {len(extra)} tensors the released layout has no place for "
                        f"(e.g. {', '.join(extra[:3])}); register tokens (model.num_registers > 0) and "
                        "adapters cannot be exported to it")
    return released
