"""Array libraries gpuflow runs on, one module each, and the registry that names them.

Everything that depends on one library lives in `gpuflow/backends/<lib>.py`: its import, device
parsing, availability, host transfers, synchronisation and description; `base.py` states what
such a module provides (the backend contract) and holds the `Device` and `Ops` they build on.
Backend modules are imported only when one of their devices is first asked for, so
`import gpuflow` never loads CuPy, torch or JAX.

Every host->device copy, device->host copy and synchronisation goes through `Device.put`,
`Device.to_host` and `Device.synchronize`, which count them in `LEDGER`.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, NamedTuple

from ..errors import DeviceError
from .base import NULL_SCOPE, Device, Ops, UfuncOps, dtype_name, missing_library
from .ledger import LEDGER, TransferLedger

__all__ = ["BACKENDS", "INSTALL_HINTS", "LEDGER", "NULL_SCOPE", "REGISTRY", "Device", "Ops",
           "TransferLedger", "UfuncOps", "array_device", "available_devices", "backend_report",
           "dtype_name", "foreign_device_name", "get_device", "load_backend", "missing_library",
           "parse_spec", "rank_spec", "to_host"]


class Backend(NamedTuple):
    """One line of the registry."""

    name: str                # module gpuflow/backends/<name>.py
    library: str             # what it imports (never imported by gpuflow before it is asked for)
    heads: tuple[str, ...]   # spec heads that name it ('cuda:1' -> head 'cuda')
    install: str             # how to install the library
    missing: str = "device {spec!r} needs {library}"  # said when the library cannot import


# Adding a backend: its module, and one line here.
REGISTRY = (
    Backend("numpy", "numpy", ("cpu", "numpy"), "pip install numpy"),
    Backend("cupy", "cupy", ("cuda", "gpu", "cupy"),
            "pip install 'gpuflow[cuda12]' (CUDA 12) or 'gpuflow[cuda13]' (CUDA 13)",
            "no CUDA device found for {spec!r}: tried CuPy"),
    Backend("torch", "torch", ("torch",), "pip install 'gpuflow[torch]'"),
    Backend("array_api_strict", "array_api_strict", ("array_api_strict",),
            "pip install array-api-strict"),
    Backend("jax", "jax", ("jax",), "pip install 'gpuflow[jax]'"),
)
_BY_NAME = {b.name: b for b in REGISTRY}
_BY_HEAD = {head: b for b in REGISTRY for head in b.heads}
BACKENDS = tuple(_BY_NAME)
INSTALL_HINTS = {b.name: b.install for b in REGISTRY}


def foreign_device_name(value: Any) -> str | None:
    """The device spec of an array from any backend library, or None for host values."""
    from . import numpy as np_backend
    if np_backend.is_host_value(value):
        return None
    for backend in BACKENDS:
        module = _loaded_backend(backend)
        if module is not None:
            name = module.array_device_name(value)
            if name is not None:
                return name
    return f"an unknown library ({type(value).__module__}.{type(value).__name__})"


def array_device(value: Any) -> Device | None:
    """The device holding `value`, an array of any backend library; None for host values and
    arrays of a library gpuflow has no backend for."""
    name = foreign_device_name(value)
    if name is None or name.startswith("an unknown library"):
        return None
    return get_device(name)


def to_host(value: Any, device: Device | None, *, what: str = "array", copy: bool = False,
            allowed: bool = False) -> Any:
    """The one way gpuflow brings a value back to the host (to_numpy, checkpoints, moving a
    graph, the gradient check). An array `device` owns comes back through `device.to_host`: a
    new NumPy array, counted in `LEDGER` as `what` (`allowed`: also in strict transfer mode).
    Anything else (device None, a NumPy array, scalar, list, None) is a host value, returned as
    it is, or with `copy` as `backends.numpy.host_copy` gives it (a NumPy array's copy)."""
    if device is not None and device.owns(value):
        if not allowed:
            return device.to_host(value, what=what)
        with LEDGER.allowed():
            return device.to_host(value, what=what)
    if not copy:
        return value
    from .numpy import host_copy
    return host_copy(value)


def _loaded_backend(backend: str) -> Any:
    """The backend module if its library is already imported (never imports a library)."""
    if _BY_NAME[backend].library not in sys.modules:
        return None
    return importlib.import_module(f"{__name__}.{backend}")


# -- device specs -------------------------------------------------------------------------------
_CACHE: dict[str, Device] = {}


def parse_spec(spec: str) -> tuple[str, str]:
    """Split a spec into (backend, rest): 'cuda:1' -> ('cupy', '1'),
    'torch:cuda' -> ('torch', 'cuda'), 'cpu' -> ('numpy', '')."""
    head, _, rest = spec.strip().partition(":")
    backend = _BY_HEAD.get(head.lower())
    if backend is None:
        examples = ", ".join(repr(s) for s in (
            "cpu", "cuda", "cuda:N", "auto", "numpy", "cupy:N", "torch:cpu", "torch:cuda:N",
            "array_api_strict", "array_api_strict:device1", "jax", "jax:cpu", "jax:gpu:N"))
        raise DeviceError(f"unknown device spec {spec!r}.\nhelp: pass one of {examples}.")
    return backend.name, rest


def get_device(spec: "str | Device | None" = None, *, verbose: bool = False) -> Device:
    """The device for a spec string ('cpu', 'cuda:0', 'auto', 'torch:cpu', ...).

    `None` means the environment variable GPUFLOW_DEVICE, else 'cpu'. 'auto' picks the first
    CUDA GPU that CuPy can use, else the CPU (with `verbose=True` it prints which and why).
    A spec this machine cannot provide raises `DeviceError`; nothing falls back silently.
    """
    if isinstance(spec, Device):
        return spec
    if spec is None:
        spec = os.environ.get("GPUFLOW_DEVICE") or "cpu"
    if not isinstance(spec, str):
        raise DeviceError(f"device must be a spec string or a gpuflow Device, got {spec!r}.\n"
                          "help: pass e.g. 'cpu', 'cuda:0' or 'auto'.")
    if spec.strip().lower() == "auto":
        try:
            device = get_device("cuda")
            reason = "a CUDA GPU is available"
        except DeviceError as exc:
            device = get_device("cpu")
            reason = str(exc).splitlines()[0]
        if verbose:
            print(f"gpuflow: device 'auto' chose {device.name} ({reason})")
        return device
    key = spec.strip().lower()
    if key in _CACHE:
        return _CACHE[key]
    backend, rest = parse_spec(spec)
    module = load_backend(backend, spec)
    device = module.make_device(rest, spec)
    device = _CACHE.setdefault(device.name, device)
    _CACHE[key] = device
    return device


def load_backend(backend: str, spec: str = "") -> Any:
    """Import gpuflow's module for `backend`; DeviceError if its library cannot be imported."""
    module = importlib.import_module(f"{__name__}.{backend}")
    problem = module.import_problem()
    if problem is not None:
        info = _BY_NAME[backend]
        found = info.missing.format(spec=spec or backend, library=info.library)
        raise DeviceError(f"{found}, which cannot be imported here: {problem}.\n"
                          f"help: {INSTALL_HINTS[backend]}, or pass device='cpu' "
                          "(or 'auto', which uses a GPU only when there is one).")
    return module


def backend_report() -> list[dict[str, Any]]:
    """Every backend with its device specs: available or not, why, and a description."""
    rows = []
    for backend in BACKENDS:
        module = importlib.import_module(f"{__name__}.{backend}")
        problem = module.import_problem()
        if problem is not None:
            rows.append({"backend": backend, "spec": module.EXAMPLE_SPECS[0],
                         "available": False, "detail": f"{problem}; {INSTALL_HINTS[backend]}"})
            continue
        for spec in module.candidate_specs():
            try:
                device = get_device(spec)
                rows.append({"backend": backend, "spec": device.name, "available": True,
                             "detail": device.describe()})
            except DeviceError as exc:
                rows.append({"backend": backend, "spec": spec, "available": False,
                             "detail": str(exc).splitlines()[0]})
    return rows


def available_devices() -> list[str]:
    """The canonical specs of every device this machine can run, the CPU first."""
    return [row["spec"] for row in backend_report() if row["available"]]


def rank_spec(spec: str, local_rank: int) -> str:
    """This MPI rank's device spec for `spec`: a GPU spec without an index gets the rank's
    ('cuda' -> 'cuda:<local rank>', 'torch:cuda' -> 'torch:cuda:<local rank>'), modulo the GPUs
    the library sees here; 'auto' first picks the GPU or the CPU; anything else stays."""
    s = spec.strip()
    if s.lower() == "auto":  # auto picks GPU 0 for everyone: make it this rank's GPU
        s = "cuda" if get_device("auto").is_gpu else "cpu"
    backend, rest = parse_spec(s)
    module = importlib.import_module(f"{__name__}.{backend}")
    per_rank = getattr(module, "rank_spec", None)
    if per_rank is None or module.import_problem() is not None:
        return s
    return per_rank(rest, s, local_rank) or s
