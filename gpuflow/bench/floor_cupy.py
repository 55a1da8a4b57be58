"""The floor for CuPy devices ('cuda[:N]'): NumPy's floors (`NdarrayFloor`, `ConvNdarrayFloor`)
run by CuPy on one GPU, with that GPU current; memory read from CuPy's pool. W7's GPT floor is
the array-API one (floor_array_api.GPTArrayApiFloor) run on CuPy: NumPy's GPT floor calls
NumPy by name (np.add.at, NumPy's erf route)."""

from __future__ import annotations

from typing import Any, Sequence

import cupy
import numpy as np

from gpuflow.backends import Device

from .floor_array_api import GPTArrayApiFloor
from .floor_numpy import ConvNdarrayFloor, NdarrayFloor
from .variants import Variant
from .workloads import AnyWorkload, ConvWorkload, GPTWorkload


class CupyFloor(Variant):
    """A NumPy floor on one CUDA GPU: uploads with cupy.asarray, runs with that GPU current."""

    def __init__(self, w: AnyWorkload, dtype: str, weights: Sequence[np.ndarray],
                 data: tuple[np.ndarray, np.ndarray], device: Device) -> None:
        self.gpu = device.native
        with self.gpu:
            if isinstance(w, GPTWorkload):
                self.inner: Variant = GPTArrayApiFloor(w, device, dtype, weights, data)
                return
            kind = ConvNdarrayFloor if isinstance(w, ConvWorkload) else NdarrayFloor
            self.inner = kind(w, cupy, dtype, weights, data, sync=self.gpu.synchronize,
                              upload=cupy.asarray)

    def step(self) -> Any:
        with self.gpu:
            return self.inner.step()

    def read(self, loss: Any) -> float:
        return self.inner.read(loss)

    def sync(self) -> None:
        self.gpu.synchronize()

    def memory(self) -> dict[str, Any] | None:
        return memory(self, self.gpu)


def make_floor(w: AnyWorkload, device: Device, dtype: str, weights: Sequence[np.ndarray],
               data: tuple[np.ndarray, np.ndarray]) -> Variant:
    """The hand-written CuPy floor, its arrays on `device`'s GPU."""
    return CupyFloor(w, dtype, weights, data, device)


def torch_twin(device: Device) -> str:
    """The torch device on the same GPU, for PyTorch eager."""
    return f"cuda:{device.native.id}"


def memory(v: Variant, gpu: Any) -> dict[str, Any]:
    """CuPy's memory pool after one step of `v` that starts from an emptied pool."""
    pool = cupy.get_default_memory_pool()
    v.sync()
    pool.free_all_blocks()
    v.step()
    v.sync()
    return {"kind": "cupy pool used/total bytes after one step",
            "bytes": int(pool.total_bytes()), "used_bytes": int(pool.used_bytes())}
