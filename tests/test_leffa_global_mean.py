"""The Leffa term is the mean over the selected samples of the whole optimizer step.

With ``theta_timestep`` below the number of timesteps and reference dropout, each micro-batch
(and each data-parallel rank) selects a different number of samples. The term must still be
sum / count over the global batch, so that accumulating micro-batches (or splitting over ranks,
tests/test_distributed.py) trains like one process on the whole batch.

The reference below follows the random stream documented in ``LeffaModule`` (per optimizer step:
the timesteps, then the reference keeps, of all its samples; then per micro-batch the VAE sample
and the noise) and computes the loss of the whole batch the plain way.
"""

from __future__ import annotations

import lightning as L
import torch

from leffa.module import LeffaModule
from leffa.selection import draw_selection
from leffa.testing import make_batch

ACCUMULATE, BATCH, STEPS = 2, 3, 2
SGD_LR = 0.1
# lambda 1: the Leffa term's weighting shows in the weights well above the tolerance
KWARGS = dict(use_leffa_loss=True, theta_timestep=500, p_drop_ref=0.1, lambda_leffa=1.0)


class SGDLeffa(LeffaModule):
    """Plain SGD: a step is -lr * gradient, so the weights show the gradient itself."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=SGD_LR)


def build(tiny_configs) -> SGDLeffa:
    torch.manual_seed(0)
    return SGDLeffa(**tiny_configs, **KWARGS)


def micro_batch(index: int) -> dict:
    return make_batch(batch_size=BATCH, seed=index)


class MicroBatches(torch.utils.data.IterableDataset):
    def __iter__(self):
        index = 0
        while True:
            yield micro_batch(index)
            index += 1


class GeneratorAtStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.state = pl_module.noise_generator.get_state()


def reference(module: LeffaModule, generator_state: torch.Tensor, global_mean: bool = True):
    """``STEPS`` SGD steps on the loss of each optimizer step's whole batch (its ``ACCUMULATE``
    micro-batches); with ``global_mean=False``, the mean of per-micro-batch Leffa means instead.
    Returns the selected count of every micro-batch."""
    generator = torch.Generator().set_state(generator_state)
    optimizer = module.configure_optimizers()
    module.train()
    counts = []
    for step in range(STEPS):
        optimizer.zero_grad()
        n = ACCUMULATE * BATCH
        timesteps = torch.randint(0, 1000, (n,), generator=generator)
        keep_ref = torch.rand(n, generator=generator) >= KWARGS["p_drop_ref"]
        diffusion, leffa, means = [], [], []
        for m in range(ACCUMULATE):
            part = slice(m * BATCH, (m + 1) * BATCH)
            terms = module.loss_terms(micro_batch(step * ACCUMULATE + m), generator, timesteps[part], keep_ref[part])
            expected_rows = torch.nonzero((timesteps[part] < 500) & keep_ref[part]).flatten()
            assert torch.equal(terms["rows"], expected_rows)
            counts.append(len(expected_rows))
            diffusion.append(terms["diffusion"])
            if "leffa" in terms:
                leffa.append(terms["leffa"])
                means.append(terms["leffa"].mean())
        loss = torch.cat(diffusion).mean()
        if global_mean:
            loss = loss + torch.cat(leffa).sum() / sum(len(x) for x in leffa)
        else:  # each micro-batch's own mean, averaged over the micro-batches
            loss = loss + torch.stack(means).sum() / ACCUMULATE
        loss.backward()
        optimizer.step()
    return counts


def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())


def test_accumulated_micro_batches_train_like_one_process_on_the_whole_batch(tiny_configs, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module = build(tiny_configs)
        start = GeneratorAtStart()
        trainer = L.Trainer(max_steps=STEPS, accumulate_grad_batches=ACCUMULATE, accelerator="cpu", devices=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[start], default_root_dir=tmp_path)
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(MicroBatches(), batch_size=None))
        assert trainer.global_step == STEPS

        expected = build(tiny_configs)
        expected.setup("fit")
        counts = reference(expected, start.state)
        # the case the normalisation is about: micro-batches select different numbers of samples
        assert all(counts) and len(set(counts[:ACCUMULATE])) > 1, counts
        assert max_difference(module.state_dict(), expected.state_dict()) < 1e-5

        # and the comparison can tell: per-micro-batch means end elsewhere
        wrong = build(tiny_configs)
        wrong.setup("fit")
        reference(wrong, start.state, global_mean=False)
        assert max_difference(module.state_dict(), wrong.state_dict()) > 1e-4
    finally:
        torch.set_num_threads(threads)


def test_outside_training_the_term_is_the_batch_mean(tiny_configs):
    # validation and calls outside a Trainer: sum / this batch's count, as before
    module = build(tiny_configs)
    module.setup("fit")
    batch = micro_batch(0)
    with torch.no_grad():
        loss = module.compute_loss(batch, torch.Generator().manual_seed(3), train=False)[0]
        generator = torch.Generator().manual_seed(3)
        timesteps, keep_ref = draw_selection(generator, BATCH, module.scheduler.config.num_train_timesteps, 0.0)
        assert keep_ref.all()  # no reference dropout outside training
        terms = module.loss_terms(batch, generator, timesteps, keep_ref)
    assert len(terms["rows"]) > 0
    torch.testing.assert_close(loss, terms["diffusion"].mean() + terms["leffa"].mean())
