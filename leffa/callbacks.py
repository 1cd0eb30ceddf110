"""Lightning callbacks of the project."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torchvision.utils import save_image

from leffa.atomic_write import write_atomically
from leffa.errors import UserError
from leffa.parallel import refuse_under_sharding
from leffa.sampling import sample
from leffa.pictures import sample_grid, save_png

__all__ = ["SampleGrid", "FlowPictures", "ImageWriter", "unsafe_key_reason"]

MAX_KEY_BYTES = 200  # a key plus ".png" stays well inside the 255-byte file-name limit


def rank_zero_log_dir(trainer) -> Path:
    """The run's log folder, read without a collective (not ``trainer.log_dir``: it broadcasts from
    rank 0, and the picture callbacks run on rank 0 alone)."""
    logger = trainer.logger
    return Path(getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or trainer.default_root_dir)


class SampleGrid(L.Callback):
    """At each validation, sample the first validation batch and log a grid (TensorBoard + PNG).

    The samples are drawn as ``leffa predict`` draws them, with the module's own ``model.sampling``
    (scheduler, guidance, reference timestep, repaint), fewer steps when ``num_steps`` says so, and
    the same noise at every validation (``model.sampling.seed``). Runs inside the validation loop,
    so with ``EMAWeightAveraging`` the pictures show the EMA weights. PNGs go to
    ``<log_dir>/samples/step_<global step>.png``.

    Args:
        num_samples: rows of the grid (taken from the first validation batch).
        num_steps: denoising steps, when fewer than ``model.sampling.num_steps`` will do for a
            picture during training (None: the same).
    """

    def __init__(self, num_samples: int = 4, num_steps: int | None = None):
        self.num_samples, self.num_steps = num_samples, num_steps
        self.last_path: Path | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        refuse_under_sharding(trainer, self, "sample with `leffa predict`")  # it runs the model on rank 0 alone

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        batch = {k: v[: self.num_samples] for k, v in batch.items() if k in ("tgt", "ref", "mask", "densepose")}
        config = pl_module.sampling
        if self.num_steps is not None:
            config = dataclasses.replace(config, num_steps=self.num_steps)
        prediction = sample(pl_module, batch, config, torch.Generator().manual_seed(config.seed))
        grid = sample_grid(batch, prediction)
        log_dir = rank_zero_log_dir(trainer)
        self.last_path = save_png(grid, log_dir / "samples" / f"step_{trainer.global_step:06d}.png")
        if isinstance(trainer.logger, TensorBoardLogger):
            trainer.logger.experiment.add_image("val/samples", grid, trainer.global_step)


class FlowPictures(L.Callback):
    """At each validation, the attention flow of every Leffa layer on the first validation batch,
    in TensorBoard (``val/flow/<layer>``) and as PNGs in ``<log_dir>/flows/step_<n>/``.

    When the batch carries the ground-truth flow (synthetic shards hold ``flow.npy``), the pictures
    show its colour beside the attention flow's, and the end-point error in pixels of the attention
    flow against it (``leffa.flow_pictures.end_point_error``, mean over the Leffa layers) is logged as
    ``val/flow_epe_px`` (per layer: ``val/flow_epe_px/<layer>``) on these samples at ``timestep``.

    Args:
        num_samples: samples (rows) per picture.
        timestep: the noise level the UNets see (below theta_timestep, where the loss acts).
    """

    def __init__(self, num_samples: int = 2, timestep: int = 250):
        self.num_samples, self.timestep = num_samples, timestep
        self.last_epe_px: float | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        refuse_under_sharding(trainer, self, "draw them with `leffa visualize`")  # see SampleGrid

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx != 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        from leffa.flow_pictures import end_point_error, layer_flows
        from leffa.flow_pictures import layer_pictures

        keys = ("tgt", "ref", "mask", "densepose", "flow")
        batch = {k: v[: self.num_samples] for k, v in batch.items() if k in keys}
        flows = layer_flows(pl_module, batch, self.timestep)
        log_dir = rank_zero_log_dir(trainer)
        folder = log_dir / "flows" / f"step_{trainer.global_step:06d}"
        for name, picture in layer_pictures(pl_module, batch, self.timestep, flows).items():
            save_png(picture, folder / f"{name}.png")
            if isinstance(trainer.logger, TensorBoardLogger):
                trainer.logger.experiment.add_image(f"val/flow/{name}", picture, trainer.global_step)
        if "flow" in batch and flows:
            errors = {f"val/flow_epe_px/{name.removesuffix('.processor')}": end_point_error(item["flow"], batch["flow"])
                      for name, item in flows.items()}
            self.last_epe_px = sum(errors.values()) / len(errors)
            if trainer.logger is not None:
                trainer.logger.log_metrics({"val/flow_epe_px": self.last_epe_px, **errors}, step=trainer.global_step)


def unsafe_key_reason(key: str) -> str | None:
    """Why a sample key (a string from a data file) cannot name a file, or None when it can.

    A safe key is one non-empty path component that does not start with ``.`` (so not ``.`` or
    ``..``, nor a hidden or temporary file), holds no ``/``, ``\\`` or NUL, and is at most
    ``MAX_KEY_BYTES`` bytes long as a file name.
    """
    if not isinstance(key, str) or not key:
        return "empty"
    if "\0" in key:
        return "holds a NUL character"
    if "/" in key or "\\" in key:
        return "holds a path separator"
    if key.startswith("."):
        return "starts with '.'"
    try:
        size = len(os.fsencode(key))
    except UnicodeEncodeError:
        return "is not encodable as a file name"
    if size > MAX_KEY_BYTES:
        return f"is longer than {MAX_KEY_BYTES} bytes"
    return None


class ImageWriter(BasePredictionWriter):
    """Writes ``leffa predict`` results: ``<output_dir>/<sample key>.png`` and ``settings.json``.

    Every rank writes its own samples (keys are unique), so it works under multi-GPU predict.
    Keys come from data files, so a key that is not a safe file name (see
    :func:`unsafe_key_reason`: ``../x``, an absolute path, ``sub/dir/key``, ...) is not written:
    such samples are counted and named in one warning at the end of predict. As a last guard,
    every file's resolved path must lie directly in ``output_dir``. Files are written atomically.

    Args:
        output_dir: folder for the images (made if missing); a file there, or in place of one of its
            parent folders, is a one-line error naming it when the run sets up (before the run's
            ``config.yaml`` is saved or anything is sampled).
    """

    def __init__(self, output_dir: str = "predictions"):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.refused: dict[str, str] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # here, not in __init__: the CLI would wrap the error of a callback's __init__ in its own message
        self.check_output_dir()

    def check_output_dir(self) -> None:
        """``output_dir`` is a folder or can be made one: no file in the way (a UserError naming it)."""
        folder = self.output_dir
        while not (folder.exists() or folder.is_symlink()) and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            what = "" if folder == self.output_dir else f": {folder} is a file"
            raise UserError(f"output_dir {self.output_dir} is not a folder{what}; give a folder (new or existing) "
                            "for the images")

    def on_predict_start(self, trainer, pl_module) -> None:
        self.refused = {}
        self.check_output_dir()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            settings = {"sampling": dataclasses.asdict(pl_module.sampling),
                        "model": {k: v for k, v in dict(pl_module.hparams).items() if not k.startswith("_")}}
            text = json.dumps(settings, indent=2, default=str).encode()
            write_atomically(self.output_dir / "settings.json", lambda f: f.write(text))

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for key, image in zip(prediction["key"], prediction["image"]):
            path = self.image_path(key)
            if path is None:
                continue
            pixels = ((image.float() + 1) / 2).clamp(0, 1)
            write_atomically(path, lambda f: save_image(pixels, f, format="png"))

    def image_path(self, key: str) -> Path | None:
        """Where the image of ``key`` goes; None (and the key recorded as refused) for an unsafe key."""
        reason = unsafe_key_reason(key)
        if reason is None:
            root = self.output_dir.resolve()
            path = root / f"{key}.png"
            if path.resolve().parent == root:
                return path
            reason = "resolves outside the output folder"
        self.refused[key] = reason
        return None

    def on_predict_end(self, trainer, pl_module) -> None:
        refused = self.refused
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[dict[str, str] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, refused)
            refused = {key: reason for part in gathered for key, reason in (part or {}).items()}
        if refused:
            named = ", ".join(f"{key!r} ({reason})" for key, reason in refused.items())
            rank_zero_warn(f"ImageWriter refused {len(refused)} samples whose keys are not safe file names;"
                           f" nothing of them was written to {self.output_dir}: {named}")
