"""The floor for CuPy devices ('cuda[:N]'): NumPy's floor (`NdarrayFloor`) run by CuPy on one
GPU, with that GPU current; memory read from CuPy's pool."""

from __future__ import annotations

from typing import Any, Sequence

import cupy
import numpy as np

from gpuflow.backends import Device

from .floor_numpy import NdarrayFloor
from .variants import Variant
from .workloads import Workload


class CupyFloor(NdarrayFloor):
    """NdarrayFloor on one CUDA GPU: uploads with cupy.asarray, runs with that GPU current."""

    def __init__(self, w: Workload, dtype: str, weights: Sequence[np.ndarray],
                 data: tuple[np.ndarray, np.ndarray], device: Device) -> None:
        super().__init__(w, cupy, dtype, weights, data, sync=device.native.synchronize,
                         upload=cupy.asarray)
        self.gpu = device.native

    def step(self) -> Any:
        with self.gpu:
            return super().step()

    def memory(self) -> dict[str, Any] | None:
        return memory(self, self.gpu)


def make_floor(w: Workload, device: Device, dtype: str, weights: Sequence[np.ndarray],
               data: tuple[np.ndarray, np.ndarray]) -> Variant:
    """The hand-written CuPy floor, its arrays on `device`'s GPU."""
    with device.native:
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
