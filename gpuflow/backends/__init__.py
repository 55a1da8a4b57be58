"""Array libraries gpuflow runs on, one module each, and the `Device` they share.

Everything that depends on one library lives in `gpuflow/backends/<lib>.py`: its import, device
parsing, availability, host transfers, synchronisation and description. Backend modules are
imported only when one of their devices is first asked for, so `import gpuflow` never loads
CuPy or torch.

Every host->device copy, device->host copy and synchronisation goes through `Device.put`,
`Device.to_host` and `Device.synchronize`, which count them in `LEDGER`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable

from ..errors import DeviceError, GraphError, TransferError

BACKENDS = ("numpy", "cupy", "torch", "array_api_strict")
INSTALL_HINTS = {
    "numpy": "pip install numpy",
    "cupy": "pip install 'gpuflow[cuda12]' (CUDA 12) or 'gpuflow[cuda13]' (CUDA 13)",
    "torch": "pip install 'gpuflow[torch]'",
    "array_api_strict": "pip install array-api-strict",
}


class TransferLedger:
    """Counts host<->device copies (calls and bytes) and synchronisations.

    In strict mode, a transfer or sync that nobody allowed raises `TransferError`. The executor
    allows the batch upload and an explicit read of the loss; everything else after warm-up is
    a stall the user did not ask for.
    """

    def __init__(self) -> None:
        self._allowed = 0    # > 0 inside a batch upload or a loss read
        self._enforcing = 0  # > 0 inside a strict step after warm-up
        # One reusable (re-entrant) context object each: a step enters them every time.
        self._allow_context = _Count(self, "_allowed")
        self._enforce_context = _Count(self, "_enforcing")
        self.reset()

    @staticmethod
    def strict_default() -> bool:
        """Whether GPUFLOW_STRICT_TRANSFERS asks for strict mode."""
        return os.environ.get("GPUFLOW_STRICT_TRANSFERS", "") not in ("", "0")

    def reset(self) -> None:
        """Zero every counter."""
        self.h2d_calls = self.h2d_bytes = 0
        self.d2h_calls = self.d2h_bytes = 0
        self.syncs = 0

    def snapshot(self) -> dict[str, int]:
        """The counters as a dict."""
        return {"h2d_calls": self.h2d_calls, "h2d_bytes": self.h2d_bytes,
                "d2h_calls": self.d2h_calls, "d2h_bytes": self.d2h_bytes, "syncs": self.syncs}

    def allowed(self) -> "_Count":
        """Context in which strict mode lets transfers through (a batch upload, a loss read)."""
        return self._allow_context

    def enforcing(self) -> "_Count":
        """Context in which every transfer or sync not `allowed` raises (strict mode)."""
        return self._enforce_context

    def record(self, kind: str, nbytes: int, device: "Device", what: str) -> None:
        """Count one transfer or sync; in strict mode, refuse it unless allowed."""
        if self._enforcing and not self._allowed:
            raise TransferError(
                f"strict transfer mode: {kind} of {nbytes} bytes on {device.name} "
                f"({what}), outside a batch upload or loss read; this stalls a GPU training "
                "loop.\n"
                "help: keep values on the device, feed batches through Input.value or "
                "Graph.step, read the loss once per step, or turn strict mode off "
                "(GPUFLOW_STRICT_TRANSFERS=0).")
        if kind == "h2d":
            self.h2d_calls += 1
            self.h2d_bytes += nbytes
        elif kind == "d2h":
            self.d2h_calls += 1
            self.d2h_bytes += nbytes
        else:
            self.syncs += 1


class _Count:
    def __init__(self, ledger: TransferLedger, counter: str) -> None:
        self.ledger = ledger
        self.counter = counter

    def __enter__(self) -> None:
        setattr(self.ledger, self.counter, getattr(self.ledger, self.counter) + 1)

    def __exit__(self, *exc: object) -> None:
        setattr(self.ledger, self.counter, getattr(self.ledger, self.counter) - 1)


LEDGER = TransferLedger()


class Ops:
    """The array operations a training step makes, each able to write into an `out` array.

    The array API standard has no `out=`; NumPy, CuPy and torch do, and writing into buffers a
    node keeps from step to step (`Node.buffers`) is what makes a step allocation-free. Every
    function returns its result: `out` itself where the backend writes there, a new array
    where it cannot. `out` may be None (compute a new array). This generic version, used for
    libraries without `out=` (array_api_strict), ignores `out`; `writes_out` says which.

    Elementwise: add, subtract, multiply, divide, maximum (x1, x2, out=None); tanh, exp, log,
    sqrt (x, out=None); greater and equal (x1, x2, dtype, out=None) give 1 or 0 in `dtype`.
    Reductions of floating arrays: sum, max (x, axis=None, keepdims=False, out=None).
    matmul (x1, x2, out=None). `out` must have the result's shape and dtype.
    """

    writes_out = False

    def __init__(self, xp: Any) -> None:
        self.xp = xp

    def matmul(self, x1: Any, x2: Any, out: Any = None) -> Any:
        return x1 @ x2

    def add(self, x1: Any, x2: Any, out: Any = None) -> Any:
        return x1 + x2

    def subtract(self, x1: Any, x2: Any, out: Any = None) -> Any:
        return x1 - x2

    def multiply(self, x1: Any, x2: Any, out: Any = None) -> Any:
        return x1 * x2

    def divide(self, x1: Any, x2: Any, out: Any = None) -> Any:
        return x1 / x2

    def maximum(self, x1: Any, x2: Any, out: Any = None) -> Any:
        return self.xp.maximum(x1, x2)

    def tanh(self, x: Any, out: Any = None) -> Any:
        return self.xp.tanh(x)

    def exp(self, x: Any, out: Any = None) -> Any:
        return self.xp.exp(x)

    def log(self, x: Any, out: Any = None) -> Any:
        return self.xp.log(x)

    def sqrt(self, x: Any, out: Any = None) -> Any:
        return self.xp.sqrt(x)

    def greater(self, x1: Any, x2: Any, dtype: Any, out: Any = None) -> Any:
        return self.xp.astype(x1 > x2, dtype)

    def equal(self, x1: Any, x2: Any, dtype: Any, out: Any = None) -> Any:
        return self.xp.astype(x1 == x2, dtype)

    def sum(self, x: Any, axis: Any = None, keepdims: bool = False, out: Any = None) -> Any:
        return self.xp.sum(x, axis=axis, keepdims=keepdims)

    def max(self, x: Any, axis: Any = None, keepdims: bool = False, out: Any = None) -> Any:
        return self.xp.max(x, axis=axis, keepdims=keepdims)


class UfuncOps(Ops):
    """`Ops` for a NumPy-like library `lib` whose ufuncs and reductions take `out=` (NumPy,
    CuPy): its own functions, bound once."""

    writes_out = True

    def __init__(self, xp: Any, lib: Any) -> None:
        super().__init__(xp)
        self._lib = lib
        self.matmul, self.add, self.subtract = lib.matmul, lib.add, lib.subtract
        self.multiply, self.divide, self.maximum = lib.multiply, lib.divide, lib.maximum
        self.tanh, self.exp, self.log, self.sqrt = lib.tanh, lib.exp, lib.log, lib.sqrt

    def greater(self, x1: Any, x2: Any, dtype: Any, out: Any = None) -> Any:
        if out is None:
            return self._lib.greater(x1, x2).astype(dtype)
        return self._lib.greater(x1, x2, out=out)  # True/False written as 1/0 in out's dtype

    def equal(self, x1: Any, x2: Any, dtype: Any, out: Any = None) -> Any:
        if out is None:
            return self._lib.equal(x1, x2).astype(dtype)
        return self._lib.equal(x1, x2, out=out)

    def sum(self, x: Any, axis: Any = None, keepdims: bool = False, out: Any = None) -> Any:
        return self._lib.sum(x, axis=axis, keepdims=keepdims, out=out)

    def max(self, x: Any, axis: Any = None, keepdims: bool = False, out: Any = None) -> Any:
        return self._lib.amax(x, axis=axis, keepdims=keepdims, out=out)

    def stack(self, arrays: list, axis: int = 0, out: Any = None) -> Any:
        return self._lib.stack(arrays, axis=axis, out=out)

    def col2im(self, parts: list, kh: int, kw: int, sh: int, sw: int, out: Any) -> Any:
        """gpuflow.conv.col2im, adding each part in place into `out` (N, C, Hp, Wp)."""
        from .windows import col2im_in_place
        return col2im_in_place(parts, kw, sh, sw, out)



class Device:
    """One device of one array library: its namespace `xp`, its canonical `name`, and transfers.

    Subclasses (one per backend module) implement `_put`, `_to_host`, `owns`, `_synchronize`
    and `describe`; the module beside each gives `array_device_name`.
    """

    backend: str = ""
    is_gpu: bool = False

    def __init__(self, name: str, xp: Any, native: Any) -> None:
        self.name = name        # canonical spec, e.g. "cpu", "cuda:0", "torch:cpu"
        self.xp = xp            # array-API namespace (array-api-compat)
        self.native = native    # the library's own device object, passed as device=
        self._dtypes = {n: getattr(xp, n) for n in
                        ("float16", "bfloat16", "float32", "float64", "bool", "int8", "int16",
                         "int32", "int64", "uint8", "uint16", "uint32", "uint64")
                        if hasattr(xp, n)}
        self._seen_dtypes: dict[Any, Any] = {}
        self._floating: dict[Any, bool] = {}
        self.ops = self._make_ops()  # operations that can write into a node's buffers

    # -- buffers a node keeps across steps (see Ops and Node.buffers) -------------------------
    def _make_ops(self) -> Ops:
        return Ops(self.xp)

    def new_buffer(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """An uninitialised array on this device, for a node to write into step after step."""
        return self.xp.empty(shape, dtype=dtype, device=self.native)

    def memory_keys(self, value: Any) -> tuple:
        """Keys of the memory `value` may share with a node's buffer: the ids of the array,
        of the array it views (`base`) and of that one's base (NumPy's stride tricks view
        through a helper object). A buffer's own key is `memory_keys(buffer)[0]`."""
        base = getattr(value, "base", None)
        if base is None:
            return (id(value),)
        return (id(value), id(base), id(getattr(base, "base", None)))

    def __repr__(self) -> str:
        return f"gpuflow.Device({self.name!r})"

    def __str__(self) -> str:
        return self.name

    # -- dtypes --------------------------------------------------------------------------------
    def dtype(self, spec: Any) -> Any:
        """This namespace's dtype for a name ("float32"), a NumPy dtype or a namespace dtype."""
        if spec is None:
            return None
        try:  # a dtype seen before (NumPy's dtype.name is computed in Python: ~2 us)
            return self._seen_dtypes[spec]
        except (KeyError, TypeError):
            pass
        name = spec if isinstance(spec, str) else dtype_name(spec)
        try:
            found = self._dtypes[name]
        except KeyError:
            raise GraphError(
                f"unknown dtype {spec!r} for device {self.name}; "
                f"expected one of {sorted(self._dtypes)}.\nhelp: pass e.g. 'float32'.") from None
        try:
            self._seen_dtypes[spec] = found
        except TypeError:  # an unhashable spec: just not cached
            pass
        return found

    def is_floating(self, dtype: Any) -> bool:
        """Whether `dtype` is a real floating dtype (remembered per dtype: array-api-compat's
        isdtype costs microseconds, and every fed batch of labels asks)."""
        try:
            return self._floating[dtype]
        except KeyError:
            floating = self._floating[dtype] = self.xp.isdtype(dtype, "real floating")
            return floating
        except TypeError:  # an unhashable dtype: just not remembered
            return self.xp.isdtype(dtype, "real floating")

    # -- transfers -----------------------------------------------------------------------------
    def put(self, value: Any, dtype: Any = None, *, what: str = "array") -> Any:
        """`value` as an array on this device (a host array, list or scalar is copied here once).

        An array of another library or on another device is a `DeviceError`: it is never moved
        silently. `dtype` (optional) converts; `what` names the value in errors and the ledger.
        """
        if self.owns(value):
            if dtype is not None and value.dtype != dtype:
                value = self.xp.astype(value, dtype)
            return value
        self._refuse_foreign(value, what)
        return self._upload(_host_array(value, what), dtype, what)

    def _upload(self, host: Any, dtype: Any, what: str) -> Any:
        """A NumPy array copied onto this device (counted), in `dtype` if given."""
        out = self._put(host, dtype)
        if not self.is_host:
            LEDGER.record("h2d", host.nbytes, self, what)
        return out

    def place(self, value: Any, float_dtype: Any = None, keep_integers: bool = False, *,
              what: str = "array") -> Any:
        """`value` on this device, floating data in `float_dtype` (None keeps its own).

        Integer and boolean data become floating (`float_dtype`, else float64) unless
        `keep_integers` (labels). See `put` for what may be moved.
        """
        owned = self.owns(value)
        if owned:
            source = value.dtype
        else:
            self._refuse_foreign(value, what)
            value = _host_array(value, what)
            source = self.dtype(value.dtype)
        if self.is_floating(source):
            target = float_dtype if float_dtype is not None else source
        elif keep_integers:
            target = source
        else:
            target = float_dtype if float_dtype is not None else self._dtypes["float64"]
        if owned:
            return value if value.dtype == target else self.xp.astype(value, target)
        return self._upload(value, target, what)

    def _refuse_foreign(self, value: Any, what: str) -> None:
        foreign = foreign_device_name(value)
        if foreign is not None and foreign.startswith("an unknown library"):
            raise DeviceError(
                f"{what} is {type(value).__name__} from {foreign}, which gpuflow cannot place "
                f"on {self.name}.\nhelp: pass a NumPy array (e.g. numpy.asarray(value)).")
        if foreign is not None:
            raise DeviceError(
                f"{what} is an array on {foreign}, but the graph is on {self.name}.\n"
                f"help: pass a host (NumPy) array and gpuflow moves it once, or build the graph "
                f"with device={foreign!r}.")

    def to_host(self, value: Any, *, what: str = "array") -> Any:
        """`value` (an array on this device) as a NumPy array."""
        host = self._to_host(value)
        if not self.is_host:
            LEDGER.record("d2h", host.nbytes, self, what)
        return host

    def item(self, value: Any, *, what: str = "scalar") -> float:
        """A 0-d device array as a Python float: the one read that synchronises."""
        if isinstance(value, (int, float)):
            return float(value)
        return float(self.to_host(value, what=what))

    def synchronize(self, *, what: str = "synchronize") -> None:
        """Wait until queued work on this device has finished (a no-op on CPUs)."""
        if not self.is_host:
            LEDGER.record("sync", 0, self, what)
            self._synchronize()

    # -- library-specific ----------------------------------------------------------------------
    is_host = True   # arrays live in host memory NumPy can share: no copy counted

    def owns(self, value: Any) -> bool:
        """Whether `value` is an array of this library on this device."""
        raise NotImplementedError

    def scope(self) -> Any:
        """A context manager that makes this device current (CUDA); a no-op elsewhere."""
        return NULL_SCOPE

    def forbid_sync(self) -> Any:
        """A context manager in which the library itself refuses implicit synchronisation
        (CuPy's allow_synchronize(False)); a no-op where the library has no such switch."""
        return NULL_SCOPE

    def describe(self) -> str:
        """A one-line description: library version, device name, memory."""
        raise NotImplementedError

    def rng(self, seed: int) -> Any:
        """A seeded generator of random numbers on this device: `uniform(shape, dtype,
        out=None)` gives an array in [0, 1) here, without a host round trip. One seed gives
        the same numbers on the same device (not across libraries: each has its own stream)."""
        raise GraphError(f"device {self.name} has no random number generator.\n"
                         "help: implement Device.rng(seed) in its backend module.")

    def _put(self, host: Any, dtype: Any) -> Any:
        raise NotImplementedError

    def _to_host(self, value: Any) -> Any:
        raise NotImplementedError

    def _synchronize(self) -> None:
        pass


class _NullScope:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


NULL_SCOPE = _NullScope()


def dtype_name(dtype: Any) -> str:
    """'float32' for numpy.float32, numpy.dtype('float32'), torch.float32, strict's float32."""
    if isinstance(dtype, type):
        return dtype.__name__
    name = getattr(dtype, "name", None)
    return name if isinstance(name, str) else str(dtype).rsplit(".", 1)[-1]


def _host_array(value: Any, what: str) -> Any:
    """A NumPy array for a host value (NumPy array, list, Python scalar)."""
    from . import numpy as np_backend
    return np_backend.host_array(value, what)


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


def _loaded_backend(backend: str) -> Any:
    """The backend module if its library is already imported (never imports a library)."""
    import sys
    library = {"numpy": "numpy", "cupy": "cupy", "torch": "torch",
               "array_api_strict": "array_api_strict"}[backend]
    if library not in sys.modules:
        return None
    return importlib.import_module(f"{__name__}.{backend}")


# -- device specs -------------------------------------------------------------------------------
_CACHE: dict[str, Device] = {}


def parse_spec(spec: str) -> tuple[str, str]:
    """Split a spec into (backend, rest): 'cuda:1' -> ('cupy', '1'),
    'torch:cuda' -> ('torch', 'cuda')."""
    s = spec.strip()
    head, _, rest = s.partition(":")
    head = head.lower()
    if head in ("cpu", "numpy"):
        if head == "cpu" and rest:
            raise DeviceError(f"unknown device spec {spec!r}: 'cpu' takes no index.\n"
                              "help: pass 'cpu'.")
        return "numpy", rest
    if head in ("cuda", "gpu", "cupy"):
        return "cupy", rest
    if head in ("torch", "array_api_strict"):
        return head, rest
    raise DeviceError(
        f"unknown device spec {spec!r}.\n"
        "help: pass one of 'cpu', 'cuda', 'cuda:N', 'auto', 'numpy', 'cupy:N', 'torch:cpu', "
        "'torch:cuda:N', 'array_api_strict', 'array_api_strict:device1'.")


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
        found = (f"no CUDA device found for {spec!r}: tried CuPy" if backend == "cupy"
                 else f"device {spec or backend!r} needs {backend}")
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


def missing_library(name: str) -> Callable[[], str | None]:
    """An `import_problem` function for a backend: None if `name` imports, else the reason."""
    cache: list[str | None] = []

    def import_problem() -> str | None:
        if not cache:
            try:
                importlib.import_module(name)
                cache.append(None)
            except Exception as exc:  # noqa: BLE001 - keep any import failure as the reason
                cache.append(f"import {name} failed ({type(exc).__name__}: {exc})")
        return cache[0]
    return import_problem
