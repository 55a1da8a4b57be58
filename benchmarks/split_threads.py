"""`gf.set_num_threads`: a gpuflow Graph step on the cpu device with its large NumPy operations
on one thread against the same step split over n threads, for each workload.

    python benchmarks/split_threads.py [--workloads W1,W2,W3,W5,W6] [--threads N] [--blocks 9]

One graph per workload; blocks of steps alternate between 1 and N threads in one process (so
the machine's load falls on each alike), and only gpuflow runs: `gpuflow bench` interleaves
torch and the NumPy floor, whose own threads keep spinning after each call and take the cores
the split needs. Prints the median time per step and the ratio. float32, plain SGD, the same
fixed batch every step, as `gpuflow bench` does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this gpuflow

import gpuflow as gf  # noqa: E402
from gpuflow.bench.workloads import WORKLOADS  # noqa: E402
from gpuflow.timing import Steps, time_block  # noqa: E402


def measure(name: str, threads: int, blocks: int, min_time: float) -> tuple[float, float]:
    """(median seconds per step on 1 thread, on `threads`)."""
    w = WORKLOADS[name]
    X, y, loss, params = w.model(0)
    xs, ys = w.make_data("float32", 0)
    graph = gf.Graph(loss, device="cpu", dtype="float32")
    opt = gf.optim.SGD(params, lr=0.01)
    feed = {X: xs, y: ys}

    def step() -> None:
        graph.step(feed)
        opt.step()

    def switch(n: int) -> None:
        gf.set_num_threads(n)
        step()  # the first step after a switch pays for it

    variants = {n: Steps(step, prepare=lambda n=n: switch(n)) for n in (1, threads)}
    for _ in range(3):
        step()
    steps = max(1, int(min_time / max(time_block(variants[1], 1)[0], 1e-6)))
    times: dict[int, list[float]] = {1: [], threads: []}
    for _ in range(blocks):
        for n in (1, threads):
            times[n].append(time_block(variants[n], steps)[0])
    gf.set_num_threads(1)
    return statistics.median(times[1]), statistics.median(times[threads])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W1,W2,W3,W5,W6")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0))
                        if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    parser.add_argument("--blocks", type=int, default=9)
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per block")
    args = parser.parse_args()
    print(f"gpuflow Graph step on cpu, float32, medians of {args.blocks} alternating blocks; "
          f"1 thread vs {args.threads}")
    print(f"{'workload':<10}{'1 thread':>12}{f'{args.threads} threads':>14}{'ratio':>8}")
    for name in args.workloads.split(","):
        one, many = measure(name.strip().upper(), args.threads, args.blocks, args.min_time)
        print(f"{name:<10}{one * 1e3:>9.2f} ms{many * 1e3:>11.2f} ms{many / one:>7.2f}x")


if __name__ == "__main__":
    main()
