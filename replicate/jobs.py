"""The replication's units of work, each run in a worker process of its own (``run.py`` hands them to
a process pool): step 0 of one family, the pooled baseline, one continuation (family, run, seed).

The tiny model gains nothing from a second torch thread (a step takes as long on one as on two), so
two one-thread workers do the matrix in about half the time of one process. Every job gets all it
needs as arguments (a worker shares no state with the parent: ``EVAL_TIMESTEPS`` and the thread
count are set by :func:`init_worker`) and returns plain data; the baseline's weights travel through
a file the pool's parent wrote (``baseline.pt``, read with ``weights_only=True``).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from pathlib import Path

import lightning as L
import torch

from leffa.data import LeffaDataModule
from leffa.data.batch import to_model_batch
from leffa.losses import warp_loss
from leffa.module import LeffaModule
from replicate import measure
from replicate.identifiability import (
    cell_average,
    centre_flow,
    end_point_error,
    free_query_fit,
    gap_closed,
    least_squares_floor,
)

# Continuations of the baseline: name -> module settings on top of the shared ones.
RUNS = {
    "no_leffa": dict(use_leffa_loss=False),
    "leffa": dict(use_leffa_loss=True),
    "leffa_per_head": dict(use_leffa_loss=True, average_heads=False),
    "leffa_no_upsample": dict(use_leffa_loss=True, upsample_flow=False),
    "leffa_all_timesteps": dict(use_leffa_loss=True, theta_timestep=1000),
}


def init_worker(threads: int, eval_timesteps: list[int]) -> None:
    torch.set_num_threads(threads)
    measure.EVAL_TIMESTEPS[:] = eval_timesteps
    # the pool's process, not whoever is the parent now: a worker that starts after the pool's
    # process is gone (its parent is then init) would otherwise wait for it forever
    parent = multiprocessing.parent_process()
    threading.Thread(target=_exit_with_parent, args=(parent.pid if parent else os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent is gone (stopped with Ctrl-C or killed) stops too, mid-job."""
    while os.getppid() == parent:
        time.sleep(2)
    os._exit(1)


def held_out(folder: Path, size: tuple[int, int], batch_size: int) -> list[dict]:
    data = LeffaDataModule(predict_shards=f"{folder}@test", height=size[0], width=size[1],
                           val_batch_size=batch_size, num_workers=0)
    return [to_model_batch(b) for b in data.predict_dataloader()]


class EvaluateAt(L.Callback):
    """Evaluate the module on held-out batches after the given optimizer steps (one run, several lengths)."""

    def __init__(self, steps: list[int], batches: list[dict]):
        self.steps, self.batches, self.results = set(steps), batches, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in self.steps and step not in self.results:
            self.results[step] = measure.evaluate(pl_module, self.batches)


def train(module: LeffaModule, data: LeffaDataModule, lengths: list[int], seed: int, root: Path,
          batches: list[dict] | None, callbacks: list | None = None) -> dict:
    """Train for max(lengths) steps from ``seed``; evaluate after each length when ``batches`` are given.
    ``callbacks``: more Lightning callbacks (the fidelity study's EMA)."""
    L.seed_everything(seed, verbose=False)
    evaluator = EvaluateAt(lengths, batches or [])
    trainer = L.Trainer(max_steps=max(lengths), accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=root, callbacks=([evaluator] if batches else []) + list(callbacks or []))
    trainer.fit(module, datamodule=data)
    if batches:
        for length in lengths:  # a run that stopped early (it never does) is measured where it ended
            evaluator.results.setdefault(length, measure.evaluate(module, batches))
    return {str(k): v for k, v in sorted(evaluator.results.items())}


def identifiability(batch: dict, grid: tuple[int, int], steps: int) -> dict:
    """Step 0 on one batch: centre guess, cell average, least-squares floor and the free-query fit."""
    gt = batch["flow"]
    flows = {"centre": centre_flow(gt, grid), "cell_average": cell_average(gt, grid),
             "floor": least_squares_floor(gt, grid)}
    fit, _ = free_query_fit(batch, grid, steps=steps, lr=1.0, tau=2.0)
    flows["fit"] = fit
    out = {}
    for name, flow in flows.items():
        out[f"{name}_epe_px"] = end_point_error(flow, gt)
        out[f"{name}_warp_l2"] = warp_loss(flow, batch["ref"], batch["tgt"], batch["mask"]).mean().item()
    out["gap_closed"] = gap_closed(out["centre_epe_px"], out["fit_epe_px"], out["floor_epe_px"])
    out["samples"] = int(gt.shape[0])
    return out


def step_zero(family: str, plan: list[tuple[str, tuple[int, int], list[tuple[int, int]]]], samples: int,
              steps: int) -> tuple[str, dict, float]:
    """Step 0 of one family: ``plan`` is [(held-out shard folder, image size, token grids)]."""
    start, result = time.perf_counter(), {}
    for folder, size, grids in plan:
        batch = held_out(Path(folder), size, samples)[0]
        for grid in grids:
            key = f"{measure.grid_name(grid)} at {size[0]}x{size[1]}"
            result[key] = identifiability(batch, grid, steps)
            print(f"[replicate] step 0 {family} {key}: {result[key]['gap_closed']:.2f} of the gap", flush=True)
    return family, result, time.perf_counter() - start


def baseline(settings: dict, folders: list[str], size: tuple[int, int], batch_size: int, steps: int,
             out_file: str, work: str) -> float:
    """The pooled baseline (diffusion loss only, seed 0); its weights go to ``out_file``."""
    start = time.perf_counter()
    torch.manual_seed(0)
    module = LeffaModule(**settings, use_leffa_loss=False)
    data = LeffaDataModule(train_shards=folders, height=size[0], width=size[1], batch_size=batch_size,
                           num_workers=0, shuffle_buffer=64, hflip=False, seed=0)
    print(f"[replicate] {settings.get('architecture')} baseline: {steps} steps", flush=True)
    train(module, data, [steps], 0, Path(work), None)
    torch.save(module.state_dict(), out_file)
    return time.perf_counter() - start


def continuation(settings: dict, base_file: str, arch: str, family: str, name: str, seed: int, lengths: list[int],
                 folder: str, size: tuple[int, int], batch_size: int, work: str,
                 keep_weights: bool) -> tuple[str, str, str, int, dict, float, dict | None]:
    """One run from the baseline: measured on the family's held-out samples after each length.
    Returns (architecture, family, name, seed, {length: measures}, seconds, weights when ``keep_weights``)."""
    start = time.perf_counter()
    batches = held_out(Path(folder), size, batch_size)
    data = LeffaDataModule(train_shards=folder, height=size[0], width=size[1], batch_size=batch_size,
                           num_workers=0, shuffle_buffer=64, hflip=False, seed=seed)
    module = LeffaModule(**{**settings, **RUNS[name]})
    module.load_state_dict(torch.load(base_file, weights_only=True))
    print(f"[replicate] {arch} {family} {name} seed {seed}: {max(lengths)} steps", flush=True)
    measured = train(module, data, lengths, seed, Path(work), batches)
    return arch, family, name, seed, measured, time.perf_counter() - start, module.state_dict() if keep_weights else None
