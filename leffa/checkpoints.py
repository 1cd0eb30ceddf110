"""Reading model weights from a previous stage: Lightning checkpoints (live or EMA weights) or
safetensors files. Only tensors are ever loaded (``weights_only=True`` / safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["read_state_dict", "load_weights"]

WEIGHTS = ("ema", "live")


def read_state_dict(path: str | Path, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The model state dict stored in ``path``.

    Args:
        path: a Lightning ``.ckpt``, a ``torch.save``d state dict (also the authors' released
            ``virtual_tryon*.pth``), a ``.safetensors`` file, or a folder written by ``leffa.export``.
        weights: ``"ema"``: the checkpoint's ``state_dict``, which holds the EMA weights when
            ``EMAWeightAveraging`` was on (and the live ones otherwise); ``"live"``: the raw
            training weights (``current_model_state``, written by the EMA callback), falling back
            to ``state_dict`` when the run had no EMA.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; valid: {', '.join(WEIGHTS)}")
    from leffa.export import is_export_folder, read_export_state_dict
    from leffa.released import convert_released_state_dict, is_released_state_dict

    path = Path(path).expanduser()
    if is_export_folder(path):
        return read_export_state_dict(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if weights == "live" and "current_model_state" in checkpoint:
        return checkpoint["current_model_state"]
    state = checkpoint.get("state_dict", checkpoint)
    # the authors' released virtual_tryon*.pth: one flat dict of unet.*, unet_encoder.*, vae.*
    return convert_released_state_dict(state) if is_released_state_dict(state) else state


def load_weights(module: nn.Module, state_dict: dict[str, torch.Tensor], optional: tuple[str, ...] = (),
                 source: str = "checkpoint") -> None:
    """Load ``state_dict`` into ``module``; every key must match except those containing a
    substring of ``optional`` (e.g. new register tokens), and shapes must agree."""
    own = module.state_dict()
    for name, tensor in state_dict.items():
        if name in own and own[name].shape != tensor.shape:
            raise ValueError(
                f"{source}: {name} has shape {tuple(tensor.shape)} but the model wants {tuple(own[name].shape)} "
                "(was it trained with another conditioning layout or model size?)"
            )
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not any(o in k for o in optional)]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
