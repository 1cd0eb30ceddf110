"""A competing load for measuring how a command degrades on a shared machine: one torch process
doing matrix products on ``--threads`` threads until it is stopped (or ``--seconds`` pass).

    python benchmarks/competing_load.py --threads 2 & load=$!
    time make demo; kill $load

With the thread counts this project sets (one torch thread in tests, the demo and the replication's
workers; see the README's "Threads"), a command beside this load should take about twice its quiet
time on two cores (its fair share), not many times that.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3600.0)
    p.add_argument("--size", type=int, default=512)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    a = torch.randn(args.size, args.size)
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        a = torch.tanh(a @ a / args.size**0.5)


if __name__ == "__main__":
    main()
