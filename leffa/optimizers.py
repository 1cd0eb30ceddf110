"""The module's optimizer and schedule (:func:`configure_optimizers`), and optimizers for
``model.optimizer`` beyond ``torch.optim``: 8-bit AdamW from ``bitsandbytes``.

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
from leffa.schedules import build_scheduler

__all__ = ["AdamW8bit", "configure_optimizers"]


def configure_optimizers(module):
    """``LeffaModule.configure_optimizers``: the optimizer over the trainable parameters only (the
    config's ``model.optimizer``, else AdamW with ``learning_rate`` and ``weight_decay``, one fused
    kernel for every tensor on a GPU), with ``model.lr_schedule`` when there is one."""
    params = [p for p in module.parameters() if p.requires_grad]
    if module.optimizer_factory is None:
        hp = module.hparams
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay,
                                      fused=module.device.type == "cuda" or None)
    else:
        optimizer = module.optimizer_factory(params)
    if module.lr_schedule is None:
        return optimizer
    trainer = module._trainer
    max_steps = trainer.max_steps if trainer is not None and trainer.max_steps > 0 else None
    return {"optimizer": optimizer, "lr_scheduler": build_scheduler(optimizer, module.lr_schedule, max_steps)}


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
