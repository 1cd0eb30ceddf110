"""Lightning callbacks of the project."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import save_image

from leffa.sampling import make_scheduler, sample
from leffa.viz import sample_grid, save_png

__all__ = ["SampleGrid", "FlowPictures", "ImageWriter"]


def rank_zero_log_dir(trainer) -> Path:
    """The run's log folder, read without a collective (not ``trainer.log_dir``: it broadcasts from
    rank 0, and the picture callbacks run on rank 0 alone)."""
    logger = trainer.logger
    return Path(getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or trainer.default_root_dir)


class SampleGrid(L.Callback):
    """At each validation, sample the first validation batch and log a grid (TensorBoard + PNG).

    Runs inside the validation loop, so with ``EMAWeightAveraging`` the pictures show the EMA
    weights. PNGs go to ``<log_dir>/samples/step_<global step>.png``.

    Args:
        num_samples: rows of the grid (taken from the first validation batch).
        num_steps: denoising steps.
        guidance_scale: classifier-free guidance over the reference.
        scheduler: sampling scheduler name (see ``leffa.sampling.SCHEDULERS``).
        seed: seed of the initial noise, the same at every validation.
    """

    def __init__(self, num_samples: int = 4, num_steps: int = 20, guidance_scale: float = 2.5,
                 scheduler: str = "ddim", seed: int = 0):
        self.num_samples, self.num_steps, self.guidance_scale = num_samples, num_steps, guidance_scale
        self.scheduler_name, self.seed = scheduler, seed
        self.last_path: Path | None = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        batch = {k: v[: self.num_samples] for k, v in batch.items() if k in ("tgt", "ref", "mask", "densepose")}
        scheduler = make_scheduler(self.scheduler_name, pl_module.scheduler)
        prediction = sample(pl_module, batch, scheduler, self.num_steps, self.guidance_scale,
                            generator=torch.Generator().manual_seed(self.seed))
        grid = sample_grid(batch, prediction)
        log_dir = rank_zero_log_dir(trainer)
        self.last_path = save_png(grid, log_dir / "samples" / f"step_{trainer.global_step:06d}.png")
        if isinstance(trainer.logger, TensorBoardLogger):
            trainer.logger.experiment.add_image("val/samples", grid, trainer.global_step)


class FlowPictures(L.Callback):
    """At each validation, the attention flow of every Leffa layer on the first validation batch,
    in TensorBoard (``val/flow/<layer>``) and as PNGs in ``<log_dir>/flows/step_<n>/``.

    Args:
        num_samples: samples (rows) per picture.
        timestep: the noise level the UNets see (below theta_timestep, where the loss acts).
    """

    def __init__(self, num_samples: int = 2, timestep: int = 250):
        self.num_samples, self.timestep = num_samples, timestep

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        from leffa.visualize import layer_pictures

        batch = {k: v[: self.num_samples] for k, v in batch.items() if k in ("tgt", "ref", "mask", "densepose")}
        log_dir = rank_zero_log_dir(trainer)
        folder = log_dir / "flows" / f"step_{trainer.global_step:06d}"
        for name, picture in layer_pictures(pl_module, batch, self.timestep).items():
            save_png(picture, folder / f"{name}.png")
            if isinstance(trainer.logger, TensorBoardLogger):
                trainer.logger.experiment.add_image(f"val/flow/{name}", picture, trainer.global_step)


class ImageWriter(BasePredictionWriter):
    """Writes ``leffa predict`` results: ``<output_dir>/<sample key>.png`` and ``settings.json``.

    Every rank writes its own samples (keys are unique), so it works under multi-GPU predict.

    Args:
        output_dir: folder for the images.
    """

    def __init__(self, output_dir: str = "predictions"):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)

    def on_predict_start(self, trainer, pl_module) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            settings = {"sampling": dataclasses.asdict(pl_module.sampling),
                        "model": {k: v for k, v in dict(pl_module.hparams).items() if not k.startswith("_")}}
            (self.output_dir / "settings.json").write_text(json.dumps(settings, indent=2, default=str))

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for key, image in zip(prediction["key"], prediction["image"]):
            save_image(((image.float() + 1) / 2).clamp(0, 1), self.output_dir / f"{key}.png")
