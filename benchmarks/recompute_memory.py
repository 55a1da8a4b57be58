"""Activation recomputation (`gf.recompute`): a training step's peak memory and time, normal
graph against the same model with every block recomputed.

    python benchmarks/recompute_memory.py [--blocks 8] [--rows 2048] [--width 256] [--rounds 5]

The model: a deep MLP, `--blocks` blocks of Linear -> BatchNorm -> ReLU -> Dropout -> Linear ->
Tanh (width `--width`), on `--rows` rows: 2048 rows are the tokens of a GPT batch of 16 x
context 128. Memory: tracemalloc's peak over building the Graph, an SGD-with-momentum optimizer
and two steps, on `cpu` (NumPy reports its arrays to tracemalloc). Time: float32 steps in
alternating blocks of both graphs in one process (the machine's load falls on each alike),
median per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this gpuflow

import gpuflow as gf  # noqa: E402
from gpuflow.layers import batchnorm, dense, host_rng  # noqa: E402
from gpuflow.timing import Steps, time_block  # noqa: E402


def block(h: gf.Node, width: int, i: int) -> tuple[gf.Node, dict]:
    rng = host_rng(100 + i)
    a, p = dense(h, width, width, name=f"b{i}.fc1", rng=rng)
    a, q = batchnorm(a, width, name=f"b{i}.bn")
    a = gf.Dropout(gf.ReLU(a, name=f"b{i}.relu"), 0.1, seed=i, name=f"b{i}.drop")
    a, r = dense(a, width, width, name=f"b{i}.fc2", rng=rng, activation="tanh")
    return a, {**p, **q, **r}


def build(recompute: bool, blocks: int, width: int, n_in: int = 32, classes: int = 10):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    h, _ = dense(X, n_in, width, name="stem", rng=host_rng(0), activation="relu")
    for i in range(blocks):
        h, _ = gf.recompute(block, h, width, i) if recompute else block(h, width, i)
    logits, _ = dense(h, width, classes, name="head", rng=host_rng(1))
    loss = gf.SoftmaxCrossEntropy(y, logits)
    graph = gf.Graph(loss, device="cpu", inputs=[X, y])
    return graph, gf.optim.SGD(graph, lr=0.01, momentum=0.9)


def _variant(graph, opt, xb, yb) -> Steps:
    """A training step of `graph` for gpuflow.timing; a block ends by reading the loss."""
    def step() -> None:
        graph.step(xb, yb)
        opt.step()
    return Steps(step, lambda _: graph.item(graph.loss.value))  # waits for the device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((args.rows, 32)).astype(np.float32)
    yb = rng.integers(0, 10, args.rows)
    peaks, graphs = {}, {}
    for recompute in (False, True):
        tracemalloc.start()
        graph, opt = build(recompute, args.blocks, args.width)
        for _ in range(2):
            graph.step(xb, yb)
            opt.step()
        peaks[recompute] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        graphs[recompute] = graph, opt
    times: dict[bool, list[float]] = {False: [], True: []}
    variants = {key: _variant(graph, opt, xb, yb) for key, (graph, opt) in graphs.items()}
    for _ in range(args.rounds):
        for recompute in (False, True):
            times[recompute].append(time_block(variants[recompute], 3)[0])
    normal, recomputed = (statistics.median(times[k]) for k in (False, True))
    print(f"{args.blocks} blocks, {args.rows} rows x width {args.width}, float32, cpu")
    print(f"peak memory: normal {peaks[False] / 2**20:.1f} MiB, recomputed "
          f"{peaks[True] / 2**20:.1f} MiB ({peaks[True] / peaks[False]:.2f} of normal)")
    print(f"step time: normal {normal * 1e3:.1f} ms, recomputed {recomputed * 1e3:.1f} ms "
          f"({recomputed / normal:.2f}x)")


if __name__ == "__main__":
    main()
