"""The selection draws of a training step: which timestep each sample gets, whether its reference is
dropped, and which samples take part in the Leffa term with what weight.

Random stream of a training step (the module's ``noise_generator``, one per rank). Per optimizer
step, i.e. per window of ``accumulate_grad_batches`` micro-batches of b samples each: first the
timesteps of all A * b samples, then their reference keeps; then, per micro-batch, the VAE
posterior sample of the target and the noise (``LeffaModule.noised_forward``). Drawing the
window's selection up front lets its first micro-batch know how many samples the whole optimizer
step selects for the Leffa term. Outside training (and outside a Trainer) a window is one batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from leffa.speed import pinned_copy

__all__ = ["draw_selection", "leffa_rows", "SelectionWindow"]

Draws = tuple[torch.Tensor, torch.Tensor]


def draw_selection(generator: torch.Generator, n: int, num_timesteps: int, p_drop_ref: float) -> Draws:
    """Timesteps and reference keeps of ``n`` samples, on the CPU (``p_drop_ref`` 0: every reference kept)."""
    timesteps = torch.randint(0, num_timesteps, (n,), generator=generator)
    keep_ref = torch.rand(n, generator=generator) >= p_drop_ref
    return timesteps, keep_ref


def leffa_rows(timesteps: torch.Tensor, keep_ref: torch.Tensor, theta_timestep: int) -> torch.Tensor:
    """Samples of the Leffa term: Sec. 3.3's t < theta, and a reference to attend to."""
    return torch.nonzero((timesteps < theta_timestep) & keep_ref).flatten()


class SelectionWindow:
    """The draws of the optimizer step in progress, one pair per micro-batch still to come, and its
    Leffa weight per selected sample: (ranks x micro-batches) / (samples the whole optimizer step
    selects on all ranks), so that after Lightning's division by the micro-batches and data
    parallelism's mean over ranks the term is the mean over the global batch's selected samples."""

    def __init__(self):
        self.pending: list[Draws] = []
        self.weight: torch.Tensor | float | None = None

    def select(self, module, b: int, train: bool, generator: torch.Generator,
               batch_idx: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float | None]:
        """A ``LeffaModule`` micro-batch's timesteps, reference keeps (reference dropout in training
        only) and Leffa weight per selected sample (the window of its optimizer step, :meth:`take`);
        ``None`` as the weight outside training (or outside a Trainer): the term is then this
        batch's mean."""
        hp, trainer = module.hparams, module._trainer
        steps, p_drop_ref = module.scheduler.config.num_train_timesteps, hp.p_drop_ref if train else 0.0
        if not train or batch_idx is None or trainer is None:
            return (*draw_selection(generator, b, steps, p_drop_ref), None)
        count = (lambda t, k: float(leffa_rows(t, k, hp.theta_timestep).numel())) if hp.use_leffa_loss else None
        return self.take(b, batch_idx, trainer, lambda n: draw_selection(generator, n, steps, p_drop_ref), count,
                         module.device)

    def take(self, b: int, batch_idx: int, trainer, draw: Callable[[int], Draws],
             count: Callable[[torch.Tensor, torch.Tensor], float] | None,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
        """This micro-batch's timesteps, reference keeps and the Leffa weight. ``draw(n)`` draws n
        samples' selection; ``count`` says how many of them the Leffa term takes (None: no Leffa term)."""
        accumulate = trainer.accumulate_grad_batches
        position = batch_idx % accumulate
        if position == 0 or not self.pending:
            # this micro-batch and the rest of its window (fewer at the end of a finite epoch)
            size = accumulate - position
            if trainer.num_training_batches != float("inf"):
                size = min(size, int(trainer.num_training_batches) - batch_idx)
            timesteps, keep_ref = draw(size * b)
            # counted on the CPU (the draws are there): on one device the weight is a number, no
            # device tensor and no wait; with several, one scalar all-reduced per optimizer step
            selected = count(timesteps, keep_ref) if count is not None else 0.0
            if trainer.world_size > 1 and count is not None:
                total = trainer.strategy.reduce(pinned_copy(torch.tensor(selected), device), reduce_op="sum")
                self.weight = trainer.world_size * accumulate / total.clamp(min=1.0)
            else:
                self.weight = trainer.world_size * accumulate / max(selected, 1.0)
            self.pending = list(zip(timesteps.split(b), keep_ref.split(b)))
        timesteps, keep_ref = self.pending.pop(0)
        if len(timesteps) != b:
            raise ValueError(f"the micro-batches of one optimizer step must have one size: got {b} after "
                             f"{len(timesteps)} (training batches are never partial)")
        return timesteps, keep_ref, self.weight
