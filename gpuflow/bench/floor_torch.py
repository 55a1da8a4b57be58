"""The torch devices' floor (hand-written torch ops, no autograd) and PyTorch eager (nn layers,
torch.optim, autograd), which every device is compared with; torch's thread count, version and
CUDA memory. The benchmark's only module that imports torch."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gpuflow.backends import Device

from .variants import Variant
from .workloads import LEARNING_RATE, AnyWorkload, ConvWorkload, Workload


class TorchFloor(Variant):
    """(c) for torch devices: hand-written torch ops, no autograd, out= and in place."""

    def __init__(self, w: Workload, tdev: Any, dtype: str, weights: Sequence[np.ndarray],
                 data: tuple[np.ndarray, np.ndarray]) -> None:
        self.tdev, self.w = tdev, w
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
        self.e = [new(s) for s in w.sizes[1:-1]]  # sigmoid: exp(-|z|)
        self.d = [new(s) for s in w.sizes[1:-1]]  # sigmoid: 1 + exp(-|z|)
        self.mask = [new(s, torch.bool) for s in w.sizes[1:-1]]
        self.col, self.col2 = new(1), new(1)
        self.rows = torch.arange(n, device=tdev)
        self.xh, self.yh = data

    def _upload(self, a: np.ndarray) -> Any:
        t = torch.from_numpy(a)
        return t if self.tdev.type == "cpu" else t.to(self.tdev)

    def step(self) -> Any:
        z = self.z
        x, y = self._upload(self.xh), self._upload(self.yh)
        last = len(self.W) - 1
        h = x
        for i, (W, b) in enumerate(zip(self.W, self.b)):
            torch.addmm(b, h, W, out=z[i])
            if i < last:
                if self.w.activation == "relu":
                    z[i].clamp_(min=0)
                else:  # sigmoid as gpuflow's node: exp(min(z, 0)) / (1 + exp(-|z|))
                    e, d = self.e[i], self.d[i]
                    torch.abs(z[i], out=e).neg_().exp_()
                    torch.add(e, 1.0, out=d)
                    torch.gt(z[i], 0, out=z[i])
                    torch.maximum(z[i], e, out=z[i]).div_(d)
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
                else:  # s (1 - s) = e / (1 + e)^2, as gpuflow's node
                    t = self.tmp[i - 1]
                    torch.div(self.e[i - 1], self.d[i - 1], out=t).div_(self.d[i - 1])
                    g.mul_(t)
                G = g
        for p, dp in zip(self.W + self.b, self.dW + self.db):
            p.sub_(dp, alpha=LEARNING_RATE)
        return loss

    def read(self, loss: Any) -> float:
        return float(loss.item())

    def sync(self) -> None:
        if self.tdev.type == "cuda":
            torch.cuda.synchronize(self.tdev)

    def memory(self) -> dict[str, Any] | None:
        return memory(self, self.tdev)


class TorchEager(Variant):
    """(d) PyTorch eager: nn layers (Linear; Conv2d, MaxPool2d, Flatten), torch.optim.SGD,
    loss.backward()."""

    def __init__(self, w: AnyWorkload, tdev: Any, dtype: str, weights: Sequence[np.ndarray],
                 data: tuple[np.ndarray, np.ndarray]) -> None:
        self.tdev, self.w = tdev, w
        layers = _conv_layers(w, weights) if isinstance(w, ConvWorkload) else \
            _mlp_layers(w, weights)
        self.model = nn.Sequential(*layers).to(device=tdev, dtype=getattr(torch, dtype))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE)
        self.loss_fn = nn.MSELoss() if w.loss == "mse" else nn.CrossEntropyLoss()
        self.xh, self.yh = data

    def _upload(self, a: np.ndarray) -> Any:
        t = torch.from_numpy(a)
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
            torch.cuda.synchronize(self.tdev)

    def memory(self) -> dict[str, Any] | None:
        return memory(self, self.tdev)


F64 = torch.float64  # layers made in float64 take the host weights exactly, then are cast


def _set(layer: Any, weight: np.ndarray, bias: np.ndarray) -> Any:
    """`layer` with the given host weight (in torch's layout) and bias."""
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer


def _mlp_layers(w: Workload, weights: Sequence[np.ndarray]) -> list[Any]:
    layers: list[Any] = []
    n_layers = len(w.sizes) - 1
    for i, (n_in, n_out) in enumerate(zip(w.sizes[:-1], w.sizes[1:])):
        layers.append(_set(nn.Linear(n_in, n_out, dtype=F64), weights[2 * i].T, weights[2 * i + 1]))
        if i < n_layers - 1:
            layers.append(nn.ReLU() if w.activation == "relu" else nn.Sigmoid())
    return layers


def _conv_layers(w: ConvWorkload, weights: Sequence[np.ndarray]) -> list[Any]:
    layers: list[Any] = []
    it = iter(weights)
    plan = w.plan()
    for i, (spec, shape_in, _) in enumerate(plan):
        if spec[0] == "conv":
            _, o, k, p = spec
            layers += [_set(nn.Conv2d(shape_in[0], o, k, padding=p, dtype=F64), next(it), next(it)),
                       nn.ReLU()]
        elif spec[0] == "pool":
            layers.append(nn.MaxPool2d(spec[1]))
        else:
            if len(shape_in) > 1:
                layers.append(nn.Flatten())
            W = next(it)
            layers.append(_set(nn.Linear(W.shape[0], W.shape[1], dtype=F64), W.T, next(it)))
            if i < len(plan) - 1:
                layers.append(nn.ReLU())
    return layers


class TorchConvFloor(TorchFloor):
    """(c) W5/W6 for torch devices: torch's own convolution and pooling kernels called by hand
    (F.conv2d, max_pool2d_with_indices and their aten backward functions, the ones autograd
    calls), Linear layers and the loss as TorchFloor's; no autograd graph."""

    def __init__(self, w: ConvWorkload, tdev: Any, dtype: str, weights: Sequence[np.ndarray],
                 data: tuple[np.ndarray, np.ndarray]) -> None:
        self.tdev, self.w = tdev, w
        dt = getattr(torch, dtype)
        self.params = [torch.as_tensor(np.ascontiguousarray(a), device=tdev).to(dt)
                       for a in weights]
        self.plan = w.plan()
        self.rows = torch.arange(w.batch, device=tdev)
        self.xh, self.yh = data

    def step(self) -> Any:
        aten, plan = torch.ops.aten, self.plan
        x, y = self._upload(self.xh), self._upload(self.yh)
        saved: list[tuple[Any, ...]] = []   # per layer: what its backward needs
        it = iter(self.params)
        h = x
        for i, (spec, _, _) in enumerate(plan):
            if spec[0] == "conv":
                W, b = next(it), next(it)
                z = F.conv2d(h, W, b, padding=spec[3]).relu_()
                saved.append((h, W, z))
            elif spec[0] == "pool":
                z, idx = F.max_pool2d_with_indices(h, spec[1])
                saved.append((h, idx))
            else:
                W, b = next(it), next(it)
                h2 = h.flatten(1)
                z = torch.addmm(b, h2, W)
                if i < len(plan) - 1:
                    z.relu_()
                saved.append((h, h2, W, z))
            h = z
        loss = _softmax_ce(h, y, self.rows)
        G = h
        grads: list[Any] = []
        for i in range(len(plan) - 1, -1, -1):
            spec = plan[i][0]
            kind = spec[0]
            if kind == "fc":
                h, h2, W, z = saved[i]
                if i < len(plan) - 1:
                    G = aten.threshold_backward(G, z, 0)
                grads += [G.sum(0), h2.T @ G]
                G = (G @ W.T).view(h.shape) if i > 0 else None
            elif kind == "pool":
                h, idx = saved[i]
                k = spec[1]
                G = aten.max_pool2d_with_indices_backward(G, h, [k, k], [k, k], [0, 0], [1, 1],
                                                          False, idx)
            else:
                h, W, z = saved[i]
                G = aten.threshold_backward(G, z, 0)
                p = spec[3]
                dx, dW, db = aten.convolution_backward(
                    G, h, W, [W.shape[0]], [1, 1], [p, p], [1, 1], False, [0, 0], 1,
                    [i > 0, True, True])
                grads += [db, dW]
                G = dx
        for param, grad in zip(self.params, reversed(grads)):
            param.sub_(grad, alpha=LEARNING_RATE)
        return loss


def _softmax_ce(out: Any, y: Any, rows: Any) -> Any:
    """Mean softmax cross-entropy of logits `out` for labels y; `out` becomes its gradient."""
    n = out.shape[0]
    out.sub_(torch.amax(out, dim=1, keepdim=True))
    picked = out[rows, y]
    out.exp_()
    total = out.sum(dim=1, keepdim=True)
    loss = (total.log().sum() - picked.sum()) / n
    out.div_(total)
    out[rows, y] -= 1.0
    out.mul_(1.0 / n)
    return loss


def make_floor(w: AnyWorkload, device: Device, dtype: str, weights: Sequence[np.ndarray],
               data: tuple[np.ndarray, np.ndarray]) -> Variant:
    """The hand-written torch floor on `device`'s torch device."""
    if isinstance(w, ConvWorkload):
        return TorchConvFloor(w, device.native, dtype, weights, data)
    return TorchFloor(w, device.native, dtype, weights, data)


def torch_twin(device: Device) -> Any:
    """A torch device is its own twin."""
    return device.native


def torch_device(spec: Any) -> Any:
    """The torch device for a spec ("cpu", "cuda:0", a torch.device); None when it names a GPU
    and torch has no CUDA here."""
    tdev = torch.device(spec)
    if tdev.type == "cuda" and not torch.cuda.is_available():
        return None
    return tdev


def memory(v: Variant, tdev: Any) -> dict[str, Any]:
    """torch.cuda.max_memory_allocated over one step of `v` on a CUDA device; on the CPU torch's
    allocations are invisible to tracemalloc, so nothing is measured."""
    if tdev.type != "cuda":
        return {"kind": "n/a (torch CPU memory is invisible to tracemalloc)", "bytes": None}
    torch.cuda.synchronize(tdev)
    torch.cuda.reset_peak_memory_stats(tdev)
    v.step()
    v.sync()
    return {"kind": "torch.cuda.max_memory_allocated",
            "bytes": int(torch.cuda.max_memory_allocated(tdev))}


def set_threads(n: int) -> None:
    """Use n intra-op threads in torch."""
    torch.set_num_threads(n)


def library_info() -> dict[str, Any]:
    """torch's version and intra-op thread count."""
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
