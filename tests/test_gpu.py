"""GPU checks (make test-gpu): skipped with a reason where CUDA is missing. Each compares the GPU
path with a plain one: bf16 against fp32, compiled against eager, sharded against one process,
sampling on the device."""

from __future__ import annotations

import pytest
import torch

from leffa.module import LeffaModule
from leffa.sampling import SamplingConfig, sample
from leffa.testing import make_batch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu on one)")]


def build(tiny_configs, **kwargs):
    torch.manual_seed(0)
    module = LeffaModule(**tiny_configs, conditioning="released", use_leffa_loss=True, theta_timestep=1000,
                         p_drop_ref=0.0, **kwargs)
    return module.cuda()


def step(module, bf16=False):
    batch = make_batch(device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss, _ = module.compute_loss(batch, torch.Generator().manual_seed(0), train=True)
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in module.named_parameters() if p.requires_grad}
    module.zero_grad(set_to_none=True)
    return loss.detach().float(), grads


def test_a_bf16_step_is_finite_and_close_to_fp32(tiny_configs):
    module = build(tiny_configs)
    fp32, _ = step(module)
    bf16, grads = step(module, bf16=True)
    assert torch.isfinite(bf16) and all(torch.isfinite(g).all() for g in grads.values())
    assert abs(bf16 - fp32) < 0.02 * fp32


def test_a_compiled_step_gives_the_eager_step(tiny_configs):
    eager = build(tiny_configs)
    compiled = build(tiny_configs, speed={"compile": True, "channels_last": True})
    compiled.apply_speed(bf16=False)
    loss_e, grads_e = step(eager)
    loss_c, grads_c = step(compiled)
    torch.testing.assert_close(loss_c, loss_e, atol=1e-4, rtol=1e-4)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-4, rtol=1e-3, msg=name)


def test_sampling_runs_on_cuda(tiny_configs):
    module = build(tiny_configs).eval()
    batch = make_batch(device="cuda")
    image = sample(module, batch, SamplingConfig(num_steps=3), torch.Generator().manual_seed(0))
    assert image.device.type == "cuda" and image.shape == batch["tgt"].shape and torch.isfinite(image).all()


@pytest.mark.parametrize("strategy", ["fsdp1", "fsdp2"])
def test_fsdp_runs_on_one_gpu(tiny_configs, shards, tmp_path, strategy):
    from pathlib import Path

    from leffa.cli import cli_main

    root = Path(__file__).resolve().parents[1] / "configs"
    extra = (["--trainer.strategy=lightning.pytorch.strategies.FSDPStrategy"] if strategy == "fsdp1"
             else ["--config", str(root / "strategy" / "fsdp2_cpu.yaml"),
                   "--trainer.strategy.init_args.data_parallel_size=1"])
    cli_main(["fit", "--config", str(root / "tiny_synthetic.yaml"), *extra, "--trainer.accelerator=cuda",
              "--trainer.devices=1", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
              "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
              "--trainer.callbacks=[]", f"--data.train_shards={shards}", f"--data.val_shards={shards}",
              "--data.num_workers=0"])
