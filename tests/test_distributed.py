"""Data-parallel training on CPU with 2 processes (gloo) through the Lightning Trainer: DDP, FSDP2
(``ModelParallelStrategy`` + ``leffa.parallel``, float32 and bf16), FSDP1 (``FSDPStrategy`` as
configs/strategy/fsdp.yaml builds it); sharded checkpoints read back for the next stage and
resumed; what sharding refuses; the strategy configs.

Each 2-process case runs this file as a script under ``torch.distributed.run``
(``python -m torch.distributed.run --nproc_per_node=2 tests/test_distributed.py CASE OUT``); the
ranks write what they saw (per-step losses, generator states, weights) to OUT, and the tests
recompute the same steps in one process.

The single-process reference: rank r trains on half r of a global batch of 4 and draws its noise,
timesteps and VAE samples from its own generator (``LeffaModule.setup`` seeds one per rank), so
the reference runs both halves in one process with the ranks' generator states and averages the
two losses. With equal halves and every sample selected for the Leffa term (``p_drop_ref=0``,
``theta_timestep=1000``), that average is the loss of the whole global batch, and its gradient is
what data parallelism must apply on every rank. Training uses plain SGD, so the weights show that
gradient itself.

The ``ddp_accumulate`` case is the general one: ``theta_timestep=500`` and ``p_drop_ref=0.1``
select a different number of samples for the Leffa term on each rank and micro-batch, and each
optimizer step accumulates 2 micro-batches per rank. Its reference draws every rank's selection
for the whole optimizer step up front, as ``LeffaModule`` documents, and takes the loss of the
global batch the plain way: the diffusion mean over all samples plus the Leffa sum over all
selected samples divided by their count. The ``ddp_nonfinite`` case poisons one rank's batch:
both ranks must stop together with the one-line error (a rank-local stop would hang the other).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from leffa.checkpoints import is_sharded_checkpoint, read_state_dict
from leffa.module import LeffaModule
from leffa.testing import TINY_UNET, TINY_VAE, make_batch

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "configs" / "strategy" / "fsdp.yaml"
TRAIN_CONFIG = ROOT / "configs" / "base" / "train.yaml"  # the stages' DDPStrategy
MODEL_KWARGS = dict(use_leffa_loss=True, theta_timestep=1000, p_drop_ref=0.0, learning_rate=1e-3,
                    architecture=dict(class_path="dual_unet", init_args=dict(num_registers=2)))
STEPS = 2
SGD_LR = 0.1
WORLD = 2
ACCUMULATE = 2
# ddp_accumulate: the selection varies by rank and micro-batch; lambda 1 makes the Leffa term's
# weighting show in the weights
SELECTING = dict(theta_timestep=500, p_drop_ref=0.1, lambda_leffa=1.0)
POISONED_STEP = 1  # ddp_nonfinite: rank 1's batch of this step holds an inf
CLIP = 1e-2  # the *_clip cases: gradient_clip_val, far below the gradients' norm


# ---------------------------------------------------------------- shared by the ranks and the tests

def build_module(module_class=LeffaModule, **overrides) -> LeffaModule:
    torch.manual_seed(0)  # the same initial weights in every process
    return module_class(unet_config=dict(TINY_UNET), vae_config=dict(TINY_VAE), **{**MODEL_KWARGS, **overrides})


class SGDLeffa(LeffaModule):
    """Plain SGD, so a step is -lr * gradient and the weights show the gradient data parallelism
    applied (AdamW's first step is about lr * sign(gradient), blind to a wrong scale)."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=SGD_LR)


def global_batch(step: int) -> dict:
    return make_batch(batch_size=2 * WORLD, seed=step)


def half(batch: dict, rank: int) -> dict:
    # rank r gets samples [2r, 2r + 2) of the global batch
    return {k: v[2 * rank: 2 * rank + 2] for k, v in batch.items()}


class RankHalves(torch.utils.data.IterableDataset):
    """Batch s yields this rank's half of ``global_batch(s)``, for s from ``start``; with
    ``poison_at``, that batch's target holds an inf."""

    def __init__(self, rank: int, start: int = 0, poison_at: int | None = None):
        self.rank, self.start, self.poison_at = rank, start, poison_at

    def __iter__(self):
        step = self.start
        while True:
            batch = half(global_batch(step), self.rank)
            if step == self.poison_at:
                batch["tgt"][0, :, 10, 10] = float("inf")
            yield batch
            step += 1


def reference_run(module: LeffaModule, generator_states: list[torch.Tensor], scale: float = 1.0 / WORLD,
                  contributing: tuple[int, ...] = tuple(range(WORLD)), clip: float | None = None,
                  norms: list | None = None) -> list[list[float]]:
    """Single process: ``STEPS`` optimizer steps on ``scale * sum`` of the half-batch losses of the
    ``contributing`` ranks (default: all, scale 1/WORLD: the gradient mean that data parallelism
    must compute); returns each rank's loss per step. With ``clip``, the gradients' total norm is
    clipped to it before each step, and appended to ``norms`` as it was before clipping."""
    generators = [torch.Generator().set_state(state) for state in generator_states]
    optimizer = module.configure_optimizers()
    module.train()
    losses = [[] for _ in range(WORLD)]
    for step in range(STEPS):
        optimizer.zero_grad()
        total = 0.0
        for rank in range(WORLD):
            loss = module.compute_loss(half(global_batch(step), rank), generators[rank], train=True)[0]
            losses[rank].append(loss.item())
            if rank in contributing:
                total = total + scale * loss
        total.backward()
        if clip is not None:
            norms.append(torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], clip))
        optimizer.step()
    return losses


def global_batch_reference(module: LeffaModule, generator_states: list[torch.Tensor],
                           global_mean: bool = True) -> list[list[int]]:
    """Single process, ``ddp_accumulate``'s global batches: per optimizer step, every rank's
    ``ACCUMULATE`` micro-batches, with each rank's selection drawn up front from its generator;
    one SGD step on the loss of the whole batch. ``global_mean=False`` weighs the Leffa term the
    old way instead (each micro-batch's own mean, averaged). Returns the selected counts of each
    step's (rank, micro-batch) pieces."""
    generators = [torch.Generator().set_state(state) for state in generator_states]
    optimizer = module.configure_optimizers()
    module.train()
    counts = []
    for step in range(STEPS):
        optimizer.zero_grad()
        diffusion, leffa, means, step_counts = [], [], [], []
        for rank in range(WORLD):
            n = ACCUMULATE * 2
            timesteps = torch.randint(0, 1000, (n,), generator=generators[rank])
            keep_ref = torch.rand(n, generator=generators[rank]) >= SELECTING["p_drop_ref"]
            for m in range(ACCUMULATE):
                part = slice(2 * m, 2 * m + 2)
                batch = half(global_batch(step * ACCUMULATE + m), rank)
                terms = module.loss_terms(batch, generators[rank], timesteps[part], keep_ref[part])
                selected = (timesteps[part] < SELECTING["theta_timestep"]) & keep_ref[part]
                step_counts.append(int(selected.sum()))
                diffusion.append(terms["diffusion"])
                if step_counts[-1]:
                    leffa.append(terms["leffa"])
                    means.append(terms["leffa"].mean())
        loss = torch.cat(diffusion).mean()
        if global_mean:
            loss = loss + SELECTING["lambda_leffa"] * torch.cat(leffa).sum() / sum(step_counts)
        else:
            loss = loss + SELECTING["lambda_leffa"] * torch.stack(means).sum() / (WORLD * ACCUMULATE)
        loss.backward()
        optimizer.step()
        counts.append(step_counts)
    return counts


# ---------------------------------------------------------------- the 2-process cases (script side)

class Recorder(L.Callback):
    """Per-step losses, the generator state each rank starts with, and the trainable parameters
    left without a gradient after a backward."""

    def __init__(self):
        self.losses, self.generator, self.without_gradient, self.grad_norms = [], None, set(), []

    def on_train_start(self, trainer, pl_module):
        self.generator = pl_module.noise_generator.get_state()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.without_gradient |= {n for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        if "train/grad_norm" in trainer.callback_metrics:  # logged at each optimizer step
            self.grad_norms.append(float(trainer.callback_metrics["train/grad_norm"]))


def fsdp_strategy_from_config(strategy_class=None, config: Path = FSDP_CONFIG):
    """The strategy exactly as ``config``'s (default configs/strategy/fsdp.yaml) ``trainer.strategy``
    builds it through the CLI's parser; ``strategy_class`` swaps in a subclass (the CPU shim),
    arguments kept."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import Strategy

    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy | str)
    config = {"strategy": yaml.safe_load(config.read_text())["trainer"]["strategy"]}
    strategy = parser.instantiate(parser.parse_object(config)).strategy
    if strategy_class is not None:
        strategy.__class__ = strategy_class
    return strategy


def cpu_fsdp_strategy_class():
    """``FSDPStrategy`` on CPU, for these tests only. Lightning allows it only with CUDA (an
    exact-type check, which a subclass passes) and hands FSDP the device's index, which a CPU
    device lacks (FSDP then looks for an accelerator): the subclass hands it the CPU device."""
    from unittest import mock

    import torch.distributed.fsdp as fsdp
    from lightning.pytorch.strategies import FSDPStrategy

    class CPUFullyShardedDataParallel(fsdp.FullyShardedDataParallel):
        def __init__(self, module, device_id=None, **kwargs):
            super().__init__(module, device_id=torch.device("cpu"), **kwargs)

    class CPUFSDPStrategy(FSDPStrategy):
        def _setup_model(self, model):
            with mock.patch.object(fsdp, "FullyShardedDataParallel", CPUFullyShardedDataParallel):
                return super()._setup_model(model)

    return CPUFSDPStrategy


def make_strategy(case: str):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    if case.startswith("ddp"):
        # the stages' DDPStrategy (configs/base/train.yaml), which does not look for unused
        # parameters: the Reference UNet's head that no loss reaches is frozen when built
        strategy = fsdp_strategy_from_config(config=TRAIN_CONFIG)
        assert type(strategy) is DDPStrategy and not strategy._ddp_kwargs.get("find_unused_parameters")
        return strategy
    if case.startswith("fsdp2"):
        return ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1)
    if case.startswith("fsdp1"):
        return fsdp_strategy_from_config(cpu_fsdp_strategy_class())
    raise ValueError(f"unknown case {case!r}; valid: ddp, ddp_accumulate, ddp_nonfinite, fsdp2, fsdp2_bf16, "
                     "fsdp2_resume, fsdp2_attention, fsdp2_clip, fsdp1, fsdp1_clip")


def fit(case: str, module: LeffaModule, out: Path, steps: int = STEPS, ckpt_path: Path | None = None,
        accumulate: int = 1, poison_at: int | None = None):
    """``steps`` steps on this rank's halves, a checkpoint every ``STEPS`` steps; the Trainer and
    the per-step losses."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    recorder = Recorder()
    saver = ModelCheckpoint(dirpath=out, filename="{step}", every_n_train_steps=STEPS, save_top_k=-1)
    precision = "bf16-mixed" if case.endswith("bf16") else "32-true"
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=WORLD, strategy=make_strategy(case),
                        precision=precision, logger=False, callbacks=[recorder, saver], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out, accumulate_grad_batches=accumulate,
                        gradient_clip_val=CLIP if case.endswith("_clip") else None)
    # a resumed run starts at the checkpoint's step: so do its data (an iterable restarts)
    start = STEPS if ckpt_path else 0
    loader = torch.utils.data.DataLoader(RankHalves(int(os.environ["RANK"]), start, poison_at), batch_size=None)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer, recorder


def worker(case: str, out: Path) -> None:
    """One rank of a 2-process case; writes ``rank<r>.pt`` (and rank 0 ``full.pt``) to ``out``."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    rank = int(os.environ["RANK"])
    if case == "fsdp2_resume":
        # AdamW (its state must come back too): 3 steps straight, and again from the step-2 checkpoint
        whole = fit(case, build_module(), out / "whole", steps=STEPS + 1)[1]
        resumed_trainer, resumed = fit(case, build_module(), out / "resumed", steps=STEPS + 1,
                                       ckpt_path=out / "whole" / f"step={STEPS}.ckpt")
        torch.save({"whole": whole.losses, "resumed": resumed.losses, "generator": resumed.generator,
                    "global_step": resumed_trainer.global_step}, out / f"rank{rank}.pt")
        return
    if case == "ddp_nonfinite":
        from leffa.errors import UserError

        # only rank 1's batch is poisoned; every rank must stop at that step, none may hang
        module = build_module(SGDLeffa)
        try:
            fit(case, module, out, steps=STEPS + 2, poison_at=POISONED_STEP if rank == 1 else None)
            stopped = None
        except UserError as error:
            stopped = str(error)
        torch.save({"stopped": stopped, "weights": module.state_dict()}, out / f"rank{rank}.pt")
        return
    accumulate = ACCUMULATE if case == "ddp_accumulate" else 1
    overrides = SELECTING if case == "ddp_accumulate" else dict(trainable="attention") if case == "fsdp2_attention" else {}
    module = build_module(SGDLeffa, **overrides)
    # the dtype a layer computes in: the parameter it sees during the forward (gathered, cast)
    compute_dtypes = set()
    layer = module.generative_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    layer.register_forward_hook(lambda m, args, output: compute_dtypes.add(str(m.weight.dtype)))
    trainer, recorder = fit(case, module, out, accumulate=accumulate)

    # a collective: every rank takes part, rank 0 writes the full weights
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(trainer.strategy.model, options=options) if not case.startswith("ddp") else None
    param = module.generative_unet.conv_in.weight
    torch.save({
        "losses": recorder.losses,
        "generator": recorder.generator,
        "leffa_layers": float(trainer.callback_metrics["train/leffa_layers"]),
        # the share of one parameter this rank holds: a DTensor's local shard when sharded (FSDP2)
        "local_numel": param.to_local().numel() if hasattr(param, "to_local") else param.numel(),
        "compute_dtypes": sorted(compute_dtypes),
        "without_gradient": sorted(recorder.without_gradient),
        "grad_norms": recorder.grad_norms,
        "weights": module.state_dict() if case.startswith("ddp") else None,
    }, out / f"rank{rank}.pt")
    if rank == 0 and full is not None:
        torch.save(full, out / "full.pt")


def main(case: str, out: Path) -> None:
    worker(case, out)
    # leave together: a rank that exits while the other still uses gloo may abort it
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- the tests

pytestmark = pytest.mark.usefixtures("one_thread")
# The tests that take a two-process run are marked ``distributed`` (make test-fast leaves them out).


def run_two_processes(case: str, out: Path) -> Path:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               __file__, case, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert done.returncode == 0, f"{case} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return out


def two_process_fixture(case: str):
    """A module-scoped fixture: the folder of one two-process run of ``case``, shared by its tests."""

    @pytest.fixture(scope="module")
    def run(tmp_path_factory):
        return run_two_processes(case, tmp_path_factory.mktemp(case))

    return run


ddp_run = two_process_fixture("ddp")
ddp_accumulate_run = two_process_fixture("ddp_accumulate")
ddp_nonfinite_run = two_process_fixture("ddp_nonfinite")
fsdp2_run = two_process_fixture("fsdp2")
fsdp2_bf16_run = two_process_fixture("fsdp2_bf16")
fsdp2_resume_run = two_process_fixture("fsdp2_resume")
fsdp2_attention_run = two_process_fixture("fsdp2_attention")
fsdp1_run = two_process_fixture("fsdp1")
fsdp2_clip_run = two_process_fixture("fsdp2_clip")
fsdp1_clip_run = two_process_fixture("fsdp1_clip")


def load_ranks(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())


def single_process(ranks: list[dict], module_settings: dict | None = None,
                   **wrong) -> tuple[list[list[float]], dict]:
    """Per-rank losses and final weights of ``reference_run`` with the ranks' generators."""
    module = build_module(SGDLeffa, **(module_settings or {}))
    module.setup("fit")
    losses = reference_run(module, [r["generator"] for r in ranks], **wrong)
    return losses, module.state_dict()


def assert_trains_like_one_process(ranks: list[dict], weights: dict, tolerance: float = 1e-5,
                                   module_settings: dict | None = None) -> None:
    losses, expected = single_process(ranks, module_settings)
    for rank in range(WORLD):
        assert len(ranks[rank]["losses"]) == STEPS
        torch.testing.assert_close(ranks[rank]["losses"], losses[rank], atol=tolerance, rtol=tolerance)
    assert weights.keys() == expected.keys()
    assert max_difference(weights, expected) < tolerance


@pytest.mark.distributed
def test_ddp_averages_gradients_like_one_process_on_the_global_batch(ddp_run):
    ranks = load_ranks(ddp_run)
    # without find_unused_parameters: every trainable parameter got a gradient at every step
    assert [r["without_gradient"] for r in ranks] == [[]] * WORLD
    # every rank ends with the same weights, and draws its own noise stream
    assert all(torch.equal(v, ranks[1]["weights"][k]) for k, v in ranks[0]["weights"].items())
    assert not torch.equal(ranks[0]["generator"], ranks[1]["generator"])
    assert_trains_like_one_process(ranks, ranks[0]["weights"], tolerance=1e-5)
    # the comparison can tell: summing instead of averaging, or each rank keeping its own
    # gradient, would end elsewhere by far more than the tolerance
    for wrong in (dict(scale=1.0), dict(scale=1.0, contributing=(0,))):
        assert max_difference(ranks[0]["weights"], single_process(ranks, **wrong)[1]) > 1e-3, wrong


@pytest.mark.distributed
def test_ddp_with_accumulation_and_uneven_selection_trains_like_one_process_on_the_global_batch(
        ddp_accumulate_run):
    ranks = load_ranks(ddp_accumulate_run)
    weights = ranks[0]["weights"]
    assert all(torch.equal(v, ranks[1]["weights"][k]) for k, v in weights.items())
    assert all(len(r["losses"]) == STEPS * ACCUMULATE for r in ranks)  # one per micro-batch
    assert [r["without_gradient"] for r in ranks] == [[]] * WORLD
    module = build_module(SGDLeffa, **SELECTING)
    module.setup("fit")
    counts = global_batch_reference(module, [r["generator"] for r in ranks])
    # the case this is about: ranks and micro-batches select different numbers of samples
    assert all(sum(c) > 0 for c in counts) and all(len(set(c)) > 1 for c in counts), counts
    assert max_difference(weights, module.state_dict()) < 1e-5
    # and the comparison can tell: per-micro-batch means end elsewhere
    wrong = build_module(SGDLeffa, **SELECTING)
    wrong.setup("fit")
    global_batch_reference(wrong, [r["generator"] for r in ranks], global_mean=False)
    assert max_difference(weights, wrong.state_dict()) > 1e-4


@pytest.mark.distributed
def test_ddp_stops_every_rank_when_one_ranks_loss_is_not_finite(ddp_nonfinite_run):
    ranks = load_ranks(ddp_nonfinite_run)
    expected = f"the diffusion loss is not finite at global step {POISONED_STEP}:"
    assert all(r["stopped"] is not None and r["stopped"].startswith(expected) for r in ranks), ranks
    # no rank took the poisoned step: the weights are those after step POISONED_STEP, finite, equal
    assert all(torch.isfinite(v).all() for v in ranks[0]["weights"].values() if v.is_floating_point())
    assert all(torch.equal(v, ranks[1]["weights"][k]) for k, v in ranks[0]["weights"].items())


@pytest.mark.distributed
def test_fsdp2_shards_the_unets_and_trains_like_one_process(fsdp2_run):
    ranks = load_ranks(fsdp2_run)
    full = torch.load(fsdp2_run / "full.pt", weights_only=True)
    # each rank holds half of a parameter (dim 0 split over the 2 ranks)
    numel = full["generative_unet.conv_in.weight"].numel()
    assert [r["local_numel"] for r in ranks] == [numel // WORLD] * WORLD
    # the bank still links the UNets: all 7 self-attention layers were captured for the Leffa loss
    assert [r["leffa_layers"] for r in ranks] == [7.0] * WORLD
    # gradients reach both UNets through the bank and are averaged over the ranks
    assert_trains_like_one_process(ranks, full)
    # register tokens (inside the sharded transformer blocks) were trained too
    initial = build_module().state_dict()
    registers = [k for k in full if k.endswith("processor.registers")]
    assert registers and all(not torch.equal(full[k], initial[k]) for k in registers)


@pytest.mark.distributed
@pytest.mark.parametrize("run", ["fsdp2_clip_run", "fsdp1_clip_run"])
def test_sharded_strategies_clip_the_total_gradient_norm_like_one_process(run, request):
    out = request.getfixturevalue(run)
    ranks = load_ranks(out)
    module = build_module(SGDLeffa)
    module.setup("fit")
    norms = []
    reference_run(module, [r["generator"] for r in ranks], clip=CLIP, norms=norms)
    # train/grad_norm: the norm over all ranks' shards before clipping, the same on every rank
    assert min(norms) > 10 * CLIP  # so the clipping changed every step
    for r in ranks:
        torch.testing.assert_close(r["grad_norms"], [float(n) for n in norms], rtol=1e-4, atol=0)
    # the clipped steps: the weights of one process clipping the global batch's gradient
    assert max_difference(torch.load(out / "full.pt", weights_only=True), module.state_dict()) < 1e-5


@pytest.mark.distributed
def test_fsdp2_bf16_computes_in_bf16_and_keeps_float32_weights(fsdp2_bf16_run, fsdp2_run):
    ranks, exact = load_ranks(fsdp2_bf16_run), load_ranks(fsdp2_run)
    assert [r["compute_dtypes"] for r in ranks] == [["torch.bfloat16"]] * WORLD
    assert [r["compute_dtypes"] for r in exact] == [["torch.float32"]] * WORLD
    full = torch.load(fsdp2_bf16_run / "full.pt", weights_only=True)
    assert {v.dtype for k, v in full.items() if "unet" in k} == {torch.float32}  # the master weights
    # bf16 rounding moves the losses a little, not more
    for bf16, fp32 in zip(ranks, exact):
        torch.testing.assert_close(bf16["losses"], fp32["losses"], atol=2e-2, rtol=0)
    assert max_difference(full, build_module().state_dict()) > 1e-3  # it trained


@pytest.mark.distributed
def test_fsdp2_checkpoint_resumes_with_ckpt_path(fsdp2_resume_run):
    ranks = load_ranks(fsdp2_resume_run)
    # the resumed run loaded the sharded weights and AdamW state (strictly: every key) and ran step 3
    assert [(r["global_step"], len(r["resumed"])) for r in ranks] == [(STEPS + 1, 1)] * WORLD
    # rank 0's step-3 loss depends on the weights after step 2 and on its generator: both restored.
    # (Rank 1 is not compared: Lightning's meta.pt holds rank 0's generator state only.)
    assert ranks[0]["resumed"][0] == pytest.approx(ranks[0]["whole"][STEPS], abs=1e-6)


@pytest.mark.distributed
def test_fsdp2_resume_restores_every_ranks_generator(fsdp2_resume_run):
    ranks = load_ranks(fsdp2_resume_run)
    assert ranks[1]["resumed"][0] == pytest.approx(ranks[1]["whole"][STEPS], abs=1e-6)


@pytest.mark.distributed
def test_fsdp1_from_the_config_trains_like_one_process(fsdp1_run):
    ranks = load_ranks(fsdp1_run)
    assert [r["leffa_layers"] for r in ranks] == [7.0] * WORLD
    assert_trains_like_one_process(ranks, torch.load(fsdp1_run / "full.pt", weights_only=True))


@pytest.mark.distributed
@pytest.mark.parametrize("run", ["fsdp2_run", "fsdp2_bf16_run", "fsdp1_run"])
def test_sharded_checkpoint_folder_initialises_the_next_stage(run, request):
    out = request.getfixturevalue(run)
    folder = out / f"step={STEPS}.ckpt"
    # a folder of shards: one file per rank, an index, Lightning's metadata
    assert is_sharded_checkpoint(folder)
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    full = torch.load(out / "full.pt", weights_only=True)
    state = read_state_dict(folder, "live")
    assert state.keys() == full.keys()
    assert all(torch.equal(state[k], full[k]) for k in full)
    # the next stage: its weights are the trained ones
    nxt = LeffaModule(unet_config=dict(TINY_UNET), vae_config=dict(TINY_VAE), **MODEL_KWARGS,
                      init_from=str(folder), init_from_weights="live")
    assert all(torch.equal(v, full[k]) for k, v in nxt.state_dict().items())
    # sharded runs have no EMA weights: asking for them says so and reads the live ones
    with pytest.warns(UserWarning, match="no EMA weights"):
        assert torch.equal(read_state_dict(folder)["generative_unet.conv_in.weight"],
                           full["generative_unet.conv_in.weight"])


def write_sharded_folder(path: Path, weights: dict, meta: dict) -> None:
    """A checkpoint folder as Lightning's sharded strategies write it, in one process."""
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": weights, "optimizer_0": {"state": {"w": {"exp_avg": torch.ones(2, 3)}}}}
    dcp.save(state, checkpoint_id=path, no_dist=True)
    torch.save(meta, path / "meta.pt")


def test_sharded_folder_weights_ema_and_live(tmp_path):
    weights = {"w": torch.arange(6.0).view(2, 3)}
    # a run without EMA (the only kind sharded strategies allow): live weights, "ema" says so
    write_sharded_folder(tmp_path / "plain", weights, {"global_step": 3})
    live = read_state_dict(tmp_path / "plain", "live")
    assert live.keys() == {"w"} and torch.equal(live["w"], weights["w"])  # no optimizer state
    with pytest.warns(UserWarning, match="no EMA weights"):
        read_state_dict(tmp_path / "plain", "ema")
    # EMAWeightAveraging's layout: the average in the sharded tensors, the live weights in meta.pt
    write_sharded_folder(tmp_path / "ema", weights, {"current_model_state": {}, "averaging_state": {}})
    assert torch.equal(read_state_dict(tmp_path / "ema", "ema")["w"], weights["w"])
    with pytest.raises(ValueError, match="rank 0 only"):
        read_state_dict(tmp_path / "ema", "live")


def test_sharded_folder_index_with_foreign_objects_is_refused(tmp_path):
    import pickle

    from leffa.errors import UserError

    write_sharded_folder(tmp_path, {"w": torch.zeros(2)}, {})
    (tmp_path / ".metadata").write_bytes(pickle.dumps([os.system]))
    with pytest.raises(UserError, match="posix.system"):
        read_state_dict(tmp_path, "live")


def test_fsdp_config_wraps_blocks_but_not_reference_attention():
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    from leffa.parallel import fsdp_wrap_policy

    strategy = fsdp_strategy_from_config()
    assert type(strategy).__name__ == "FSDPStrategy" and strategy._state_dict_type == "sharded"
    policy = strategy.kwargs["auto_wrap_policy"]
    assert policy is fsdp_wrap_policy
    module = build_module()
    wrapped = lambda unet, kind: {policy(m, False, 0) for m in unet.modules() if isinstance(m, kind)}  # noqa: E731
    assert wrapped(module.generative_unet, BasicTransformerBlock) == {True}
    assert wrapped(module.reference_unet, BasicTransformerBlock) == {False}
    assert wrapped(module.reference_unet, ResnetBlock2D) == {True}
    assert not policy(module.vae, False, 0)


def test_sharding_strategies_refuse_ema_and_rank_zero_samplers(tmp_path, own_process_group):
    from lightning.pytorch.callbacks import EMAWeightAveraging
    from lightning.pytorch.strategies import (
        DDPStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
    )

    from leffa.callbacks import FlowPictures, SampleGrid
    from leffa.parallel import refuse_unshardable_callbacks

    callbacks = [EMAWeightAveraging(), SampleGrid()]
    refuse_unshardable_callbacks(DDPStrategy(), callbacks)  # fine: DDP keeps full weights on every rank
    with pytest.raises(ValueError, match="FSDPStrategy.*EMAWeightAveraging keeps an unsharded copy"):
        refuse_unshardable_callbacks(FSDPStrategy(), callbacks)
    # the callbacks that run the model on rank 0 alone refuse themselves when the Trainer sets them up
    SampleGrid().setup(SimpleNamespace(strategy=DDPStrategy()), None, "fit")
    for callback in (SampleGrid(), FlowPictures()):
        with pytest.raises(ValueError, match=f"FSDPStrategy.*{type(callback).__name__} runs the sharded model"):
            callback.setup(SimpleNamespace(strategy=FSDPStrategy()), None, "fit")
    # through the Trainer (one process is enough): the error comes before any sharding
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
                        callbacks=[EMAWeightAveraging()], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="ModelParallelStrategy.*EMAWeightAveraging keeps an unsharded copy"):
        trainer.fit(build_module(), train_dataloaders=torch.utils.data.DataLoader(RankHalves(0), batch_size=None))


@pytest.mark.slow  # over 1 s on 2 cores: make test runs it, make test-fast does not
@pytest.mark.parametrize("checkpointing", [False, True])
def test_unused_reference_parameters_are_those_without_gradient(checkpointing):
    from leffa.architectures.dual_unet_attention import freeze_unused_reference_parameters

    module = LeffaModule(unet_config=dict(TINY_UNET), vae_config=dict(TINY_VAE), **MODEL_KWARGS,
                         gradient_checkpointing=checkpointing)
    # frozen when the model was built; trainable again here, to see which get no gradient
    built_frozen = {n for n, p in module.reference_unet.named_parameters() if not p.requires_grad}
    module.reference_unet.requires_grad_(True)
    module.setup("fit")
    module.train()
    module.compute_loss(half(global_batch(0), 0), torch.Generator().manual_seed(0), train=True)[0].backward()
    no_gradient = {n for n, p in module.reference_unet.named_parameters() if p.grad is None}
    frozen = freeze_unused_reference_parameters(module.reference_unet, module.bank)
    assert set(frozen) == no_gradient == built_frozen and "conv_out.weight" in no_gradient
    assert all(not p.requires_grad for n, p in module.reference_unet.named_parameters() if n in no_gradient)
    assert not module.bank.features  # the probe leaves nothing behind
    assert module.reference_unet.is_gradient_checkpointing == checkpointing
    assert freeze_unused_reference_parameters(module.reference_unet, module.bank) == []  # already frozen


def test_strategy_configs_replace_the_stage_callbacks(monkeypatch, capsys):
    from leffa.cli import cli_main

    monkeypatch.setenv("LEFFA_SD15", "/nowhere")
    for strategy, stage in (("fsdp", "vton_512.yaml"), ("fsdp2_cpu", "tiny_synthetic.yaml")):
        with pytest.raises(SystemExit):
            cli_main(["fit", "--config", str(ROOT / "configs" / stage),
                      "--config", str(ROOT / "configs" / "strategy" / f"{strategy}.yaml"), "--print_config"])
        printed = capsys.readouterr().out
        assert ("FSDPStrategy" if strategy == "fsdp" else "ModelParallelStrategy") in printed
        for refused in ("EMAWeightAveraging", "SampleGrid", "FlowPictures"):
            assert refused not in printed
        assert "ModelCheckpoint" in printed


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="FSDPStrategy needs a CUDA GPU (Lightning refuses CPU); "
                           "test_fsdp1_from_the_config_trains_like_one_process runs the same config on CPU")
def test_fsdp_strategy_from_the_config_on_one_gpu(tmp_path, own_process_group):
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = build_module()
    trainer = L.Trainer(max_steps=2, accelerator="gpu", devices=1, precision="bf16-mixed",
                        strategy=fsdp_strategy_from_config(), logger=False, enable_progress_bar=False,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="last", every_n_train_steps=2)],
                        default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(RankHalves(0), batch_size=None))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    state = read_state_dict(tmp_path / "last.ckpt", "live")
    initial = build_module().state_dict()
    assert state.keys() == initial.keys() and max_difference(state, initial) > 1e-4


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))


@pytest.mark.distributed
def test_fsdp2_with_only_the_attention_trainable_trains_like_one_process(fsdp2_attention_run):
    ranks = load_ranks(fsdp2_attention_run)
    full = torch.load(fsdp2_attention_run / "full.pt", weights_only=True)
    assert_trains_like_one_process(ranks, full, module_settings=dict(trainable="attention"))
    # the frozen weights stayed as they were; the self-attention moved
    initial = build_module(trainable="attention").state_dict()
    moved = {k for k in full if not torch.equal(full[k], initial[k])}
    assert moved and all(".attn1." in k or "conv_in" in k for k in moved), sorted(moved)[:5]
