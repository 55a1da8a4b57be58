"""The floor for any other array-API library (array_api_strict): the step in plain standard
calls, new arrays each step, no gradient for the data."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from gpuflow.backends import Device

from .variants import Variant
from .workloads import LEARNING_RATE, Workload


class ArrayApiFloor(Variant):
    """(c) for array_api_strict (or any namespace): plain standard ops, no dX."""

    def __init__(self, w: Workload, device: Device, dtype: str,
                 weights: Sequence[np.ndarray], data: tuple[np.ndarray, np.ndarray]) -> None:
        xp, dev = device.xp, device.native
        self.device, self.xp, self.dev, self.w = device, xp, dev, w
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
            # reassigned, not updated in place: some array-API libraries' arrays are immutable
            self.W[i] = self.W[i] - LEARNING_RATE * dW
            self.b[i] = self.b[i] - LEARNING_RATE * db
        return loss

    def read(self, loss: Any) -> float:
        return float(self.device.to_host(loss, what="floor loss read"))


def make_floor(w: Workload, device: Device, dtype: str, weights: Sequence[np.ndarray],
               data: tuple[np.ndarray, np.ndarray]) -> Variant:
    """The floor in plain array-API calls on `device`."""
    return ArrayApiFloor(w, device, dtype, weights, data)


def torch_twin(device: Device) -> str | None:
    """The torch device for PyTorch eager: the CPU, unless the device is a GPU, whose torch
    twin this generic floor does not know."""
    return None if device.is_gpu else "cpu"
