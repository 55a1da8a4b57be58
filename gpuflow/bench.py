"""Benchmark one training step (forward + backward + SGD update) against a hand-written floor
and PyTorch eager.

For each workload, four variants train the same network from the same seeded weights on the
same fixed host batch:

  floor     the same maths hand-written in the device's own library (NumPy in place with
            out= and preallocated buffers for 'cpu'; torch ops without autograd for torch:*;
            CuPy with out= for cuda; plain namespace ops for array_api_strict). It computes
            nothing no one needs: no gradient for the data, a fused softmax-CE gradient.
  graph     gpuflow's Graph + gpuflow.optim.SGD: `graph.step(xb, yb); opt.step()`.
  miniflow  gpuflow's unchanged MiniFlow loop: Inputs for weights and data,
            `forward_and_backward(graph); sgd_update(trainables, lr)`; it still computes the
            gradient of the data Inputs.
  torch     PyTorch eager (nn.Linear + torch.optim.SGD + loss.backward()) on the matching
            torch device, when torch is installed.

Every variant uploads the host batch each step (Input.value / torch.from_numpy /
cupy.asarray / xp.asarray), as a training loop would; on the CPU that upload is free.
Variants are timed in interleaved rounds (blocks of steps, synchronised at the end of each
block) so machine noise hits all of them alike; the table shows the median per-step time.

    python -m gpuflow.bench --device cpu
    python -m gpuflow.bench --device cuda --workloads W3,W4 --json out.json

Libraries other than NumPy are imported inside functions, only when their device is used.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

import gpuflow as gf
from gpuflow.backends import LEDGER, Device
from gpuflow.cli import CommandParser, report_error
from gpuflow.errors import DeviceError
from gpuflow.optim import SGD


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
VARIANTS = ("floor", "graph", "miniflow", "torch")
TITLES = {"floor": "floor", "graph": "gpuflow Graph", "miniflow": "gpuflow MiniFlow",
          "torch": "torch eager"}
LEARNING_RATE = 1e-2
CHECK_STEPS = 3


# -- data and weights -----------------------------------------------------------------------------
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


def _mlp(w: Workload, seed: int) -> tuple[gf.Input, gf.Input, gf.Node, list[gf.Parameter]]:
    """gpuflow's own MLP (seeded Parameters) with its loss: X, y, loss, parameters."""
    X, y = gf.Input(name="X"), gf.Input(name="y")
    out, params = gf.mlp(X, w.sizes, activation=w.activation, seed=seed)
    loss = gf.MSE(y, out) if w.loss == "mse" else gf.SoftmaxCrossEntropy(y, out)
    return X, y, loss, list(params.values())


def initial_weights(w: Workload, seed: int) -> list[np.ndarray]:
    """[W1, b1, W2, b2, ...] as float64 host arrays, drawn by gpuflow's initialisers."""
    *_, params = _mlp(w, seed)
    return [np.array(p.value, dtype=np.float64) for p in params]


# -- variants -------------------------------------------------------------------------------------
class Variant:
    """One way of running a training step. `step()` returns the loss (on the device)."""

    ledger = False   # whether the step goes through gpuflow's transfer ledger

    def step(self) -> Any:
        raise NotImplementedError

    def read(self, loss: Any) -> float:
        """The loss as a Python float (synchronises)."""
        raise NotImplementedError

    def sync(self) -> None:
        """Wait for queued device work (no-op on CPUs)."""


class GraphVariant(Variant):
    """(a) gpuflow's Graph + SGD optimizer."""

    ledger = True

    def __init__(self, w: Workload, device: Device, dtype: str, seed: int,
                 data: tuple[np.ndarray, np.ndarray]) -> None:
        X, y, loss, _ = _mlp(w, seed)
        self.graph = gf.Graph(loss, device=device, dtype=dtype, inputs=[X, y])
        self.opt = SGD(self.graph, lr=LEARNING_RATE)
        self.xb, self.yb = data
        self.device = device

    def step(self) -> Any:
        loss = self.graph.step(self.xb, self.yb)
        self.opt.step()
        return loss

    def read(self, loss: Any) -> float:
        return self.graph.item(loss)

    def sync(self) -> None:
        self.device.synchronize(what="bench block end")


class MiniFlowVariant(Variant):
    """(b) the MiniFlow loop: every weight an Input, every gradient computed."""

    ledger = True

    def __init__(self, w: Workload, device: Device, dtype: str,
                 weights: Sequence[np.ndarray], data: tuple[np.ndarray, np.ndarray]) -> None:
        act = {"relu": gf.ReLU, "sigmoid": gf.Sigmoid}[w.activation]
        self.X, self.y = gf.Input(name="X"), gf.Input(name="y")
        feed = {self.X: data[0], self.y: data[1]}
        self.trainables = []
        h: gf.Node = self.X
        n_layers = len(w.sizes) - 1
        for i in range(n_layers):
            W, b = gf.Input(name=f"W{i + 1}"), gf.Input(name=f"b{i + 1}")
            feed[W], feed[b] = weights[2 * i], weights[2 * i + 1]
            self.trainables += [W, b]
            h = gf.Linear(h, W, b)
            if i < n_layers - 1:
                h = act(h)
        self.loss = gf.MSE(self.y, h) if w.loss == "mse" else gf.SoftmaxCrossEntropy(self.y, h)
        self.graph = gf.topological_sort(feed, device=device, dtype=dtype)
        self.xb, self.yb = data
        self.device = device

    def step(self) -> Any:
        self.X.value = self.xb
        self.y.value = self.yb
        gf.forward_and_backward(self.graph)
        gf.sgd_update(self.trainables, LEARNING_RATE)
        return self.loss.value

    def read(self, loss: Any) -> float:
        with LEDGER.allowed():
            return self.device.item(loss, what="loss read")

    def sync(self) -> None:
        self.device.synchronize(what="bench block end")


class NdarrayFloor(Variant):
    """(c) for NumPy and CuPy: in place, preallocated buffers, out= everywhere."""

    def __init__(self, w: Workload, xp: Any, dtype: str, weights: Sequence[np.ndarray],
                 data: tuple[np.ndarray, np.ndarray], sync: Callable[[], None] | None = None,
                 upload: Callable[[np.ndarray], Any] | None = None) -> None:
        self.xp, self.w, self._sync = xp, w, sync
        self.upload = upload or (lambda a: a)
        dt = np.dtype(dtype)
        put = lambda a: xp.asarray(np.ascontiguousarray(a, dtype=dt))  # noqa: E731
        self.W = [put(a) for a in weights[0::2]]
        self.b = [put(a) for a in weights[1::2]]
        self.dW = [xp.empty_like(a) for a in self.W]
        self.db = [xp.empty_like(a) for a in self.b]
        n = w.batch
        self.z = [xp.empty((n, s), dtype=dt) for s in w.sizes[1:]]   # pre-activation = h
        self.g = [xp.empty((n, s), dtype=dt) for s in w.sizes[1:-1]]  # hidden gradients
        self.tmp = [xp.empty((n, s), dtype=dt) for s in w.sizes[1:-1]]
        self.mask = [xp.empty((n, s), dtype=bool) for s in w.sizes[1:-1]]
        self.col = xp.empty((n, 1), dtype=dt)
        self.col2 = xp.empty((n, 1), dtype=dt)
        self.rows = xp.arange(n)
        self.xh, self.yh = data

    def step(self) -> Any:
        xp, z = self.xp, self.z
        x, y = self.upload(self.xh), self.upload(self.yh)
        last = len(self.W) - 1
        h = x
        for i, (W, b) in enumerate(zip(self.W, self.b)):
            xp.matmul(h, W, out=z[i])
            z[i] += b
            if i < last:
                if self.w.activation == "relu":
                    xp.maximum(z[i], 0, out=z[i])
                else:  # sigmoid as 0.5 * tanh(0.5 x) + 0.5, like gpuflow's node
                    z[i] *= 0.5
                    xp.tanh(z[i], out=z[i])
                    z[i] *= 0.5
                    z[i] += 0.5
            h = z[i]
        out = z[last]
        if self.w.loss == "mse":
            m = out.size
            d = self.col
            xp.subtract(y, out, out=d)
            flat = d.ravel()
            loss = xp.dot(flat, flat) / m
            xp.multiply(d, -2.0 / m, out=out)   # d loss / d out
        else:
            n = out.shape[0]
            xp.max(out, axis=1, keepdims=True, out=self.col)
            out -= self.col                           # shifted logits
            picked = out[self.rows, y]
            xp.exp(out, out=out)
            xp.sum(out, axis=1, keepdims=True, out=self.col)
            xp.log(self.col, out=self.col2)
            loss = (self.col2.sum() - picked.sum()) / n
            out /= self.col                           # softmax
            out[self.rows, y] -= 1.0
            out *= 1.0 / n                            # d loss / d logits
        G = out
        for i in range(last, -1, -1):
            inp = x if i == 0 else z[i - 1]
            xp.matmul(inp.T, G, out=self.dW[i])
            xp.sum(G, axis=0, out=self.db[i])
            if i > 0:
                g = self.g[i - 1]
                xp.matmul(G, self.W[i].T, out=g)
                s = z[i - 1]
                if self.w.activation == "relu":
                    xp.greater(s, 0, out=self.mask[i - 1])
                    g *= self.mask[i - 1]
                else:
                    t = self.tmp[i - 1]
                    xp.subtract(1.0, s, out=t)
                    t *= s
                    g *= t
                G = g
        for p, dp in zip(self.W + self.b, self.dW + self.db):
            dp *= LEARNING_RATE
            p -= dp
        return loss

    def read(self, loss: Any) -> float:
        return float(loss)

    def sync(self) -> None:
        if self._sync is not None:
            self._sync()


class TorchFloor(Variant):
    """(c) for torch devices: hand-written torch ops, no autograd, out= and in place."""

    def __init__(self, w: Workload, tdev: Any, dtype: str, weights: Sequence[np.ndarray],
                 data: tuple[np.ndarray, np.ndarray]) -> None:
        import torch
        self.torch, self.tdev, self.w = torch, tdev, w
        dt = getattr(torch, dtype)
        put = lambda a: torch.as_tensor(np.ascontiguousarray(a), device=tdev).to(dt)  # noqa
        self.W = [put(a) for a in weights[0::2]]
        self.b = [put(a) for a in weights[1::2]]
        self.dW = [torch.empty_like(a) for a in self.W]
        self.db = [torch.empty_like(a) for a in self.b]
        n = w.batch
        new = lambda s, d=dt: torch.empty((n, s), dtype=d, device=tdev)  # noqa: E731
        self.z = [new(s) for s in w.sizes[1:]]
        self.g = [new(s) for s in w.sizes[1:-1]]
        self.tmp = [new(s) for s in w.sizes[1:-1]]
        self.mask = [new(s, torch.bool) for s in w.sizes[1:-1]]
        self.col, self.col2 = new(1), new(1)
        self.rows = torch.arange(n, device=tdev)
        self.xh, self.yh = data

    def _upload(self, a: np.ndarray) -> Any:
        t = self.torch.from_numpy(a)
        return t if self.tdev.type == "cpu" else t.to(self.tdev)

    def step(self) -> Any:
        torch, z = self.torch, self.z
        x, y = self._upload(self.xh), self._upload(self.yh)
        last = len(self.W) - 1
        h = x
        for i, (W, b) in enumerate(zip(self.W, self.b)):
            torch.addmm(b, h, W, out=z[i])
            if i < last:
                if self.w.activation == "relu":
                    z[i].clamp_(min=0)
                else:
                    z[i].mul_(0.5).tanh_().mul_(0.5).add_(0.5)
            h = z[i]
        out = z[last]
        if self.w.loss == "mse":
            m = out.numel()
            d = self.col
            torch.sub(y, out, out=d)
            loss = torch.dot(d.view(-1), d.view(-1)) / m
            torch.mul(d, -2.0 / m, out=out)
        else:
            n = out.shape[0]
            torch.amax(out, dim=1, keepdim=True, out=self.col)
            out.sub_(self.col)
            picked = out[self.rows, y]
            out.exp_()
            torch.sum(out, dim=1, keepdim=True, out=self.col)
            torch.log(self.col, out=self.col2)
            loss = (self.col2.sum() - picked.sum()) / n
            out.div_(self.col)
            out[self.rows, y] -= 1.0
            out.mul_(1.0 / n)
        G = out
        for i in range(last, -1, -1):
            inp = x if i == 0 else z[i - 1]
            torch.matmul(inp.T, G, out=self.dW[i])
            torch.sum(G, dim=0, out=self.db[i])
            if i > 0:
                g = self.g[i - 1]
                torch.matmul(G, self.W[i].T, out=g)
                s = z[i - 1]
                if self.w.activation == "relu":
                    torch.gt(s, 0, out=self.mask[i - 1])
                    g.mul_(self.mask[i - 1])
                else:
                    t = self.tmp[i - 1]
                    torch.sub(1.0, s, out=t)   # type: ignore[call-overload]
                    t.mul_(s)
                    g.mul_(t)
                G = g
        for p, dp in zip(self.W + self.b, self.dW + self.db):
            p.sub_(dp, alpha=LEARNING_RATE)
        return loss

    def read(self, loss: Any) -> float:
        return float(loss.item())

    def sync(self) -> None:
        if self.tdev.type == "cuda":
            self.torch.cuda.synchronize(self.tdev)


class ArrayApiFloor(Variant):
    """(c) for array_api_strict (or any namespace): plain standard ops, no dX."""

    def __init__(self, w: Workload, device: Device, dtype: str,
                 weights: Sequence[np.ndarray], data: tuple[np.ndarray, np.ndarray]) -> None:
        xp, dev = device.xp, device.native
        self.xp, self.dev, self.w = xp, dev, w
        self.dt = device.dtype(dtype)
        put = lambda a: xp.asarray(np.asarray(a, dtype=dtype), device=dev)  # noqa: E731
        self.W = [put(a) for a in weights[0::2]]
        self.b = [put(a) for a in weights[1::2]]
        self.xh, self.yh = data
        self.classes = xp.arange(w.sizes[-1], dtype=xp.int64, device=dev)

    def step(self) -> Any:
        xp = self.xp
        x = xp.asarray(self.xh, device=self.dev)
        y = xp.asarray(self.yh, device=self.dev)
        last = len(self.W) - 1
        hs = [x]
        for i, (W, b) in enumerate(zip(self.W, self.b)):
            z = hs[-1] @ W + b
            if i < last:
                z = xp.clip(z, min=0.0) if self.w.activation == "relu" else (
                    0.5 * xp.tanh(0.5 * z) + 0.5)
            hs.append(z)
        out = hs[-1]
        if self.w.loss == "mse":
            m = out.shape[0] * out.shape[1]
            d = y - out
            loss = xp.sum(d * d) / m
            G = (-2.0 / m) * d
        else:
            n = out.shape[0]
            shifted = out - xp.max(out, axis=1, keepdims=True)
            e = xp.exp(shifted)
            total = xp.sum(e, axis=1, keepdims=True)
            onehot = xp.astype(xp.reshape(y, (-1, 1)) == self.classes, self.dt)
            loss = -xp.sum(onehot * (shifted - xp.log(total))) / n
            G = (e / total - onehot) / n
        for i in range(last, -1, -1):
            dW = hs[i].T @ G
            db = xp.sum(G, axis=0)
            if i > 0:
                s = hs[i]
                G = G @ self.W[i].T
                G = xp.where(s > 0.0, G, 0.0) if self.w.activation == "relu" else (
                    G * (s * (1.0 - s)))
            self.W[i] -= LEARNING_RATE * dW
            self.b[i] -= LEARNING_RATE * db
        return loss

    def read(self, loss: Any) -> float:
        return float(np.asarray(loss.to_device(self.xp.Device("CPU_DEVICE")))
                     if hasattr(loss, "to_device") else loss)


class TorchEager(Variant):
    """(d) PyTorch eager: nn.Linear layers, torch.optim.SGD, loss.backward()."""

    def __init__(self, w: Workload, tdev: Any, dtype: str, weights: Sequence[np.ndarray],
                 data: tuple[np.ndarray, np.ndarray]) -> None:
        import torch
        from torch import nn
        self.torch, self.tdev, self.w = torch, tdev, w
        layers: list[Any] = []
        n_layers = len(w.sizes) - 1
        for i, (n_in, n_out) in enumerate(zip(w.sizes[:-1], w.sizes[1:])):
            lin = nn.Linear(n_in, n_out)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(weights[2 * i].T)))
                lin.bias.copy_(torch.from_numpy(weights[2 * i + 1]))
            layers.append(lin)
            if i < n_layers - 1:
                layers.append(nn.ReLU() if w.activation == "relu" else nn.Sigmoid())
        self.model = nn.Sequential(*layers).to(device=tdev, dtype=getattr(torch, dtype))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE)
        self.loss_fn = nn.MSELoss() if w.loss == "mse" else nn.CrossEntropyLoss()
        self.xh, self.yh = data

    def _upload(self, a: np.ndarray) -> Any:
        t = self.torch.from_numpy(a)
        return t if self.tdev.type == "cpu" else t.to(self.tdev)

    def step(self) -> Any:
        x, y = self._upload(self.xh), self._upload(self.yh)
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def read(self, loss: Any) -> float:
        return float(loss.item())

    def sync(self) -> None:
        if self.tdev.type == "cuda":
            self.torch.cuda.synchronize(self.tdev)


def torch_device_for(device: Device) -> Any:
    """The torch device that matches a gpuflow device (None if torch is not installed)."""
    try:
        import torch
    except ImportError:
        return None
    if device.backend == "torch":
        return device.native
    if device.backend == "cupy":
        return torch.device("cuda", device.index) if torch.cuda.is_available() else None
    return torch.device("cpu")


def make_floor(w: Workload, device: Device, dtype: str, weights: Sequence[np.ndarray],
               data: tuple[np.ndarray, np.ndarray]) -> Variant:
    """The hand-written floor in the device's own library."""
    if device.backend == "numpy":
        return NdarrayFloor(w, np, dtype, weights, data)
    if device.backend == "cupy":
        import cupy
        with device.native:
            return _CupyFloor(w, cupy, dtype, weights, data, device)
    if device.backend == "torch":
        return TorchFloor(w, device.native, dtype, weights, data)
    return ArrayApiFloor(w, device, dtype, weights, data)


class _CupyFloor(NdarrayFloor):
    """NdarrayFloor on one CUDA GPU: uploads with cupy.asarray, runs with that GPU current."""

    def __init__(self, w: Workload, cupy: Any, dtype: str, weights: Sequence[np.ndarray],
                 data: tuple[np.ndarray, np.ndarray], device: Device) -> None:
        super().__init__(w, cupy, dtype, weights, data, sync=device.native.synchronize,
                         upload=cupy.asarray)
        self.gpu = device.native

    def step(self) -> Any:
        with self.gpu:
            return super().step()


def make_variants(w: Workload, device: Device, dtype: str, seed: int,
                  data: tuple[np.ndarray, np.ndarray]) -> dict[str, Variant | None]:
    """Fresh instances of every variant, all from the same initial weights and batch."""
    weights = initial_weights(w, seed)
    # Each variant gets its own copy: on the CPU, topological_sort keeps a fed NumPy array of the
    # right dtype as is, so sgd_update would otherwise update another variant's weights too.
    fresh = lambda: [a.copy() for a in weights]  # noqa: E731
    tdev = torch_device_for(device)
    return {
        "floor": make_floor(w, device, dtype, fresh(), data),
        "graph": GraphVariant(w, device, dtype, seed, data),
        "miniflow": MiniFlowVariant(w, device, dtype, fresh(), data),
        "torch": TorchEager(w, tdev, dtype, fresh(), data) if tdev is not None else None,
    }


# -- measuring ------------------------------------------------------------------------------------
def cross_check(variants: dict[str, Variant | None], rtol: float) -> dict[str, Any]:
    """Run CHECK_STEPS steps of each variant; compare every loss with the floor's."""
    losses = {name: [v.read(v.step()) for _ in range(CHECK_STEPS)]
              for name, v in variants.items() if v is not None}
    ref = losses["floor"]
    bad = []
    for name, ls in losses.items():
        for i, (a, b) in enumerate(zip(ls, ref)):
            if not (math.isfinite(a) and abs(a - b) <= rtol * abs(b) + 1e-12):
                bad.append(f"{name} step {i}: loss {a!r} but the floor has {b!r}")
    return {"ok": not bad, "rtol": rtol, "losses": losses, "mismatches": bad}


def _block(v: Variant, k: int) -> tuple[float, dict[str, int] | None]:
    """Seconds per step over k steps (synchronised at the end), and the ledger change."""
    v.sync()
    before = LEDGER.snapshot() if v.ledger else None
    t0 = time.perf_counter()
    for _ in range(k):
        v.step()
    after = LEDGER.snapshot() if v.ledger else None  # before the block-end sync we add
    v.sync()
    dt = (time.perf_counter() - t0) / k
    delta = {key: after[key] - before[key] for key in after} if before and after else None
    return dt, delta


def time_variants(variants: dict[str, Variant | None], rounds: int, min_time: float,
                  warmup: int) -> dict[str, Any]:
    """Interleaved rounds: each round times a block of k steps of every variant in turn
    (order rotated each round). k is set in warm-up so that a block lasts about min_time."""
    live = [(n, v) for n, v in variants.items() if v is not None]
    steps: dict[str, int] = {}
    for name, v in live:
        per_step, _ = _block(v, warmup)
        steps[name] = max(1, math.ceil(min_time / max(per_step, 1e-9)))
    samples: dict[str, list[float]] = {n: [] for n, _ in live}
    ledger: dict[str, dict[str, int]] = {}
    timed_steps = {n: 0 for n, _ in live}
    gc.collect()
    for r in range(rounds):
        shift = r % len(live)
        for name, v in live[shift:] + live[:shift]:
            dt, delta = _block(v, steps[name])
            samples[name].append(dt)
            timed_steps[name] += steps[name]
            if delta is not None:
                total = ledger.setdefault(name, dict.fromkeys(delta, 0))
                for key, val in delta.items():
                    total[key] += val
    return {
        "median_s": {n: statistics.median(s) for n, s in samples.items()},
        "min_s": {n: min(s) for n, s in samples.items()},
        "samples_s": samples,
        "steps_per_block": steps,
        "ledger_per_step": {n: {k: val / timed_steps[n] for k, val in d.items()}
                            for n, d in ledger.items()},
    }


def memory(variants: dict[str, Variant | None], device: Device) -> dict[str, Any]:
    """Memory of one step of each variant: tracemalloc peak for NumPy-backed CPU arrays,
    the CuPy pool or torch.cuda.max_memory_allocated on GPUs; ru_maxrss for the process."""
    out: dict[str, Any] = {}
    for name, v in variants.items():
        if v is None:
            continue
        torch_backed = isinstance(v, (TorchEager, TorchFloor)) or device.backend == "torch"
        if torch_backed and _torch_cuda(v, device):
            import torch
            tdev = getattr(v, "tdev", None) or device.native
            torch.cuda.synchronize(tdev)
            torch.cuda.reset_peak_memory_stats(tdev)
            v.step()
            v.sync()
            out[name] = {"kind": "torch.cuda.max_memory_allocated",
                         "bytes": int(torch.cuda.max_memory_allocated(tdev))}
        elif device.backend == "cupy" and not torch_backed:
            import cupy
            pool = cupy.get_default_memory_pool()
            v.sync()
            pool.free_all_blocks()
            v.step()
            v.sync()
            out[name] = {"kind": "cupy pool used/total bytes after one step",
                         "bytes": int(pool.total_bytes()), "used_bytes": int(pool.used_bytes())}
        elif torch_backed:
            out[name] = {"kind": "n/a (torch CPU memory is invisible to tracemalloc)",
                         "bytes": None}
        else:
            tracemalloc.start()
            tracemalloc.reset_peak()
            v.step()
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            out[name] = {"kind": "tracemalloc peak of one step", "bytes": int(peak)}
    out["process_ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _torch_cuda(v: Variant, device: Device) -> bool:
    tdev = getattr(v, "tdev", None)
    if tdev is not None:
        return tdev.type == "cuda"
    return device.backend == "torch" and device.is_gpu


# -- machine info ---------------------------------------------------------------------------------
def _openblas(verb: str) -> Any:
    """The `openblas_<verb>_num_threads` function of NumPy's bundled OpenBLAS, or None."""
    import ctypes
    import glob
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs",
                                  "*openblas*"))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in (f"scipy_openblas_{verb}_num_threads64_", f"openblas_{verb}_num_threads64_",
                    f"openblas_{verb}_num_threads"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                return fn
    return None


def _openblas_threads() -> int | None:
    """NumPy's OpenBLAS thread count, read from the bundled library (None if not found)."""
    fn = _openblas("get")
    return int(fn()) if fn is not None else None


def set_threads(n: int) -> None:
    """Use n threads in NumPy's OpenBLAS and in torch (intra-op), where they are present.

    Why: on a small shared machine, a 2-thread BLAS whose second thread is descheduled waits a
    whole time slice per call, which can make a 20 MFLOP step 100x slower."""
    import ctypes
    fn = _openblas("set")
    if fn is not None:
        fn(ctypes.c_int(n))
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(n)


def machine_info(device: Device) -> dict[str, Any]:
    """Versions, CPU, thread counts and the device description."""
    info: dict[str, Any] = {
        "device": device.name, "device_describe": device.describe(),
        "python": platform.python_version(), "platform": platform.platform(),
        "gpuflow": gf.__version__, "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "numpy_blas_threads": _openblas_threads(),
        "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                   "MKL_NUM_THREADS") if k in os.environ},
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f
                                      if line.startswith("model name")), None)
    except OSError:
        info["cpu_model"] = None
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    for lib in ("cupy", "array_api_strict"):
        if lib in sys.modules:
            info[lib] = getattr(sys.modules[lib], "__version__", None)
    return info


# -- output ---------------------------------------------------------------------------------------
def _fmt_time(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def _fmt_bytes(b: int | None) -> str:
    if b is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b} B"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def report(results: dict[str, Any]) -> str:
    """The printed summary: timing table, memory and ledger table, notes."""
    info = results["machine"]
    head = [f"gpuflow bench on {info['device']}: {info['device_describe']}",
            f"dtype {results['dtype']}; CPU {info.get('cpu_model')}, {info['cpu_affinity']} "
            f"usable cores; NumPy BLAS threads {info['numpy_blas_threads']}, torch threads "
            f"{info.get('torch_threads', 'n/a')}",
            f"{results['rounds']} interleaved rounds, >= {results['min_time']} s per block; "
            "median per-step time (forward + backward + SGD update)."]
    rows = [["workload", "floor", "gpuflow Graph", "gpuflow MiniFlow", "torch eager",
             "Graph/floor", "MiniFlow/floor", "Graph/torch"]]
    mem_rows = [["workload", "mem floor", "mem Graph", "mem MiniFlow", "mem torch",
                 "Graph h2d/d2h/sync per step", "MiniFlow h2d/d2h/sync per step"]]
    notes = []
    for name, r in results["workloads"].items():
        med = r["timing"]["median_s"]
        ratios = r["ratios"]
        f = lambda x: "n/a" if x is None else f"{x:.2f}x"  # noqa: E731
        rows.append([f"{name} {r['describe']}"] + [_fmt_time(med.get(v)) for v in VARIANTS] +
                    [f(ratios["graph/floor"]), f(ratios["miniflow/floor"]),
                     f(ratios["graph/torch"])])
        led = r["timing"]["ledger_per_step"]
        lf = lambda d: "n/a" if d is None else (  # noqa: E731
            f"{d['h2d_calls']:.2f}/{d['d2h_calls']:.2f}/{d['syncs']:.2f}")
        mem_rows.append([name] + [_fmt_bytes(r["memory"].get(v, {}).get("bytes"))
                                  for v in VARIANTS] + [lf(led.get("graph")),
                                                        lf(led.get("miniflow"))])
        if not r["check"]["ok"]:
            notes.append(f"!!! {name}: LOSS MISMATCH: " + "; ".join(r["check"]["mismatches"]))
    mem_kinds = sorted({m["kind"] for r in results["workloads"].values()
                        for k, m in r["memory"].items() if isinstance(m, dict)})
    tail = [f"memory: {'; '.join(mem_kinds)}; process ru_maxrss "
            f"{_fmt_bytes(results['ru_maxrss_bytes'])}",
            "every variant uploads the same host batch each step (Input.value, "
            "torch.from_numpy, cupy.asarray, xp.asarray); on CPU devices that is zero-copy.",
            "loss cross-check (floor vs Graph vs MiniFlow vs torch, first "
            f"{CHECK_STEPS} steps, rtol {results['rtol']}): " +
            ("passed" if results["check_ok"] else "FAILED")]
    return "\n".join(head + ["", _table(rows), "", _table(mem_rows), ""] + tail + notes)


# -- entry point ----------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = CommandParser(  # one-line errors, worded as every gpuflow command's
        prog="gpuflow bench",
        description="Time one training step (forward + backward + SGD) of gpuflow's Graph and "
                    "MiniFlow paths against a hand-written floor and PyTorch eager.")
    p.add_argument("--device", default="cpu",
                   help="gpuflow device spec: cpu, cuda[:N], torch:cpu, torch:cuda[:N], "
                        "array_api_strict[:device1] (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--workloads", default=None,
                   help="comma-separated subset of " + ",".join(WORKLOADS) +
                        " (default: all that apply; W4 only on GPUs)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds per variant per round (default 0.2)")
    p.add_argument("--threads", type=int, default=None,
                   help="set NumPy's OpenBLAS and torch's thread counts (default: leave them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="tiny rounds for tests (2 rounds, 1 step per block)")
    p.add_argument("--json", metavar="PATH", help="write every number to PATH")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`gpuflow bench`: run the benchmark, print the tables; 0 if every loss cross-check passed,
    1 on a mismatch, 2 on a usage error."""
    args = _parser().parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 7)
    min_time = args.min_time if args.min_time is not None else (0.0 if args.quick else 0.2)
    warmup = 1 if args.quick else 3
    if rounds < 1 or min_time < 0:
        return report_error("gpuflow bench", f"--rounds ({rounds}) must be >= 1 and --min-time "
                            f"({min_time}) >= 0.\nhelp: e.g. --rounds 7 --min-time 0.2.")
    if args.threads is not None:
        if args.threads < 1:
            return report_error("gpuflow bench", f"--threads must be >= 1, got {args.threads}."
                                "\nhelp: pass e.g. --threads 1.")
        set_threads(args.threads)
    try:
        device = gf.get_device(args.device)
    except DeviceError as exc:
        return report_error("gpuflow bench", exc)
    if args.workloads:
        names = [s.strip().upper() for s in args.workloads.split(",") if s.strip()]
        unknown = [n for n in names if n not in WORKLOADS]
        if unknown:
            return report_error("gpuflow bench", f"unknown workload(s) {unknown}.\nhelp: "
                                f"choose from {','.join(WORKLOADS)}.")
        cpu_only = [n for n in names if WORKLOADS[n].gpu_only and not device.is_gpu]
        if cpu_only:
            return report_error("gpuflow bench", f"{', '.join(cpu_only)} run only on GPU devices, "
                                f"and {device.name} is not one.\nhelp: drop them from "
                                "--workloads or pass --device cuda.")
    else:
        names = [n for n, w in WORKLOADS.items() if device.is_gpu or not w.gpu_only]
    rtol = 1e-3 if args.dtype == "float32" else 1e-6

    results: dict[str, Any] = {"device": device.name, "dtype": args.dtype, "rounds": rounds,
                               "threads_option": args.threads,
                               "min_time": min_time, "seed": args.seed, "rtol": rtol,
                               "lr": LEARNING_RATE, "workloads": {}}
    for name in names:
        w = WORKLOADS[name]
        print(f"[{name}] {w.describe()} ...", file=sys.stderr, flush=True)
        data = make_data(w, args.dtype, args.seed)
        variants = make_variants(w, device, args.dtype, args.seed, data)
        check = cross_check(variants, rtol)
        if not check["ok"]:
            print(f"\n!!! gpuflow bench {name}: LOSS MISMATCH between variants — the timings "
                  "below compare different maths:\n  " + "\n  ".join(check["mismatches"]) +
                  "\n", file=sys.stderr, flush=True)
        timing = time_variants(variants, rounds, min_time, warmup)
        med = timing["median_s"]
        results["workloads"][name] = {
            "describe": w.describe(), "sizes": list(w.sizes), "activation": w.activation,
            "loss": w.loss, "batch": w.batch, "check": check, "timing": timing,
            "ratios": {"graph/floor": _ratio(med.get("graph"), med.get("floor")),
                       "miniflow/floor": _ratio(med.get("miniflow"), med.get("floor")),
                       "graph/torch": _ratio(med.get("graph"), med.get("torch")),
                       "miniflow/graph": _ratio(med.get("miniflow"), med.get("graph")),
                       "torch/floor": _ratio(med.get("torch"), med.get("floor"))},
            "memory": memory(variants, device),
        }
        del variants
        gc.collect()
    results["check_ok"] = all(r["check"]["ok"] for r in results["workloads"].values())
    results["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results["machine"] = machine_info(device)
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if results["check_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
