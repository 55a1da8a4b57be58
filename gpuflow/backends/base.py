"""The backend contract: what a backend module provides, and the `Device` and `Ops` it builds on.

A backend is one module `gpuflow/backends/<name>.py` plus one line in `REGISTRY`
(`gpuflow/backends/__init__.py`). The module provides:

- `import_problem() -> str | None`: None if its library imports, else why not (see
  `missing_library`). Called before anything else; never raises.
- `EXAMPLE_SPECS: tuple[str, ...]`: specs to show for it, the first in `gpuflow devices` when
  the library is missing.
- `make_device(rest: str, spec: str) -> Device`: the device for a spec whose head named this
  backend (`rest` is what follows the first ':', `spec` the whole string for messages);
  `DeviceError` with a `help:` line if this machine cannot provide it.
- `candidate_specs() -> list[str]`: the specs `gpuflow devices` tries (available or not).
- `array_device_name(value) -> str | None`: the canonical spec of the device holding `value`
  if it is this library's array, else None. Called only once the library is imported.
- optional `rank_spec(rest: str, spec: str, local_rank: int) -> str | None`: the spec of this
  rank's device for a spec without an index ('cuda' -> 'cuda:<local rank>'), None to keep it.

The `Device` subclass it makes answers every question code outside `gpuflow/backends/` may ask
about a library, so that nothing there imports one or switches on a backend's name:

- `xp` the array namespace (array API standard), `native` the library's device object,
  `name` the canonical spec, `backend` the registry name, `index` the library's device number
  (None where it has none), `ops` the operations of a training step (`Ops`, backends/ops.py:
  every op and optional route node code may call is declared there).
- capabilities: `ops.writes_out` (ops write into `out=` buffers), `mutable_arrays` (arrays can
  be updated in place: `x[...] = v`, `x *= a`), `is_host` (arrays live in host memory: no
  transfer counted), `is_gpu`, `supports_dlpack` (`xp.from_dlpack` takes other libraries'
  arrays), `collectives` (the name of device-side collectives, e.g. 'NCCL', or None: then
  distributed training sums through MPI on host memory), `flushes_subnormals` (results
  below the smallest normal number become 0, as XLA's do), `compiles_first_step` (the first
  step compiles: seconds, where later ones take milliseconds).
- transfers, all counted in `LEDGER`: `put` (any value onto this device), `feed` (`put` with
  the dtype rules of a fed Input), `to_host`, `item`, `synchronize`; `adopt` shares another
  library's array in this device's memory through DLPack (no copy, nothing counted).
- `rng(seed)`: device-side random numbers, a generator whose `uniform(shape, dtype, out=None)`
  gives an array on this device in [0, 1) without a host round trip, in any floating dtype
  the device has (float16 included, where a library draws only float32/float64).
- `communicator(mpi_comm)`, `collectives_problem()`, `identity()`: the device-side collectives
  when `collectives` is not None.
- `jit(fn)`: a pure function of arrays compiled by the library (`jax.jit`), or None where it
  has no compiler; `gpuflow.compiled.compile_step` builds a whole training step on it.
- `profile_clock()`: how gpuflow's profiler (gpuflow/profiler.py) times work on this device
  (`HostClock` here; CUDA events in the CuPy and torch backends).
- `scope()`, `forbid_sync()`, `quiet_float_errors()`, `describe()`, `new_buffer()`, `memory_keys()`, `dtype()`,
  `is_floating()`, `owns()`.

A subclass implements `owns`, `describe`, `_put`, `_to_host` (and `_synchronize` where the
library queues work), and overrides a capability where its library differs from the defaults
below. See docs/backends.md for a worked example (JAX).
"""

from __future__ import annotations

import importlib
import time
from typing import Any, Callable

from ..errors import DeviceError, GraphError
from .ledger import LEDGER
from .ops import OP_NAMES, Ops, UfuncOps  # noqa: F401 (the contract's ops, re-exported)


class _NullScope:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


NULL_SCOPE = _NullScope()


class Device:
    """One device of one array library: its namespace `xp`, its canonical `name`, transfers and
    capabilities (see the module docstring for the whole contract)."""

    backend: str = ""              # the registry name, e.g. "numpy", "cupy", "jax"
    is_gpu: bool = False           # a GPU (for messages and 'auto'; capabilities say the rest)
    is_host: bool = True           # arrays live in host memory NumPy can share: no copy counted
    mutable_arrays: bool = True    # x[...] = v and x *= a update x (False: JAX)
    supports_dlpack: bool = True   # xp.from_dlpack takes another library's array
    # False where DLPack's device type/id does not tell this device apart (array_api_strict's
    # simulated device1/device2 report host memory): its arrays are neither adopted nor adopt.
    dlpack_tells_apart: bool = True
    collectives: str | None = None  # device-side collectives (e.g. "NCCL"), None: MPI on host
    index: int | None = None       # the library's device number, None where it has none
    flushes_subnormals: bool = False  # results below the smallest normal number become 0 (XLA)
    # The first step compiles (JAX: XLA compiles every operation at its first shapes, seconds
    # where later steps take milliseconds): a command says so before it, not a bar stuck at 0%.
    compiles_first_step: bool = False

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

    def __repr__(self) -> str:
        return f"gpuflow.Device({self.name!r})"

    def __str__(self) -> str:
        return self.name

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
        """`value` as an array on this device, in `dtype` if given (else its own dtype).

        The one way a value moves to a device: a host array, list or scalar is copied here
        once (counted in `LEDGER`); this device's own array is returned as it is (converted if
        `dtype` differs), and so is another library's array in this device's memory (`adopt`,
        DLPack). An array on another device is a `DeviceError`: it is never moved silently.
        `what` names the value in errors and the ledger.
        """
        if not self.owns(value):
            value = self.adopt(value, what=what)
        if self.owns(value):
            if dtype is not None and value.dtype != dtype:
                value = self.xp.astype(value, dtype)
            return value
        self._refuse_foreign(value, what)
        return self._upload(_host_array(value, what), dtype, what)

    def feed(self, value: Any, float_dtype: Any = None, keep_integers: bool = False, *,
             what: str = "array") -> Any:
        """`put` with the dtype rules of a fed Input: floating data in `float_dtype` (None keeps
        its own), integer and boolean data made floating (`float_dtype`, else float64) unless
        `keep_integers` (labels)."""
        owned = self.owns(value)
        if not owned:
            value = self.adopt(value, what=what)
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

    def adopt(self, value: Any, *, what: str = "array") -> Any:
        """Another library's array in this device's memory as this device's array, without a
        copy (DLPack: `xp.from_dlpack`; nothing is counted in `LEDGER`). `value` itself for
        anything else: a list or scalar, an array on another device, a NumPy array for a device
        that is not host memory (an upload, counted). A torch CPU tensor fed to a 'cpu' graph,
        a NumPy array fed to 'jax:cpu', a torch CUDA tensor fed to 'cuda:0' are shared. A NumPy
        masked array is never shared (DLPack drops the mask): the host checks refuse it; complex
        data is a GraphError as on the host. JAX shares host memory only when it is 64-byte
        aligned and copies the rest inside `from_dlpack`: a host-to-host copy, which the ledger
        does not count (no more than any NumPy upload to a host device)."""
        if (not self.supports_dlpack or not self.dlpack_tells_apart
                or (_is_numpy(value) and (not self.is_host or not self.mutable_arrays))):
            # A NumPy array is the caller's to reuse (a batch buffer): a device whose arrays
            # are immutable (JAX) must not see it change, so it gets its own copy (an upload).
            return value
        if not _is_numpy(value) and not _dlpack_tells_apart(value):
            return value  # e.g. an array_api_strict device1 array: refused as on another device
        if _is_numpy(value):
            # The host checks first: a masked array is refused (DLPack would drop its mask),
            # and so are complex and non-numeric arrays, exactly as for an upload.
            _host_array(value, what)
        where = getattr(value, "__dlpack_device__", None)
        if where is None:
            return value
        try:
            same = tuple(int(x) for x in where()) == self._dlpack_place()
        except Exception:  # noqa: BLE001 - a library without a usable DLPack: not shared
            return value
        if not same:
            return value
        try:
            shared = self.xp.from_dlpack(value)
        except Exception as exc:  # noqa: BLE001 - BufferError, RuntimeError: the library's
            if _is_numpy(value):  # a read-only NumPy array: uploaded (a copy) as before
                return value
            raise DeviceError(
                f"{what} is a {type(value).__module__}.{type(value).__name__} in the memory of "
                f"{self.name}, but it cannot be shared through DLPack ({exc}).\nhelp: pass "
                "value.detach() (torch) or a NumPy array.") from None
        if not self.xp.isdtype(shared.dtype, ("bool", "integral", "real floating")):
            # Complex data (a torch complex tensor): refused as a host feed is, never cast.
            raise GraphError(f"{what} has dtype {dtype_name(shared.dtype)}, not numbers.\n"
                             "help: feed a float (or integer label) NumPy array.")
        return shared if self.owns(shared) else value

    def in_host_memory(self) -> bool:
        """Whether this device's arrays are in host memory as DLPack sees it (kDLCPU), even if
        gpuflow counts them as a device (array_api_strict): a shared feed is then readable."""
        return self.supports_dlpack and self._dlpack_place()[0] == 1

    def _dlpack_place(self) -> tuple[int, int]:
        """This device as DLPack's (device type, device id), e.g. (1, 0) for host memory."""
        place = getattr(self, "_dlpack", None)
        if place is None:
            probe = self.xp.empty((0,), device=self.native)
            place = self._dlpack = tuple(int(x) for x in probe.__dlpack_device__())
        return place

    def _upload(self, host: Any, dtype: Any, what: str) -> Any:
        """A NumPy array copied onto this device (counted), in `dtype` if given."""
        out = self._put(host, dtype)
        if not self.is_host:
            LEDGER.record("h2d", host.nbytes, self, what)
        return out

    def _refuse_foreign(self, value: Any, what: str) -> None:
        from . import foreign_device_name
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
        """`value` (an array on this device) as a NumPy array (a copy, never the live array)."""
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

    # -- random numbers ------------------------------------------------------------------------
    def rng(self, seed: int) -> Any:
        """A seeded generator of random numbers on this device: `uniform(shape, dtype,
        out=None)` gives an array in [0, 1) here, without a host round trip. One seed gives
        the same numbers on the same device (not across libraries: each has its own stream)."""
        raise GraphError(f"device {self.name} has no random number generator.\n"
                         "help: implement Device.rng(seed) in its backend module.")

    # -- compilation ---------------------------------------------------------------------------
    def jit(self, fn: Callable[..., Any]) -> "Callable[..., Any] | None":
        """`fn` (a pure function of arrays, lists and dicts of them, and Python numbers)
        compiled by the library, or None where it has no compiler. `gpuflow.compiled` uses it
        to run a whole training step as one computation."""
        return None

    # -- collectives (distributed training) ----------------------------------------------------
    def collectives_problem(self) -> str | None:
        """None if this device's own collectives (`collectives`) can be used in this process,
        else why not."""
        return "the backend has no device-side collectives" if self.collectives is None else None

    def communicator(self, mpi_comm: Any) -> Any:
        """A communicator summing and broadcasting this device's arrays without the host
        (`allreduce_sum(x, what=)`, `broadcast(x, root, what=)`, `name`), set up over
        `mpi_comm` (mpi4py). Only where `collectives` is not None."""
        raise NotImplementedError(f"{self.name} has no device-side collectives")

    def identity(self) -> str:
        """What identifies the hardware across processes (two ranks that see one GPU under two
        indices get the same answer): a PCI bus id where the library gives one, else `name`."""
        return self.name

    # -- profiling ---------------------------------------------------------------------------------
    def profile_clock(self) -> "HostClock":
        """A clock for the profiler (`Graph.profile`): `mark(results=None)` a point after the
        work queued so far (`results`: the arrays the work just timed made, where a library
        can wait for those alone), `seconds(start, end)` between two marks once `wait()` has
        returned. Here: wait for
        the device where it queues work, then read time.perf_counter; GPU backends record
        events instead, which wait for nothing. Only the profiler makes one: a normal step
        times nothing. Its waits are not counted in LEDGER (they exist only while profiling)."""
        return HostClock(None if self.is_host else self._synchronize)

    # -- library-specific ----------------------------------------------------------------------
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

    def quiet_float_errors(self) -> Any:
        """A context manager in which the library does not warn about overflow, invalid
        operations or division by zero (NumPy's errstate): where a check reports the first
        NaN/Inf itself (Graph(check_finite=True)), warnings before it would only bury it. A
        no-op where the library does not warn."""
        return NULL_SCOPE

    def describe(self) -> str:
        """A one-line description: library version, device name, memory."""
        raise NotImplementedError

    def _put(self, host: Any, dtype: Any) -> Any:
        """A NumPy array `host` as a new array on this device, in `dtype` if given."""
        raise NotImplementedError

    def _to_host(self, value: Any) -> Any:
        """This device's array as a new NumPy array."""
        raise NotImplementedError

    def _synchronize(self) -> None:
        pass


class HostClock:
    """`Device.profile_clock()` on devices without events: each mark waits for the device's
    queued work (`wait`, None where nothing is queued) and reads time.perf_counter."""

    kind = "time.perf_counter after the device's synchronise"

    def __init__(self, wait: "Callable[[], None] | None") -> None:
        self._wait = wait

    def mark(self, results: Any = None) -> float:
        if self._wait is not None:
            self._wait()
        return time.perf_counter()

    def wait(self) -> None:
        if self._wait is not None:
            self._wait()

    @staticmethod
    def seconds(start: float, end: float) -> float:
        return end - start


def dtype_name(dtype: Any) -> str:
    """'float32' for numpy.float32, numpy.dtype('float32'), torch.float32, strict's float32."""
    if isinstance(dtype, type):
        return dtype.__name__
    name = getattr(dtype, "name", None)
    return name if isinstance(name, str) else str(dtype).rsplit(".", 1)[-1]


def _dlpack_tells_apart(value: Any) -> bool:
    """Whether DLPack's device of `value` (an array of a backend library) is its real one."""
    from . import foreign_device_name, get_device
    spec = foreign_device_name(value)
    if spec is None or spec.startswith("an unknown library"):
        return True
    try:
        return get_device(spec).dlpack_tells_apart
    except Exception:  # noqa: BLE001 - a device gpuflow cannot make: nothing to share with
        return False


def _is_numpy(value: Any) -> bool:
    from . import numpy as np_backend
    return np_backend.is_host_value(value)


def _host_array(value: Any, what: str) -> Any:
    """A NumPy array for a host value (NumPy array, list, Python scalar)."""
    from . import numpy as np_backend
    return np_backend.host_array(value, what)


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
