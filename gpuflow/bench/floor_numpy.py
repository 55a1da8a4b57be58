"""The floor for NumPy devices ('cpu'): the step hand-written in NumPy, in place, into buffers
allocated once, `out=` everywhere. `NdarrayFloor` takes the library as `xp`, so CuPy's floor is
the same class (floor_cupy.py)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from gpuflow.backends import Device

from .variants import Variant
from .workloads import LEARNING_RATE, Workload


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


def make_floor(w: Workload, device: Device, dtype: str, weights: Sequence[np.ndarray],
               data: tuple[np.ndarray, np.ndarray]) -> Variant:
    """The hand-written NumPy floor."""
    return NdarrayFloor(w, np, dtype, weights, data)


def torch_twin(device: Device) -> str:
    """The torch device that runs on the same hardware, for PyTorch eager."""
    return "cpu"
