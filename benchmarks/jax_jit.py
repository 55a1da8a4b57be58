"""W1-W3 on JAX: eager `graph.step` + `optimizer.step` against the step compiled by
`gpuflow.compiled.compile_step` (one jax.jit function), beside the NumPy floor and NumPy Graph.

    python benchmarks/jax_jit.py [--workloads W1,W2,W3] [--repeats 7] [--steps N]

Blocks of steps alternate between the variants (so the machine's load falls on each alike);
prints the median time per step and the ratio to the NumPy floor. float32, plain SGD, the
same fixed batch every step, as `gpuflow bench` does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this gpuflow

import gpuflow as gf
from gpuflow.optim import SGD

import numpy as np

from gpuflow.bench.floor_numpy import NdarrayFloor
from gpuflow.bench.workloads import WORKLOADS, initial_weights
from gpuflow.compiled import compile_step
from gpuflow.timing import Steps, time_block


def graph_variant(w, spec, seed, data, compiled):
    """A step function for gpuflow's Graph + SGD on `spec`, compiled or eager."""
    X, y = gf.Input(name="X"), gf.Input(name="y")
    out, _ = gf.mlp(X, w.sizes, activation=w.activation, seed=seed)
    loss = gf.MSE(y, out) if w.loss == "mse" else gf.SoftmaxCrossEntropy(y, out)
    graph = gf.Graph(loss, device=spec, dtype="float32", inputs=[X, y])
    opt = SGD(graph, lr=1e-2)
    xb, yb = data
    if compiled:
        step = compile_step(graph, opt)
        return lambda: step(xb, yb), graph

    def eager():
        loss = graph.step(xb, yb)
        opt.step()
        return loss
    return eager, graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W1,W2,W3")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=0, help="steps per block (0: auto)")
    args = parser.parse_args()
    print(f"{'workload':9} | {'numpy floor':>12} | {'numpy Graph':>12} | {'jax eager':>12} | "
          f"{'jax jit':>12} | {'jit/floor':>9} | {'eager/floor':>11} | {'jit/eager':>9}")
    for name in args.workloads.split(","):
        w = WORKLOADS[name]
        data = w.make_data("float32", 0)
        floor = NdarrayFloor(w, np, "float32", initial_weights(w, 0), data)
        runs = {"numpy floor": (floor.step, None)}
        runs["numpy Graph"] = graph_variant(w, "cpu", 0, data, False)
        runs["jax eager"] = graph_variant(w, "jax:cpu", 0, data, False)
        runs["jax jit"] = graph_variant(w, "jax:cpu", 0, data, True)
        losses = {}
        for key, (step, graph) in runs.items():  # warm up: compile, first-step checks
            for _ in range(3):
                loss = step()
            losses[key] = float(graph.item(loss)) if graph is not None else float(loss)
        steps = args.steps or {"W1": 200, "W2": 50, "W3": 5}.get(name, 5)
        times: dict[str, list[float]] = {k: [] for k in runs}
        variants = {key: Steps(step, None if graph is None else graph.item)  # waits for JAX
                    for key, (step, graph) in runs.items()}
        for _ in range(args.repeats):
            for key, v in variants.items():
                times[key].append(time_block(v, steps)[0])
        med = {k: statistics.median(v) for k, v in times.items()}
        f = med["numpy floor"]
        print(f"{name:9} | " + " | ".join(f"{med[k] * 1e6:10.1f}us" for k in runs) +
              f" | {med['jax jit'] / f:8.2f}x | {med['jax eager'] / f:10.2f}x | "
              f"{med['jax jit'] / med['jax eager']:8.2f}x")
    print("median of", args.repeats, "interleaved blocks per variant; float32, SGD, fixed batch")


if __name__ == "__main__":
    main()
