"""The memory estimator of benchmarks/train_memory.py: its storage count against sums written here,
and its fake-tensor count of a training step against the real CPU allocator at small size."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from step_memory import LiveBytes, smallest_card, tracked_peak  # noqa: E402
from train_memory import make_batch, measure_in_child  # noqa: E402

TINY = ROOT / "configs/model/tiny_unet.yaml", ROOT / "configs/model/tiny_vae.yaml"


def test_live_bytes_and_the_allocator_agree_on_a_hand_counted_case():
    x = torch.zeros(100, 10)  # 4000 bytes, held before

    def fn():
        a = x.neg()  # +4000
        b = a.exp()  # +4000: the peak, 8000 above the start
        del a
        c = b.abs()  # back to 8000
        del b, c

    assert tracked_peak(fn, x) == {"start": 4000, "peak": 12000, "end": 4000}
    with LiveBytes() as tracker:
        y = torch.empty(3, 5, dtype=torch.bfloat16)
        assert tracker.current == 30
        del y
        assert tracker.current == 0 and tracker.peak == 30


@pytest.mark.slow  # over 10 s on 2 cores: make test runs it, make test-fast does not
@pytest.mark.parametrize("trainable, optimizer", [("all", "adamw"), ("attention", "adamw8bit"), ("lora", "adamw")])
def test_held_bytes_are_weights_gradients_optimizer_state_and_ema(trainable, optimizer):
    from train_memory import build

    module = build(*TINY, trainable, False)
    params = list(module.parameters())
    train = [p for p in params if p.requires_grad]
    n_all, n_train = sum(p.numel() for p in params), sum(p.numel() for p in train)
    if optimizer == "adamw":  # two float32 moments and a float32 step count per tensor
        state = 8 * n_train + 4 * len(train)
    else:  # two uint8 moments and a float32 scale per 256 values; float32 moments for tensors under 4096
        state = sum(2 * p.numel() + 8 * -(-p.numel() // 256) if p.numel() >= 4096 else 8 * p.numel() for p in train)
    batch = sum(t.numel() * 4 for t in make_batch(32, 32).values())
    r = measure_in_child(*TINY, trainable, optimizer, False, 32, 32)
    counted = r["counted"]
    assert counted["trainable_params"] == n_train
    assert counted["weights"] == 4 * n_all and counted["gradients"] == counted["ema"] == 4 * n_train
    # the tracked storages before the step: weights, gradients, state, EMA copy (+ its step count), batch
    assert r["peak"]["start"] == 4 * n_all + 4 * n_train + state + 4 * n_train + 8 + batch
    # after the step the gradients are gone; the reference bank keeps the last reference features (small)
    assert 0 <= r["peak"]["end"] - (r["peak"]["start"] - 4 * n_train) < 0.001 * r["peak"]["start"]
    assert r["peak"]["peak"] > r["peak"]["start"]
    if trainable != "all":
        assert n_train < n_all / 2


@pytest.mark.slow  # over 10 s on 2 cores: make test runs it, make test-fast does not
def test_fake_count_of_a_step_matches_the_cpu_allocator():
    """The script's own check (its own process: the profiler's threads stay there): the tiny model's
    step counted on fake tensors against the real CPU allocator's peak, per case."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_memory.py"), "--check-only", "--json",
                          "--check-height", "64", "--check-width", "48"],
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout
    rows = json.loads(out.strip().splitlines()[-1])
    assert len(rows) == 6
    for fake, real in zip(rows[::2], rows[1::2]):
        assert fake["value"] > 1.0 and real["vs"] == fake["variant"]
        # within 2%, plus a fixed 0.5 MiB (what checkpointing keeps outside tensors ops: RNG states)
        assert abs(real["value"] - fake["value"]) <= 0.02 * fake["value"] + 0.5, (fake, real)


def test_smallest_card_leaves_the_margin():
    gib = 1024 ** 3
    assert smallest_card(9 * gib) == 12  # 9 * 1.1 + 1 = 10.9
    assert smallest_card(10.1 * gib) == 16  # 12.11
    assert smallest_card(14 * gib) == 24  # 16.4
    assert smallest_card(80 * gib) is None
