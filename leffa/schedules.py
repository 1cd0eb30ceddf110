"""The learning-rate schedule of training (``model.lr_schedule``): a linear warmup from zero, then a
constant rate or a cosine decay, stepped once per optimizer step.

One ``torch.optim.lr_scheduler.LambdaLR`` whose factor is :class:`WarmupThen`; its state (the step
count and these settings, plain numbers) goes into checkpoints, so a resumed run continues the
schedule where it stopped.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from leffa.errors import UserError

__all__ = ["LRSchedule", "WarmupThen", "build_scheduler", "DECAYS"]

DECAYS = ("constant", "cosine")


@dataclasses.dataclass
class LRSchedule:
    """Warmup then constant or cosine.

    Args:
        warmup_steps: optimizer steps of linear warmup from 0 to the optimizer's learning rate
            (0: none). After step k < warmup_steps the rate is ``lr * k / warmup_steps``.
        decay: ``constant`` (the rate stays) or ``cosine`` (from the rate down to
            ``min_lr_ratio * rate`` at ``total_steps``).
        min_lr_ratio: the cosine's final rate, as a fraction of the optimizer's.
        total_steps: where the cosine ends; None: the Trainer's ``max_steps``.
    """

    warmup_steps: int = 0
    decay: str = "constant"
    min_lr_ratio: float = 0.0
    total_steps: int | None = None

    def check(self) -> None:
        if self.decay not in DECAYS:
            raise UserError(f"model.lr_schedule.decay: unknown {self.decay!r}; valid: {', '.join(DECAYS)}")
        if self.warmup_steps < 0:
            raise UserError(f"model.lr_schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"model.lr_schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


class WarmupThen:
    """The factor of the base learning rate after ``step`` optimizer steps (``LambdaLR``'s lambda).
    A class, not a closure, so that ``LambdaLR.state_dict`` saves its settings with the step."""

    def __init__(self, warmup_steps: int, decay: str, min_lr_ratio: float, total_steps: int):
        self.warmup_steps, self.decay = warmup_steps, decay
        self.min_lr_ratio, self.total_steps = min_lr_ratio, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule, max_steps: int | None) -> dict:
    """Lightning's ``lr_scheduler`` entry for ``schedule`` on ``optimizer`` (stepped every optimizer step)."""
    schedule.check()
    total = schedule.total_steps or max_steps
    if schedule.decay == "cosine" and (total is None or total <= 0):
        raise UserError("model.lr_schedule.decay: cosine needs model.lr_schedule.total_steps or trainer.max_steps")
    factor = WarmupThen(schedule.warmup_steps, schedule.decay, schedule.min_lr_ratio, total or 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"scheduler": scheduler, "interval": "step", "frequency": 1}
