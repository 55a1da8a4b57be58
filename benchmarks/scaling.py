"""Weak scaling of data-parallel training: W3 (784-1024-1024-10 ReLU, softmax cross-entropy,
float32, batch 512 per rank) on 1 and 2 ranks, one BLAS thread per rank.

    python benchmarks/scaling.py [--ranks 1,2] [--steps 20] [--device cpu]

Run plainly, it starts itself under `mpiexec -n k` for each k and prints one row per run:
steps/s, and the time per step spent in allreduce_gradients with one flattened buffer and
with one collective per parameter.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import gpuflow as gf  # noqa: E402
from gpuflow.optim import SGD  # noqa: E402
from gpuflow.timing import Steps, clock, time_block  # noqa: E402

SIZES, BATCH = [784, 1024, 1024, 10], 512


def measure(ctx, device: str, steps: int, flatten: bool) -> dict[str, float]:
    """Train `steps` steps (after 3 warm-up steps); seconds per step, and in the allreduce."""
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = gf.mlp(X, SIZES, seed=0)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=ctx.device_spec(device),
                     dtype="float32", inputs=[X, y])
    ctx.broadcast_parameters(graph)
    optimizer = SGD(graph, lr=0.01)
    rng = np.random.default_rng(ctx.rank)
    xb = graph.device.put(rng.standard_normal((BATCH, SIZES[0])), graph.dtype)
    yb = graph.device.put(rng.integers(0, SIZES[-1], BATCH))
    ctx.flatten = flatten
    in_allreduce = [0.0]

    def step() -> None:
        graph.step(xb, yb)
        graph.device.synchronize()
        t0 = clock()
        ctx.allreduce_gradients(graph)
        graph.device.synchronize()
        in_allreduce[0] += clock() - t0
        optimizer.step()

    v = Steps(step, lambda _: graph.device.synchronize(), prepare=ctx.barrier)
    for _ in range(3):
        v.step()
    in_allreduce[0] = 0.0
    per_step, _ = time_block(v, steps)  # the ranks start together (barrier), end synchronised
    return {"steps_per_s": 1 / per_step, "allreduce_ms": 1e3 * in_allreduce[0] / steps}


def worker(args: argparse.Namespace) -> None:
    ctx = gf.distributed.init()
    row = {"ranks": ctx.size, "device": ctx.device_spec(args.device)}
    for flatten in (True, False):
        key = "flat" if flatten else "each"
        result = measure(ctx, args.device, args.steps, flatten)
        # The slowest rank sets the pace: report its numbers.
        if ctx.comm is not None:
            result = {k: ctx.comm.allreduce(v, op=_op(k)) for k, v in result.items()}
        row.update({f"{key}_{k}": round(v, 3) for k, v in result.items()})
    ctx.print(json.dumps(row), flush=True)


def _op(key: str):
    from mpi4py import MPI
    return MPI.MIN if key == "steps_per_s" else MPI.MAX


def driver(args: argparse.Namespace) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = mpiexec if os.access(mpiexec, os.X_OK) else "mpiexec"
    print(f"W3 {SIZES}, batch {BATCH} per rank, float32, {args.steps} steps, device "
          f"{args.device}, 1 BLAS thread per rank")
    print(f"{'ranks':>5} {'samples/s':>10} | {'flat steps/s':>12} {'allreduce ms':>12} | "
          f"{'each steps/s':>12} {'allreduce ms':>12}")
    for ranks in [int(r) for r in args.ranks.split(",")]:
        out = subprocess.run([mpiexec, "-n", str(ranks), sys.executable, __file__, "--worker",
                              "--steps", str(args.steps), "--device", args.device],
                             env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            sys.exit(f"{ranks} ranks failed:\n{out.stdout}{out.stderr}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{ranks:>5} {row['flat_steps_per_s'] * BATCH * ranks:>10.0f} | "
              f"{row['flat_steps_per_s']:>12.2f} {row['flat_allreduce_ms']:>12.2f} | "
              f"{row['each_steps_per_s']:>12.2f} {row['each_allreduce_ms']:>12.2f}")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts (1,2)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (20)")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (cuda:<local rank>)")
    parser.add_argument("--json", help="append one JSON row per run to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
