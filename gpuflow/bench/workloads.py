"""The benchmark's workloads: the network, its loss, the fixed host batch, the initial weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import gpuflow as gf

LEARNING_RATE = 1e-2
CHECK_STEPS = 3   # steps of every variant whose losses are compared before timing


@dataclass(frozen=True)
class Workload:
    """An MLP training step: layer sizes, hidden activation, loss, batch size."""

    name: str
    sizes: tuple[int, ...]
    activation: str     # 'sigmoid' or 'relu'
    loss: str           # 'mse' or 'ce' (softmax cross-entropy)
    batch: int
    gpu_only: bool = False

    def describe(self) -> str:
        loss = "MSE" if self.loss == "mse" else "softmax CE"
        return (f"{'-'.join(map(str, self.sizes))} {self.activation}, {loss}, "
                f"batch {self.batch}")


WORKLOADS = {w.name: w for w in (
    Workload("W1", (13, 10, 1), "sigmoid", "mse", 11),
    Workload("W2", (784, 128, 10), "relu", "ce", 64),
    Workload("W3", (784, 1024, 1024, 10), "relu", "ce", 512),
    Workload("W4", (4096, 4096, 4096, 10), "relu", "ce", 4096, gpu_only=True),
)}


def make_data(w: Workload, dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed host batch: X (batch, n_in) in `dtype`; y float (batch, 1) for MSE, int64
    class labels (batch,) for cross-entropy."""
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((w.batch, w.sizes[0])).astype(dtype)
    if w.loss == "mse":
        y = rng.standard_normal((w.batch, w.sizes[-1])).astype(dtype)
    else:
        y = rng.integers(0, w.sizes[-1], size=w.batch).astype(np.int64)
    return x, y


def build_model(w: Workload, seed: int) -> tuple[gf.Input, gf.Input, gf.Node, list[gf.Parameter]]:
    """gpuflow's own MLP (seeded Parameters) with its loss: X, y, loss, parameters."""
    X, y = gf.Input(name="X"), gf.Input(name="y")
    out, params = gf.mlp(X, w.sizes, activation=w.activation, seed=seed)
    loss = gf.MSE(y, out) if w.loss == "mse" else gf.SoftmaxCrossEntropy(y, out)
    return X, y, loss, list(params.values())


def initial_weights(w: Workload, seed: int) -> list[np.ndarray]:
    """[W1, b1, W2, b2, ...] as float64 host arrays, drawn by gpuflow's initialisers."""
    *_, params = build_model(w, seed)
    return [np.array(p.value, dtype=np.float64) for p in params]
