"""Training runs for tests/test_distributed.py, started as `mpiexec -n 2 python <this file> ...`
(or plain `python`, one rank). Not a test module itself: pytest does not collect it.

    train OUT                 SGD and Adam, global batches 7 and 8, flattened and per-parameter
                              allreduce, one epoch (5 steps) each; every rank writes OUT/rank<r>.npz
    phase1 CKPT               Adam, epoch 0 (5 steps of 7); rank 0 alone writes CKPT
    phase2 CKPT OUT           resume CKPT, epoch 1; every rank writes OUT/rank<r>.npz
    die / raise               rank 1 dies (os._exit(1)) / raises at step 2 of a long run
    accumulate OUT            SGD and Adam, global batches of 8 (5 steps), each rank's slice in 3
                              micro-batches (Graph.accumulate_step), clipped to norm 0.5; every
                              rank writes OUT/rank<r>.npz with the all-reduces it made
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gpuflow as gf  # noqa: E402
import gpuflow.checkpoint  # noqa: E402
from gpuflow.accumulate import split_batch  # noqa: E402
from gpuflow.optim import SGD, Adam, clip_grad_norm  # noqa: E402

N_SAMPLES, N_IN, N_CLASSES, INIT_SEED, DATA_SEED = 35, 6, 3, 100, 1
OPTIMIZERS = {"sgd": lambda g: SGD(g, lr=0.1, momentum=0.9), "adam": lambda g: Adam(g, lr=0.01)}


def data() -> tuple[np.ndarray, np.ndarray]:
    """A small seeded classification set, the same on every rank."""
    rng = np.random.default_rng(7)
    return rng.standard_normal((N_SAMPLES, N_IN)), rng.integers(0, N_CLASSES, N_SAMPLES)


def model(seed: int = INIT_SEED) -> gf.Graph:
    """A float64 6-8-3 MLP with softmax cross-entropy on the CPU."""
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = gf.mlp(X, [N_IN, 8, N_CLASSES], seed=seed)
    return gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device="cpu", dtype="float64",
                    inputs=[X, y])


def train(graph: gf.Graph, optimizer, batches, epochs: int, ctx=None) -> None:
    """`epochs` whole epochs over `batches` (Batches moves to its next epoch only once an epoch
    is used up); gradients averaged across ranks when ctx is given."""
    for _ in range(epochs):
        for xb, yb in batches:
            graph.step(xb, yb)
            if ctx is not None:
                ctx.allreduce_gradients(graph)
            optimizer.step()


def parameters(graph: gf.Graph) -> dict[str, np.ndarray]:
    return {p.name: np.array(graph.device.to_host(p.value)) for p in graph.parameters}


def save(path: str, graph: gf.Graph, optimizer, batches) -> None:
    """gpuflow's checkpoint, with the batch order in its extra state."""
    state = {f"batches.{k}": v for k, v in batches.state_dict().items()}
    gpuflow.checkpoint.save(path, graph, optimizer, state=state)


def load(path: str, graph: gf.Graph, optimizer, batches) -> None:
    state = gpuflow.checkpoint.load(path, graph, optimizer)["state"]
    batches.load_state_dict({k[len("batches."):]: v for k, v in state.items()})


def main(argv: list[str]) -> None:
    ctx = gf.distributed.init()
    X, y = data()
    mode = argv[0]
    if mode == "train":
        out: dict[str, np.ndarray] = {}
        for name, make in OPTIMIZERS.items():
            for batch_size in (7, 8):
                for flatten in (True, False):
                    graph = model(seed=INIT_SEED + ctx.rank)  # differs until the broadcast
                    ctx.broadcast_parameters(graph)
                    ctx.flatten = flatten
                    batches = ctx.batches(X, y, batch_size, seed=DATA_SEED)
                    train(graph, make(graph), batches, 1, ctx)  # 5 steps
                    for k, v in parameters(graph).items():
                        out[f"{name}-{batch_size}-{'flat' if flatten else 'each'}/{k}"] = v
        out["size"] = np.asarray(ctx.size)
        np.savez(os.path.join(argv[1], f"rank{ctx.rank}.npz"), **out)
    elif mode in ("phase1", "phase2"):
        graph = model(seed=INIT_SEED + ctx.rank)
        optimizer = OPTIMIZERS["adam"](graph)
        batches = ctx.batches(X, y, 7, seed=DATA_SEED)
        if mode == "phase2":
            load(argv[1], graph, optimizer, batches)  # every rank reads the same file
        else:
            ctx.broadcast_parameters(graph)
        train(graph, optimizer, batches, 1, ctx)
        if mode == "phase1":
            if ctx.is_root:
                save(argv[1], graph, optimizer, batches)
        else:
            np.savez(os.path.join(argv[2], f"rank{ctx.rank}.npz"), size=np.asarray(ctx.size),
                     **parameters(graph))
    elif mode == "accumulate":
        out = {"size": np.asarray(ctx.size)}
        for name, make in OPTIMIZERS.items():
            graph = model(seed=INIT_SEED + ctx.rank)
            ctx.broadcast_parameters(graph)
            comm = ctx.communicator(graph.device)
            made = comm.allreduce_sum
            calls = []
            comm.allreduce_sum = lambda *a, **k: calls.append(1) or made(*a, **k)
            optimizer, steps = make(graph), 0
            for xb, yb in ctx.batches(X, y, 8, seed=DATA_SEED):
                graph.accumulate_step(split_batch(3, xb, yb))
                ctx.allreduce_gradients(graph)
                clip_grad_norm(graph, 0.5)
                optimizer.step()
                steps += 1
            comm.allreduce_sum = made
            out.update({f"{name}/{k}": v for k, v in parameters(graph).items()})
            out[f"{name}:allreduces"], out[f"{name}:steps"] = np.asarray(len(calls)), steps
        np.savez(os.path.join(argv[1], f"rank{ctx.rank}.npz"), **out)
    elif mode in ("die", "raise"):
        graph = model()
        optimizer = OPTIMIZERS["sgd"](graph)
        ctx.broadcast_parameters(graph)
        for step in range(10_000):
            if step == 2 and ctx.rank == 1:
                if mode == "die":
                    os._exit(1)
                raise RuntimeError("rank 1 fails on purpose")
            xb, yb = ctx.shard(X, y)
            graph.step(xb, yb)
            ctx.allreduce_gradients(graph)
            optimizer.step()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    ctx.barrier()


if __name__ == "__main__":
    main(sys.argv[1:])
