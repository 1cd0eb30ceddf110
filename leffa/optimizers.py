"""Optimizers for ``model.optimizer`` beyond ``torch.optim``: 8-bit AdamW from ``bitsandbytes``.

``bitsandbytes`` is optional (not a dependency): installed by those who want it, GPU only. A config
names it like any optimizer::

    model:
      optimizer:
        class_path: leffa.optimizers.AdamW8bit
        init_args: {lr: 1.0e-5, weight_decay: 1.0e-2}
"""

from __future__ import annotations

import torch

from leffa.errors import UserError

__all__ = ["AdamW8bit"]


class AdamW8bit(torch.optim.AdamW):
    """``bitsandbytes.optim.AdamW8bit`` (optimizer state in 8 bits: 2 bytes per parameter instead
    of AdamW's 8). Constructing it returns the bitsandbytes optimizer; without bitsandbytes, or
    with parameters off a CUDA GPU, a one-line :class:`UserError` says so."""

    def __new__(cls, params, lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                weight_decay: float = 1e-2):
        params = list(params)
        devices = {p.device.type for group in params for p in (group["params"] if isinstance(group, dict) else [group])}
        if devices - {"cuda"}:
            raise UserError(f"model.optimizer: 8-bit AdamW (bitsandbytes) runs on CUDA GPUs only, the parameters are "
                            f"on {', '.join(sorted(devices))}; use torch.optim.AdamW there")
        try:
            import bitsandbytes
        except ImportError as error:
            raise UserError("model.optimizer: 8-bit AdamW needs bitsandbytes, which is not installed "
                            "(pip install bitsandbytes), or use torch.optim.AdamW") from error
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
