"""CuPy on NVIDIA GPUs: the 'cuda', 'cuda:N', 'cupy' and 'cupy:N' devices."""

from __future__ import annotations

from typing import Any

from ..errors import DeviceError
from .base import Device, Ops, UfuncOps, missing_library

EXAMPLE_SPECS = ("cuda:0",)
import_problem = missing_library("cupy")


class CupyDevice(Device):
    """One CUDA GPU, through CuPy."""

    backend = "cupy"
    is_gpu = True
    is_host = False
    collectives = "NCCL"

    def __init__(self, name: str, xp: Any, index: int) -> None:
        import cupy
        self._cupy = cupy  # before Device.__init__, which makes the ops
        super().__init__(name, xp, cupy.cuda.Device(index))
        self.index = index

    def _make_ops(self) -> Ops:
        cp = self._cupy  # CuPy's own functions, bound as they are: they take out= as NumPy's
        return UfuncOps(self.xp, cp, routes={
            "matmul": cp.matmul, "add": cp.add, "subtract": cp.subtract,
            "multiply": cp.multiply, "divide": cp.divide, "maximum": cp.maximum,
            "tanh": cp.tanh, "exp": cp.exp, "log": cp.log, "sqrt": cp.sqrt})

    def new_buffer(self, shape: tuple[int, ...], dtype: Any) -> Any:
        with self.native:
            return self._cupy.empty(shape, dtype=dtype)

    def owns(self, value: Any) -> bool:
        return isinstance(value, self._cupy.ndarray) and value.device.id == self.index

    def scope(self) -> Any:
        return self.native  # cupy.cuda.Device is a context manager that makes it current

    def forbid_sync(self) -> Any:
        # cupyx.allow_synchronize is deprecated since CuPy 10 and may be gone: then the ledger
        # alone guards (it sees every transfer that goes through gpuflow).
        import warnings

        import cupyx
        allow = getattr(cupyx, "allow_synchronize", None)
        if allow is None:
            return super().forbid_sync()
        return _QuietForbid(allow, warnings)

    def collectives_problem(self) -> str | None:
        from .cupy_nccl import nccl_problem
        return nccl_problem()

    def communicator(self, mpi_comm: Any) -> Any:
        from .cupy_nccl import NcclCommunicator
        return NcclCommunicator(mpi_comm, self)

    def identity(self) -> str:
        # The PCI bus id: the same GPU seen as cuda:0 by two ranks is one GPU.
        try:
            return str(self._cupy.cuda.runtime.deviceGetPCIBusId(self.index))
        except Exception:  # noqa: BLE001 - no such call in this CuPy: the name will do
            return self.name

    def describe(self) -> str:
        cupy = self._cupy
        props = cupy.cuda.runtime.getDeviceProperties(self.index)
        gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        free, total = self.native.mem_info
        cuda = cupy.cuda.runtime.runtimeGetVersion()
        return (f"CuPy {cupy.__version__} (CUDA runtime {cuda // 1000}.{cuda % 1000 // 10}), "
                f"GPU {self.index}: {gpu}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)")

    def rng(self, seed: int) -> "_CupyRng":
        return _CupyRng(seed, self)

    def _put(self, host: Any, dtype: Any) -> Any:
        with self.native:
            return self._cupy.asarray(host, dtype=dtype)

    def _to_host(self, value: Any) -> Any:
        return self._cupy.asnumpy(value)

    def _synchronize(self) -> None:
        self.native.synchronize()

    def profile_clock(self) -> "_CupyEvents":
        return _CupyEvents(self)


class _CupyEvents:
    """`profile_clock()` on a GPU: CUDA events recorded on the current stream (a mark waits
    for nothing; `wait()` synchronises once, before `seconds` reads them)."""

    kind = "CUDA events (cupy.cuda.Event)"

    def __init__(self, device: CupyDevice) -> None:
        self._cuda, self._device = device._cupy.cuda, device.native

    def mark(self, results: Any = None) -> Any:
        event = self._cuda.Event()
        event.record()
        return event

    def wait(self) -> None:
        self._device.synchronize()

    def seconds(self, start: Any, end: Any) -> float:
        return self._cuda.get_elapsed_time(start, end) / 1e3


class _CupyRng:
    """CuPy's generator on one GPU: `uniform(shape, dtype, out=None)` in [0, 1) there, with no
    host round trip (its numbers differ from NumPy's for the same seed)."""

    def __init__(self, seed: int, device: CupyDevice) -> None:
        self._device, self._cupy = device.native, device._cupy
        with self._device:
            self._generator = device._cupy.random.default_rng(seed)

    def uniform(self, shape: tuple[int, ...], dtype: Any, out: Any = None) -> Any:
        """Uniform numbers in [0, 1) of `shape` and `dtype`, into `out` if given (float16 from
        float32 numbers, as on 'cpu': CuPy draws only float32 and float64)."""
        cupy = self._cupy
        with self._device:
            if cupy.dtype(dtype) in (cupy.float32, cupy.float64):
                return self._generator.random(tuple(shape), dtype=dtype, out=out)
            from .numpy import below_one
            return below_one(cupy, self._generator.random(tuple(shape), dtype=cupy.float32),
                             dtype, out)


class _QuietForbid:
    """cupyx.allow_synchronize(False), without its deprecation warning at every step."""

    def __init__(self, allow: Any, warnings: Any) -> None:
        self._context = allow(False)
        self._warnings = warnings

    def __enter__(self) -> None:
        with self._warnings.catch_warnings():
            self._warnings.simplefilter("ignore")
            self._context.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self._context.__exit__(*exc)


def gpu_count() -> tuple[int, str]:
    """(number of GPUs CuPy sees, why none when it is 0)."""
    import cupy
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError, or a driver library missing
        return 0, f"CuPy {cupy.__version__} is installed but found no CUDA driver/GPU ({exc})"
    if count == 0:
        return 0, f"CuPy {cupy.__version__} is installed but sees 0 CUDA GPUs"
    return count, ""


def make_device(rest: str, spec: str) -> CupyDevice:
    """'cuda', 'cuda:N', 'cupy', 'cupy:N'."""
    import array_api_compat.cupy as xp
    try:
        index = int(rest) if rest else 0
    except ValueError:
        raise DeviceError(f"unknown device spec {spec!r}: the GPU index must be an integer.\n"
                          "help: pass 'cuda' or 'cuda:0'.") from None
    count, why = gpu_count()
    if count == 0:
        raise DeviceError(f"no CUDA device found for {spec!r}: {why}.\n"
                          "help: pass device='cpu' (or 'auto' to use a GPU only when there is "
                          "one), or run on a machine with an NVIDIA GPU and driver.")
    if not 0 <= index < count:
        raise DeviceError(f"no CUDA device {index} for {spec!r}: this machine has {count} GPU(s) "
                          f"(cuda:0 .. cuda:{count - 1}).\nhelp: pass one of those.")
    return CupyDevice(f"cuda:{index}", xp, index)


def rank_spec(rest: str, spec: str, local_rank: int) -> str | None:
    """'cuda' -> 'cuda:<local rank>', modulo the GPUs CuPy sees: with one GPU per rank
    (CUDA_VISIBLE_DEVICES set per rank, as srun --gpus-per-task does) each sees its own as 0."""
    return None if rest else f"{spec}:{local_rank % max(1, gpu_count()[0])}"


def candidate_specs() -> list[str]:
    count, _ = gpu_count()
    return [f"cuda:{i}" for i in range(count)] or ["cuda:0"]


def array_device_name(value: Any) -> str | None:
    """'cuda:N' for a CuPy array, None for anything else."""
    import cupy
    return f"cuda:{value.device.id}" if isinstance(value, cupy.ndarray) else None
