"""Exactly-once evaluation split by sample (leffa/data/eval_split.py through LeffaDataModule):
every sample once over all ranks and workers, ranks balanced to within one sample and given the
same number of batches, whatever the number of shards."""

import itertools

import pytest

from data_prep.synthetic_shards import synthetic_shards
from leffa.data import LeffaDataModule
from leffa.data.eval_split import rank_plan
from leffa.errors import UserError


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory):
    """13 test samples in 3 shards of 5, 5, 3."""
    root = tmp_path_factory.mktemp("three")
    synthetic_shards(root, 13, 16, 12, split="test", shard_size=5)
    return str(root)


def _rank_batches(shards, monkeypatch, rank, world_size, num_workers, stage="validate", **kw):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    dm = LeffaDataModule(val_shards=shards, test_shards=shards, predict_shards=shards,
                         height=8, width=6, num_workers=num_workers, **kw)
    dm.setup(stage)
    loader = {"validate": dm.val_dataloader, "test": dm.test_dataloader, "predict": dm.predict_dataloader}[stage]
    return [list(batch["key"]) for batch in loader()]


@pytest.mark.parametrize("stage", ["validate", "predict"])
def test_four_ranks_two_workers_over_three_shards_see_every_sample_once(three_shards, monkeypatch, stage):
    per_rank = [_rank_batches(three_shards, monkeypatch, rank, 4, 2, stage, val_batch_size=2) for rank in range(4)]
    keys = [k for batches in per_rank for batch in batches for k in batch]
    assert sorted(keys) == [f"synthetic_test_paired_{i:06d}" for i in range(13)]  # union == all, no duplicates
    counts = [sum(len(b) for b in batches) for batches in per_rank]
    assert max(counts) - min(counts) <= 1
    assert len({len(batches) for batches in per_rank}) == 1  # same number of batches on every rank
    assert all(1 <= len(b) <= 2 for batches in per_rank for b in batches)


def test_rank_plan_is_exact_balanced_and_equal_in_batches():
    for total, world, workers, batch in itertools.product((4, 7, 13, 64), (1, 2, 3, 4), (1, 2, 3), (2, 3, 5)):
        counts = [total // 3, total // 3, total - 2 * (total // 3)]  # three shards
        seen, per_rank, batches = [], [], set()
        for rank in range(world):
            n_batches, n_samples = 0, 0
            for worker in range(workers):
                pieces, sizes = rank_plan(counts, rank, world, worker, workers, batch)
                samples = [(shard, i) for shard, start, stop in pieces for i in range(start, stop)]
                assert sum(sizes) == len(samples) and all(1 <= s <= batch for s in sizes)
                seen += samples
                n_batches += len(sizes)
                n_samples += len(samples)
            per_rank.append(n_samples)
            batches.add(n_batches)
        assert sorted(seen) == [(s, i) for s, c in enumerate(counts) for i in range(c)], (total, world, workers)
        assert max(per_rank) - min(per_rank) <= 1 and len(batches) == 1, (total, world, workers, batch)


def test_fewer_samples_than_ranks_is_one_user_error(three_shards, monkeypatch):
    with pytest.raises(UserError, match=r"val_shards.*13 samples.*16 ranks"):
        _rank_batches(three_shards, monkeypatch, 0, 16, 0)
