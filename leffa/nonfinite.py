"""Stop training before a non-finite loss or gradient reaches the weights, and log the gradient
norm before clipping: :class:`NonFiniteStop`, a callback the module brings itself
(``LeffaModule.configure_callbacks``), so every Trainer that fits it has one.

Stopping (rather than skipping the step) because a learning rate or a batch that makes the loss
overflow does so again at the next step: skipping would hide it behind a run that no longer
learns. The error comes before the optimizer step, hence before any checkpoint of poisoned
weights; the last checkpoint written stays the last good one. Every rank raises at the same step:
the flags are summed over the ranks (one small all-reduce per optimizer step).
"""

from __future__ import annotations

import lightning as L
import torch

from leffa.errors import UserError
from leffa.parallel import is_sharding

__all__ = ["NonFiniteStop", "LOSS_TERMS"]

#: the loss terms checked, as the module's ``step_terms`` names them
LOSS_TERMS = ("diffusion", "leffa")


class NonFiniteStop(L.Callback):
    """Per micro-batch, whether each loss term of the module's ``step_terms`` (set by its training
    step) is finite; per optimizer step, the same for the gradients, then one check over the ranks
    (``UserError`` naming the term and the step) and ``train/grad_norm``, the total 2-norm before
    clipping (summed over the ranks' shards under a sharding strategy)."""

    def __init__(self):
        self._flags: torch.Tensor | None = None

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        terms = getattr(pl_module, "step_terms", None) or {}
        zero = torch.zeros((), dtype=torch.bool, device=loss.device)
        flags = torch.stack([~torch.isfinite(terms[t]) if t in terms else zero for t in LOSS_TERMS])
        self._flags = flags if self._flags is None else self._flags | flags

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        device = pl_module.device
        flags = self._flags if self._flags is not None else torch.zeros(len(LOSS_TERMS), dtype=torch.bool)
        self._flags = None
        flags = flags.to(device, torch.float32)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # sharded: this rank's part
        # under a GradScaler (16-mixed) inf gradients are routine: it skips those steps itself
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            # the largest magnitude: finite exactly when every entry is (no overflow, unlike a 2-norm)
            largest = torch.nn.utils.get_total_norm(grads, norm_type=float("inf")) if grads else flags.new_zeros(())
            flags = torch.cat([flags, (~torch.isfinite(largest)).float().view(1).to(device)])
        # the total 2-norm before clipping (Lightning clips after this hook); a sharded rank holds a
        # part of the gradients, so the squares are summed over the ranks
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0) if grads else flags.new_zeros(())
        sharded = is_sharding(trainer.strategy)
        flags = torch.cat([flags, norm.float().square().view(1).to(device) if sharded else flags.new_zeros(1)])
        if trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
        flags, squares = flags[:-1], flags[-1]
        pl_module.log("train/grad_norm", squares.sqrt() if sharded else norm.float())
        bad = [name for name, flag in zip((*LOSS_TERMS, "gradient"), flags.tolist()) if flag]
        if bad:
            what = f"{bad[0]} loss" if bad[0] in LOSS_TERMS else "gradient (the losses were finite)"
            step = trainer.global_step
            raise UserError(f"the {what} is not finite at global step {step}: training stopped before that step's "
                            f"optimizer update, so the weights and checkpoints of step {step} are intact; lower "
                            f"model.learning_rate or check the data")
