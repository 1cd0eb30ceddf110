"""EMA of the trainable weights only: Lightning's ``EMAWeightAveraging`` over a view of the module.

Lightning's callback deep-copies the whole module into its ``AveragedModel`` (the frozen VAE, and
every frozen UNet weight under ``model.trainable: attention`` or ``lora``) and averages every
parameter and buffer. :class:`TrainableEMA` hands it :class:`TrainableView` instead: a module whose
only parameters are the trainable parameters of the LightningModule (the same tensors, not
copies). The callback's own code then copies, averages and swaps just those. Checkpoints keep
the callback's layout: ``state_dict`` = the module's weights with the averaged ones in place of
the trainable ones (frozen tensors are shared, so ``torch.save`` writes them once), and
``current_model_state`` = the live weights.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["TrainableEMA", "TrainableView"]


class TrainableView(nn.Module):
    """The trainable parameters of ``module`` as the parameters of a module of their own (the same
    tensors), in ``module.named_parameters()`` order; ``names`` are their names in ``module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in trainable]
        self.weights = nn.ParameterList([p for _, p in trainable])


class TrainableEMA(EMAWeightAveraging):
    """``EMAWeightAveraging`` (same arguments) that keeps and averages the trainable weights only.

    Frozen weights do not change, so their average is themselves; leaving them out saves a copy of
    every frozen tensor (the VAE always; most of both UNets under ``attention`` or ``lora``).
    Buffers are not averaged (the UNets and the VAE have none that training changes).
    """

    view: TrainableView | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if is_overridden("configure_model", pl_module):  # as the parent does: the layers must exist first
            pl_module.configure_model()
        self.view = TrainableView(pl_module)
        device = self._device or pl_module.device
        self._average_model = AveragedModel(model=self.view, device=device, use_buffers=False, **self._kwargs)

    # the parent's hooks, pointed at the view: they update, swap and copy whatever module they get
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, self.view, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, self.view)

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, self.view)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        super().on_validation_epoch_start(trainer, self.view)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        super().on_validation_epoch_end(trainer, self.view)

    def average_state(self) -> dict[str, torch.Tensor]:
        """The averaged trainable weights by their names in the LightningModule."""
        return dict(zip(self.view.names, (p.detach() for p in self._average_model.module.weights)))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self._average_model is None:
            return super().on_save_checkpoint(trainer, pl_module, checkpoint)
        live = checkpoint["state_dict"]
        checkpoint["current_model_state"] = live
        checkpoint["state_dict"] = {**live, **self.average_state()}
        checkpoint["averaging_state"] = {"n_averaged": self._average_model.n_averaged}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self._average_model is None:
            return super().on_load_checkpoint(trainer, pl_module, checkpoint)
        average = self._average_model.module.weights
        if "current_model_state" in checkpoint and "averaging_state" in checkpoint:
            # state_dict (the averages) was loaded into the module: the live weights are the other entry
            pl_module.load_state_dict(checkpoint["current_model_state"])
            self._average_model.n_averaged.copy_(checkpoint["averaging_state"]["n_averaged"])
        stored = checkpoint["state_dict"]
        with torch.no_grad():
            for name, parameter in zip(self.view.names, average):
                parameter.copy_(stored[name])
