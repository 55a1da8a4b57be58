"""The ways of running one training step, and the table that picks a device's floor.

gpuflow's own variants (Graph, MiniFlow) live here and ask the gpuflow `Device` for everything;
the hand-written floors and PyTorch eager live in one module per library (`floor_<lib>.py`),
the only modules of the benchmark that import an array library other than NumPy.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Sequence

import numpy as np

import gpuflow as gf
from gpuflow.backends import LEDGER, Device
from gpuflow.optim import SGD
from gpuflow.timing import Variant

from .workloads import LEARNING_RATE, AnyWorkload, initial_weights

VARIANTS = ("floor", "graph", "miniflow", "torch")

# The floor is the same maths hand-written in the device's own library, so it is chosen per
# library: a backend's name -> the module holding its floor. Any other backend gets the floor
# written in plain array-API calls.
FLOOR_MODULES = {"numpy": "floor_numpy", "cupy": "floor_cupy", "torch": "floor_torch"}
GENERIC_FLOOR = "floor_array_api"


def floor_module(device: Device) -> ModuleType:
    """The module holding the hand-written floor in `device`'s own library."""
    name = FLOOR_MODULES.get(device.backend, GENERIC_FLOOR)
    return importlib.import_module(f"{__package__}.{name}")


def torch_module() -> ModuleType | None:
    """The module of PyTorch eager and the torch floor, or None when torch is not installed."""
    try:
        return importlib.import_module(f"{__package__}.floor_torch")
    except ImportError:
        return None


class _GpuflowVariant(Variant):
    """A variant that runs gpuflow on `device`: memory is measured as the device's library
    measures it (its floor module says how)."""

    ledger = True

    def __init__(self, device: Device) -> None:
        self.device = device
        self._probe = getattr(floor_module(device), "memory", None)

    def sync(self) -> None:
        self.device.synchronize(what="bench block end")

    def memory(self) -> dict[str, Any] | None:
        return self._probe(self, self.device.native) if self._probe is not None else None


class GraphVariant(_GpuflowVariant):
    """(a) gpuflow's Graph + SGD optimizer."""

    def __init__(self, w: AnyWorkload, device: Device, dtype: str, seed: int,
                 data: tuple[np.ndarray, np.ndarray]) -> None:
        super().__init__(device)
        X, y, loss, _ = w.model(seed)
        self.graph = gf.Graph(loss, device=device, dtype=dtype, inputs=[X, y])
        self.opt = SGD(self.graph, lr=LEARNING_RATE)
        self.xb, self.yb = data

    def step(self) -> Any:
        loss = self.graph.step(self.xb, self.yb)
        self.opt.step()
        return loss

    def read(self, loss: Any) -> float:
        return self.graph.item(loss)


class MiniFlowVariant(_GpuflowVariant):
    """(b) the MiniFlow loop: every weight an Input, every gradient computed."""

    def __init__(self, w: AnyWorkload, device: Device, dtype: str,
                 weights: Sequence[np.ndarray], data: tuple[np.ndarray, np.ndarray]) -> None:
        super().__init__(device)
        self.X, self.y = gf.Input(name="X"), gf.Input(name="y")
        self.trainables = [gf.Input(name=f"{'Wb'[i % 2]}{i // 2 + 1}")
                           for i in range(len(weights))]
        self.loss = w.network(self.X, self.y, self.trainables)
        feed = {self.X: data[0], self.y: data[1], **dict(zip(self.trainables, weights))}
        self.graph = gf.topological_sort(feed, device=device, dtype=dtype)
        self.xb, self.yb = data

    def step(self) -> Any:
        self.X.value = self.xb
        self.y.value = self.yb
        gf.forward_and_backward(self.graph)
        gf.sgd_update(self.trainables, LEARNING_RATE)
        return self.loss.value

    def read(self, loss: Any) -> float:
        with LEDGER.allowed():
            return self.device.item(loss, what="loss read")


def make_variants(w: AnyWorkload, device: Device, dtype: str, seed: int,
                  data: tuple[np.ndarray, np.ndarray]) -> dict[str, Variant | None]:
    """Fresh instances of every variant, all from the same initial weights and batch."""
    weights = initial_weights(w, seed)
    # Each variant gets its own copy: on the CPU, topological_sort keeps a fed NumPy array of the
    # right dtype as is, so sgd_update would otherwise update another variant's weights too.
    fresh = lambda: [a.copy() for a in weights]  # noqa: E731
    floor = floor_module(device)
    torch = torch_module()
    tdev = torch.torch_device(floor.torch_twin(device)) if torch is not None else None
    return {
        "floor": floor.make_floor(w, device, dtype, fresh(), data),
        "graph": GraphVariant(w, device, dtype, seed, data),
        "miniflow": MiniFlowVariant(w, device, dtype, fresh(), data)
        if getattr(w, "miniflow", True) else None,   # W7: no MiniFlow GPT
        "torch": torch.TorchEager(w, tdev, dtype, fresh(), data) if tdev is not None else None,
    }
