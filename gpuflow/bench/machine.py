"""The machine the benchmark ran on: versions, CPU, thread counts; NumPy's OpenBLAS threads,
set and read through ctypes (NumPy has no API for them)."""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from typing import Any

import numpy as np

import gpuflow as gf
from gpuflow.backends import Device
from gpuflow.backends.numpy_threads import openblas

from .variants import torch_module


def _openblas_threads() -> int | None:
    """NumPy's OpenBLAS thread count, read from the bundled library (None if not found)."""
    fn = openblas("get")
    return int(fn()) if fn is not None else None


# `gpuflow bench` holds NumPy's OpenBLAS and torch to one thread by default on machines with at
# most this many usable cores: there a second thread waits for a core other jobs hold, and the
# same run took 0.98 ms or 124 ms (torch eager, W2, 2 cores) where one thread gave 0.57 ms twice.
SMALL_MACHINE_CORES = 4


def usable_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads() -> int | None:
    """`gpuflow bench`'s default thread count: 1 on a small machine (SMALL_MACHINE_CORES or
    fewer usable cores), else None (the libraries' own)."""
    return 1 if usable_cores() <= SMALL_MACHINE_CORES else None


def set_threads(n: int) -> None:
    """Use n threads in NumPy's OpenBLAS and in torch (intra-op), where they are present.

    Why: on a small shared machine, a 2-thread BLAS whose second thread is descheduled waits a
    whole time slice per call, which can make a 20 MFLOP step 100x slower."""
    fn = openblas("set")
    if fn is not None:
        fn(ctypes.c_int(n))
    torch = torch_module()
    if torch is not None:
        torch.set_threads(n)


def machine_info(device: Device) -> dict[str, Any]:
    """Versions, CPU, thread counts and the device description."""
    info: dict[str, Any] = {
        "device": device.name, "device_describe": device.describe(),
        "python": platform.python_version(), "platform": platform.platform(),
        "gpuflow": gf.__version__, "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "numpy_blas_threads": _openblas_threads(),
        "gpuflow_split_threads": gf.get_num_threads(),
        "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                   "MKL_NUM_THREADS") if k in os.environ},
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f
                                      if line.startswith("model name")), None)
    except OSError:
        info["cpu_model"] = None
    torch = torch_module()
    info.update(torch.library_info() if torch is not None else {"torch": None})
    for lib in ("cupy", "array_api_strict"):
        if lib in sys.modules:
            info[lib] = getattr(sys.modules[lib], "__version__", None)
    return info
