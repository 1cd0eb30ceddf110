"""Training dataloader throughput against what one GPU consumes.

Writes shards of native 1024x768 samples of data_prep's synthetic set (``data_prep.synthetic_shards``) into a
temporary folder, then times ``LeffaDataModule.train_dataloader()`` (resampled shards, shuffle
buffer, decode, resize, batch; no flip, which data_prep's sided pose images refuse) at each
output resolution and worker count: a
warm-up (worker start, shuffle buffer fill), then windows of N timed batches. The loader
yields uint8 batches; the float conversion runs on the GPU (``on_after_batch_transfer``) and
is not timed here.

GPU reference: one training sample at 1024x768 costs about 25 TFLOP (forward + backward of
both UNets); an H100 at 40% MFU (~0.4 x 989 TFLOP/s bf16 dense) then trains ~16 samples/s.
At 512x384 the cost scales with the pixel count, so ~64 samples/s.

    python benchmarks/loader_throughput.py --samples 64 --batches 20

The ratio column is the loader's rate over one GPU's consumption: above 1, the loader keeps up.
"""

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import torch
from table import add_output_flag, compared, emit, row

from data_prep.synthetic_shards import synthetic_sample, write_samples
from leffa.data import LeffaDataModule

GPU_SAMPLES_PER_S_1024 = 0.4 * 989 / 25  # ~16 samples/s per GPU at 1024x768, 40% MFU
NATIVE = (1024, 768)


def gpu_rate(height: int, width: int) -> float:
    """Samples/s one GPU trains at (height, width), scaled from 1024x768 by pixel count."""
    return GPU_SAMPLES_PER_S_1024 * NATIVE[0] * NATIVE[1] / (height * width)


def write_shards(folder: str, samples: int, flow: bool) -> None:
    def sample(index: int) -> dict:
        raw = synthetic_sample(index, *NATIVE)
        if not flow:
            del raw["flow.npy"]
        return raw

    write_samples(folder, "train", (sample(i) for i in range(samples)), shard_size=16)


def samples_per_second(folder: str, height: int, width: int, workers: int, args) -> list[float]:
    """Samples/s of ``args.repeats`` consecutive windows of ``args.batches`` batches, after a warm-up."""
    dm = LeffaDataModule(
        train_shards=folder,
        height=height,
        width=width,
        batch_size=args.batch_size,
        num_workers=workers,
        shuffle_buffer=args.shuffle_buffer,
    )
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    for _ in range(args.warmup):
        next(batches)
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.batches):
            next(batches)
        rates.append(args.batches * args.batch_size / (time.perf_counter() - start))
    del batches  # stops the workers
    return rates


def rows(args) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_shards(folder, args.samples, args.flow)
        tars = [f for f in os.listdir(folder) if f.endswith(".tar")]
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in tars)
        print(f"loader: wrote {args.samples} samples at {NATIVE[0]}x{NATIVE[1]} in {len(tars)} shards, "
              f"{size / args.samples / 1e3:.0f} kB/sample, {time.perf_counter() - start:.1f} s", file=sys.stderr)
        out = []
        for height, width in ((512, 384), (1024, 768)):
            need = gpu_rate(height, width)
            setting = f"{height}x{width}, batch {args.batch_size}{', flow' if args.flow else ''}, {os.cpu_count()} cores"
            group = [row("loader", setting, "one GPU trains (40% MFU)", need, "samples/s")]
            for workers in args.workers:
                rates = samples_per_second(folder, height, width, workers, args)
                rate = statistics.median(rates)
                print(f"loader: {height}x{width}, {workers} workers: {rate:.1f} samples/s "
                      f"(windows {min(rates):.0f}-{max(rates):.0f}); one GPU needs {need:.1f}, so "
                      f"{math.ceil(need / (rate / max(workers, 1)))} workers per GPU", file=sys.stderr)
                label = "no workers (main process)" if workers == 0 else f"{workers} worker{'s' * (workers > 1)}"
                group.append(row("loader", setting, label, rate, "samples/s"))
            out += compared(group, group[0]["variant"])
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="synthetic 1024x768 samples to write")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per configuration (median shown)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shuffle-buffer", type=int, default=100)
    parser.add_argument("--flow", action="store_true", help="include a 1024x768x2 float16 flow per sample")
    add_output_flag(parser)
    args = parser.parse_args(argv)
    # DataLoader workers run with one torch thread; give num_workers=0 the same so the per-worker
    # figures compare. (Two intra-op threads in the main process of a 2-core machine made the
    # figures erratic, from 16 to 72 samples/s within one run.)
    torch.set_num_threads(1)
    emit(rows(args), args.json)


if __name__ == "__main__":
    main()
