"""The two webdataset pipelines: an endless resampled training stream and an exactly-once
evaluation pass. Both run, inside each DataLoader worker:

    shards -> tar samples -> [train: mix sources, shuffle buffer] -> decode (skip + count corrupt)
           -> resize per key -> [train: random flip] -> to batch (float tensors)

Batching happens in the pipeline (so ``skipped`` can travel with the batch); the DataLoader
then takes ``batch_size=None``.
"""

import random
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from itertools import chain, islice

import webdataset as wds
from torch.utils.data import IterableDataset

from leffa.data.batch import Collate
from leffa.data.decode import decode_sample
from leffa.data.distributed import split_by_rank_then_worker, stream_seed, worker_info
from leffa.data.eval_split import rank_plan
from leffa.data.latents import decode_with_moments
from leffa.data.skips import SkipCounter, skip_corrupt
from leffa.data.tar_samples import read_samples
from leffa.data.transforms import random_hflip, resize_sample


class WeightedMix(IterableDataset):
    """Endless stream that draws each next sample from source i with probability w_i / sum(w).

    Written here rather than ``webdataset.RandomMix`` because that one draws from the global
    ``random`` module; this one uses a per-rank, per-worker seeded RNG.
    """

    def __init__(
        self, sources: Sequence[Iterable[dict]], weights: Sequence[float], seed: int, rank: int, start_step: int
    ):
        self.sources, self.weights = list(sources), list(weights)
        self.seed, self.rank, self.start_step = seed, rank, start_step

    def __iter__(self) -> Iterator[dict]:
        rng = random.Random(f"mix-{stream_seed(self.seed, self.rank, self.start_step)}")
        live = [i for i, w in enumerate(self.weights) if w > 0]
        iters = {i: iter(self.sources[i]) for i in live}
        while True:
            i = rng.choices(live, weights=[self.weights[j] for j in live])[0]
            try:
                yield next(iters[i])
            except StopIteration:  # a resampled source only ends if it had nothing readable
                return


def _shuffle(samples: Iterable[dict], bufsize: int, seed: int, rank: int, start_step: int) -> Iterator[dict]:
    """``webdataset.shuffle`` with a per-worker seeded RNG (its default seeds from pid and time)."""
    rng = random.Random(f"shuffle-{stream_seed(seed, rank, start_step)}")
    return wds.shuffle(bufsize, initial=min(100, bufsize), rng=rng)(samples)


def _resampled_source(shards: list[str], index: int, seed: int, rank: int, start_step: int, counter: SkipCounter):
    """Tar samples from shards drawn with replacement, forever; distinct stream per rank/worker."""
    return wds.DataPipeline(
        wds.ResampledShards(
            shards,
            seed=index,  # distinct stream per source
            worker_seed=partial(stream_seed, seed, rank, start_step),
            deterministic=True,
        ),
        wds.tarfile_to_samples(handler=counter.handler),
    )


def _decode_resize(height: int, width: int, counter: SkipCounter, latents: tuple | None = None) -> list:
    """The shared middle stages: decode (skipping corrupt samples), resize per key. ``latents``:
    ``(images, shape)`` of cached latents to read too (``leffa.data.latents``), or None."""
    if latents:
        decode = partial(decode_with_moments, draft_size=(height, width), images=latents[0], shape=latents[1])
    else:
        decode = partial(decode_sample, draft_size=(height, width))
    return [
        partial(skip_corrupt, fn=decode, counter=counter),
        wds.map(partial(resize_sample, height=height, width=width)),
    ]


def train_pipeline(
    sources: list[list[str]],
    weights: Sequence[float] | None,
    *,
    height: int,
    width: int,
    batch_size: int,
    shuffle_buffer: int,
    hflip: bool,
    seed: int,
    rank: int,
    start_step: int = 0,
    latents: tuple | None = None,
) -> wds.DataPipeline:
    """Endless stream of full training batches for one rank (each worker runs a copy).

    Every rank and worker resamples shards independently, with replacement, from a seed of
    its own (``distributed.stream_seed``), so no splitting of the shard list is needed and an
    epoch has no meaning: ``Trainer(max_steps=...)`` ends training.

    Args:
        sources: one shard list per source.
        weights: mixing weight per source; None pools all shards into one source (so each
            source contributes in proportion to its shard count).
        latents: ``(images, shape)`` of the cached latents to read into ``moments``, or None.
    """
    counter = SkipCounter()
    if weights is None:
        sources, weights = [[s for shards in sources for s in shards]], [1.0]
    streams = [_resampled_source(shards, i, seed, rank, start_step, counter) for i, shards in enumerate(sources)]
    stages = [WeightedMix(streams, weights, seed, rank, start_step)]
    if shuffle_buffer > 1:
        # Shuffle the still-encoded samples: ~30x smaller than decoded ones at 1024x768.
        stages.append(partial(_shuffle, bufsize=shuffle_buffer, seed=seed, rank=rank, start_step=start_step))
    stages += _decode_resize(height, width, counter, latents)
    if hflip:
        stages.append(partial(random_hflip, p=0.5, seed=seed, rank=rank, start_step=start_step))
    stages.append(wds.batched(batch_size, collation_fn=Collate(counter), partial=False))
    return wds.DataPipeline(*stages)


class ExactlyOnce(IterableDataset):
    """One pass over local ``shards`` split by sample (``eval_split``): no resampling, shuffle or flip.

    Each (rank, worker) reads its planned sample range by seeking in the tars and makes its
    planned batches, so every sample is read exactly once over all ranks and workers and every
    rank yields the same number of batches. A corrupt sample makes its batch one shorter; a
    batch whose samples are all corrupt is dropped. A batch is collated once the worker has
    decoded the next one (or reached its end), so ``skipped`` counts every skip of the worker,
    a batch's own and those up to the next batch with a readable sample.
    """

    def __init__(self, shards: list[str], counts: list[int], *, height: int, width: int, batch_size: int,
                 rank: int, world_size: int, latents: tuple | None = None):
        self.shards, self.counts, self.latents = shards, counts, latents
        self.height, self.width, self.batch_size = height, width, batch_size
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = worker_info()
        pieces, sizes = rank_plan(self.counts, self.rank, self.world_size, worker, num_workers, self.batch_size)
        counter = SkipCounter()
        collate = Collate(counter)
        raw = chain.from_iterable(read_samples(self.shards[i], start, stop, counter.handler) for i, start, stop in pieces)
        decode_resize = _decode_resize(self.height, self.width, counter, self.latents)
        held = None  # one batch held back, so skips after the last good sample still reach a batch
        for size in sizes:
            samples = islice(raw, size)
            for stage in decode_resize:
                samples = stage(samples)
            samples = list(samples)
            if samples:
                if held:
                    yield collate(held)
                held = samples
        if held:
            yield collate(held)


def eval_pipeline(
    shards: list[str], *, height: int, width: int, batch_size: int, rank: int, world_size: int,
    latents: tuple | None = None,
) -> wds.DataPipeline:
    """One pass over streamed ``shards`` (``pipe:`` or URLs, which cannot be counted beforehand).

    Shards are split by rank, then by worker (``split_by_rank_then_worker``), so every sample
    is seen exactly once across all ranks and workers, but ranks may get different numbers of
    batches. Skips that happen after a worker's last batch are logged but reach no batch.
    """
    counter = SkipCounter()
    return wds.DataPipeline(
        wds.SimpleShardList(shards),
        partial(split_by_rank_then_worker, rank=rank, world_size=world_size),
        wds.tarfile_to_samples(handler=counter.handler),
        *_decode_resize(height, width, counter, latents),
        wds.batched(batch_size, collation_fn=Collate(counter), partial=True),
    )
