"""JAX arrays: the 'jax' (JAX's default device), 'jax:cpu' and 'jax:gpu[:N]' devices.

JAX's arrays are immutable and its functions take no `out=`: the device uses the generic `Ops`
(`writes_out` False), declares `mutable_arrays = False`, and every node and optimizer uses what
an operation returns. The namespace is `jax.numpy`, which follows the array API standard since
JAX 0.4.32 (array-api-compat hands back `jax.numpy` itself for JAX arrays).

float64: JAX computes in float32 unless its `jax_enable_x64` flag is on. gpuflow turns the flag
on when it first makes a JAX device, so that float64 graphs (MiniFlow feeds, gradient checks)
are float64 on JAX as on NumPy; `Graph` still defaults to float32. The flag is process-wide:
other JAX code in the same process then sees 64-bit defaults too (`jnp.asarray(1.0)` is
float64), as `JAX_ENABLE_X64=1` would give.
"""

from __future__ import annotations

import time
from typing import Any

import numpy

from ..errors import DeviceError, GraphError
from .base import Device, HostClock, Ops, missing_library

EXAMPLE_SPECS = ("jax:cpu",)
import_problem = missing_library("jax")


class JaxRng:
    """Device-side uniform numbers from one JAX key, split at every call.

    `seed` is a Python int, or a traced integer: an argument of a compiled step
    (gpuflow/compiled.py threads each Dropout's seed through the step), which gives the same
    key as that int would."""

    def __init__(self, seed: Any, device: "JaxDevice") -> None:
        import jax
        self._random, self._tracer = jax.random, jax.core.Tracer
        self._device = device
        self._threaded = isinstance(seed, self._tracer)  # an argument of the compiled step
        with device.scope():
            self._key = jax.random.key(seed)

    def uniform(self, shape: tuple[int, ...], dtype: Any, out: Any = None) -> Any:
        """An array of `shape` in [0, 1) on the device, in `dtype` (`out` is ignored: JAX
        arrays are immutable)."""
        new_key, key = self._random.split(self._key)
        if isinstance(new_key, self._tracer) and not self._threaded:
            # Inside jax.jit a key made from a Python int would be a constant of the compiled
            # step: the same numbers at every step. Only a seed threaded through it is taken.
            raise GraphError(
                f"random numbers on {self._device.name} drawn inside a compiled step from a "
                "seed fixed when it was compiled would be the same at every step (compile_step "
                "threads Dropout's seeds only).\nhelp: train this graph with graph.step(...) "
                "and optimizer.step() instead of compile_step.")
        self._key = new_key
        with self._device.scope():
            return self._random.uniform(key, tuple(shape), dtype=self._device.dtype(dtype))


class JaxOps(Ops):
    """The generic `Ops` (JAX takes no `out=`), with JAX's own erf and scatter-add."""

    def __init__(self, xp: Any) -> None:
        import jax.scipy.special
        super().__init__(xp)
        self._erf = jax.scipy.special.erf

    def erf(self, x: Any, out: Any = None) -> Any:
        return self._erf(x)

    def scatter_add_rows(self, ids: Any, values: Any, rows: int, out: Any = None) -> Any:
        zeros = self.xp.zeros((rows, values.shape[1]), dtype=values.dtype, device=values.device)
        return zeros.at[ids].add(values)  # repeated ids add up


class JaxDevice(Device):
    """One JAX device (the CPU or one GPU)."""

    backend = "jax"
    mutable_arrays = False
    compiles_first_step = True  # XLA compiles each operation at its first shapes (seconds)

    def __init__(self, name: str, xp: Any, native: Any) -> None:
        import jax
        self._jax = jax
        super().__init__(name, xp, native)
        # numpy.dtype instances (what a JAX array's .dtype is): `array.dtype == dtype` holds.
        self._dtypes = {k: numpy.dtype(v) for k, v in self._dtypes.items()}
        self.is_gpu = native.platform == "gpu"
        self.is_host = native.platform == "cpu"
        self.index = native.id
        # XLA flushes subnormal results to zero (on the CPU as on GPUs): ask it once.
        with self.scope():
            tiny = self.xp.asarray(numpy.finfo(numpy.float32).tiny, device=native)
            self.flushes_subnormals = bool(self._to_host(tiny / 4) == 0)

    def _make_ops(self) -> Ops:
        return JaxOps(self.xp)

    def owns(self, value: Any) -> bool:
        if isinstance(value, self._jax.core.Tracer):  # inside this device's compiled step
            return True
        try:
            return isinstance(value, self._jax.Array) and value.device == self.native
        except (AttributeError, ValueError):  # a sharded array has no single device
            return False

    def scope(self) -> Any:
        return self._jax.default_device(self.native)

    def rng(self, seed: int) -> JaxRng:
        return JaxRng(seed, self)

    def jit(self, fn: Any) -> Any:
        return self._jax.jit(fn)

    def describe(self) -> str:
        jax = self._jax
        x64 = "on" if jax.config.jax_enable_x64 else "off"
        return (f"JAX {jax.__version__} on {self.native.platform}:{self.native.id} "
                f"({self.native.device_kind}), float64 {x64}")

    def _put(self, host: Any, dtype: Any) -> Any:
        # Our own host copy first: device_put may alias host memory on the CPU, and the caller
        # may reuse its array (a batch buffer) for the next batch. (jnp.array(..., device=)
        # would do the same through a traced conversion: ~100x slower per call.)
        private = numpy.array(host, dtype=dtype, copy=True)
        return self._jax.device_put(private, self.native)

    def _to_host(self, value: Any) -> Any:
        return numpy.array(value, copy=True)

    def profile_clock(self) -> "_JaxClock":
        return _JaxClock(self._synchronize)

    def _synchronize(self) -> None:
        # XLA runs one device's computations in order: waiting for a new one waits for all.
        self.xp.zeros((), device=self.native).block_until_ready()


class _JaxClock(HostClock):
    """XLA dispatches asynchronously, on the CPU too: a mark after timed work waits for the
    arrays that work made (`block_until_ready`: for those alone, not a new computation, which
    costs a dispatch of its own at every mark); a mark before it waits for nothing (the last
    mark waited), so the first node of a step also waits for the batch upload."""

    kind = "time.perf_counter after jax.block_until_ready of each node's results"

    def mark(self, results: Any = None) -> float:
        if results is not None:
            import jax
            jax.block_until_ready(results)
        return time.perf_counter()


def _enable_x64() -> None:
    """Turn on JAX's float64 (see the module docstring); a no-op once on."""
    import jax
    if not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)


def _name(native: Any) -> str:
    """The canonical spec of a JAX device: 'jax:cpu', 'jax:gpu:N'."""
    import jax
    if native.platform == "cpu":
        return "jax:cpu"
    return f"jax:{native.platform}:{jax.devices(native.platform).index(native)}"


def make_device(rest: str, spec: str) -> JaxDevice:
    """'jax' (JAX's default device), 'jax:cpu', 'jax:gpu', 'jax:gpu:N'."""
    import jax
    import jax.numpy as xp
    _enable_x64()
    kind, _, index = rest.lower().partition(":")
    if kind == "" and not index:
        native = jax.devices()[0]
        return JaxDevice(_name(native), xp, native)
    if kind == "cuda":
        kind = "gpu"
    if kind not in ("cpu", "gpu") or (kind == "cpu" and index not in ("", "0")):
        raise DeviceError(f"unknown device spec {spec!r}.\n"
                          "help: pass 'jax', 'jax:cpu', 'jax:gpu' or 'jax:gpu:N'.")
    try:
        devices = jax.devices(kind)
    except RuntimeError as exc:  # JAX: "Unknown backend: 'gpu' requested, but no platforms..."
        raise DeviceError(f"no {kind.upper()} device found for {spec!r}: JAX {jax.__version__} "
                          f"says: {exc}\nhelp: pass 'jax:cpu' or 'cpu', or install JAX with "
                          "GPU support (pip install 'jax[cuda12]') on a machine with an NVIDIA "
                          "GPU.") from None
    try:
        n = int(index) if index else 0
    except ValueError:
        raise DeviceError(f"unknown device spec {spec!r}: the GPU index must be an integer.\n"
                          "help: pass 'jax:gpu:0'.") from None
    if not 0 <= n < len(devices):
        raise DeviceError(f"no JAX {kind} device {n} for {spec!r}: JAX sees {len(devices)}.\n"
                          f"help: pass one of jax:{kind}:0 .. jax:{kind}:{len(devices) - 1}.")
    return JaxDevice(_name(devices[n]), xp, devices[n])


def rank_spec(rest: str, spec: str, local_rank: int) -> str | None:
    """'jax:gpu' -> 'jax:gpu:<local rank modulo the GPUs JAX sees>'."""
    if rest.lower() not in ("gpu", "cuda"):
        return None
    import jax
    try:
        count = len(jax.devices("gpu"))
    except RuntimeError:
        count = 0
    return f"{spec}:{local_rank % max(1, count)}"


def candidate_specs() -> list[str]:
    import jax
    try:
        gpus = len(jax.devices("gpu"))
    except RuntimeError:
        gpus = 0
    return ["jax:cpu"] + ([f"jax:gpu:{i}" for i in range(gpus)] or ["jax:gpu:0"])


def array_device_name(value: Any) -> str | None:
    """'jax:cpu' or 'jax:gpu:N' for a JAX array, None for anything else."""
    import jax
    if not isinstance(value, jax.Array):
        return None
    try:
        return _name(value.device)
    except (AttributeError, ValueError):
        return f"jax ({', '.join(sorted(str(d) for d in value.devices()))})"
