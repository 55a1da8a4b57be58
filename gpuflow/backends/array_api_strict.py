"""array_api_strict: a CPU library that allows only the array API standard.

It has three devices, 'CPU_DEVICE', 'device1' and 'device2', and refuses to combine arrays from two
of them or to hand a non-CPU array to NumPy: the test suite uses 'device1' to catch code that
calls a non-standard function or creates an array on the wrong device.
"""

from __future__ import annotations

from typing import Any

from ..errors import DeviceError
from .base import Device, dtype_name, missing_library
from .ledger import LEDGER

EXAMPLE_SPECS = ("array_api_strict", "array_api_strict:device1")
import_problem = missing_library("array_api_strict")
_NAMES = {"": "CPU_DEVICE", "cpu": "CPU_DEVICE", "cpu_device": "CPU_DEVICE",
          "device1": "device1", "device2": "device2"}


class StrictDevice(Device):
    """One of array_api_strict's devices."""

    backend = "array_api_strict"

    def __init__(self, name: str, xp: Any, native: Any) -> None:
        super().__init__(name, xp, native)
        # Only CPU_DEVICE arrays convert to NumPy; the others count as real transfers.
        self.is_host = False
        # device1/device2 are simulated in host memory: DLPack says "CPU" for them too.
        self.dlpack_tells_apart = name == "array_api_strict"

    def owns(self, value: Any) -> bool:
        return _is_strict_array(value) and value.device == self.native

    def describe(self) -> str:
        return f"array_api_strict {self.xp.__version__}, {self.native}"

    def forbid_sync(self) -> "_CountedReads":
        """Strict mode's guard: a Python number read from one of this device's arrays inside
        a node (`float(x)`, `int(x)`, `bool(x)` as in `if x:`, `complex(x)`, an index) is
        counted as a device-to-host copy, so strict mode refuses it (TransferError naming the
        node), as a GPU would stall on it; the way to find such reads on a CPU machine."""
        return _CountedReads(self)

    def rng(self, seed: int) -> "_StrictRng":
        return _StrictRng(seed, self)

    def quiet_float_errors(self) -> Any:
        from .numpy import quiet_float_errors  # its arrays compute through NumPy
        return quiet_float_errors()

    def _put(self, host: Any, dtype: Any) -> Any:
        return self.xp.asarray(host, dtype=dtype, device=self.native)

    def _to_host(self, value: Any) -> Any:
        import numpy
        return numpy.array(value.to_device(self.xp.Device("CPU_DEVICE")), copy=True)


def make_device(rest: str, spec: str) -> StrictDevice:
    """'array_api_strict', 'array_api_strict:device1' or ':device2'."""
    import array_api_strict
    native = _NAMES.get(rest.lower())
    if native is None:
        raise DeviceError(f"unknown device spec {spec!r}: array_api_strict has the devices "
                          "CPU_DEVICE, device1 and device2.\n"
                          "help: pass 'array_api_strict' or 'array_api_strict:device1'.")
    name = "array_api_strict" if native == "CPU_DEVICE" else f"array_api_strict:{native}"
    return StrictDevice(name, array_api_strict, array_api_strict.Device(native))


def candidate_specs() -> list[str]:
    return ["array_api_strict", "array_api_strict:device1", "array_api_strict:device2"]


def array_device_name(value: Any) -> str | None:
    """The spec of an array_api_strict array's device, None for anything else."""
    if not _is_strict_array(value):
        return None
    native = str(getattr(value.device, "_device", value.device))
    return "array_api_strict" if "CPU_DEVICE" in native else f"array_api_strict:{native}"


def _is_strict_array(value: Any) -> bool:
    return type(value).__module__.startswith("array_api_strict")


# The Array methods that turn an array into a Python number: each a read of the device's memory.
_READS = ("__float__", "__int__", "__bool__", "__complex__", "__index__")


class _CountedReads:
    """Within it, array_api_strict's Array counts a number read from an array of `device` in
    the transfer ledger (the methods are wrapped on entry and put back on exit; re-entrant)."""

    _depth = 0
    _saved: dict[str, Any] = {}

    def __init__(self, device: StrictDevice) -> None:
        self.device = device

    def __enter__(self) -> None:
        cls, array = type(self), type(self.device.xp.asarray(0))
        if cls._depth == 0:
            cls._saved = {name: getattr(array, name) for name in _READS}
            for name, method in cls._saved.items():
                setattr(array, name, _counted(name, method, self.device))
        cls._depth += 1

    def __exit__(self, *exc: object) -> None:
        cls = type(self)
        cls._depth -= 1
        if cls._depth == 0:
            array = type(self.device.xp.asarray(0))
            for name, method in cls._saved.items():
                setattr(array, name, method)


def _counted(name: str, method: Any, device: StrictDevice) -> Any:
    """`method` of Array, first recording a read of an array of `device` in the ledger."""
    import numpy

    def read(value: Any, *args: Any) -> Any:
        if value.device == device.native:
            nbytes = numpy.dtype(dtype_name(value.dtype)).itemsize * int(value.size or 0)
            LEDGER.record("d2h", nbytes, device, f"{name.strip('_')}() of an array")
        return method(value, *args)

    read.__name__ = name
    return read


class _StrictRng:
    """NumPy's generator, its numbers made arrays of this device: the standard has no random
    functions, and array_api_strict keeps every device's arrays in host memory anyway (so no
    transfer is counted). The same seed gives the same numbers as on the 'cpu' device."""

    def __init__(self, seed: int, device: StrictDevice) -> None:
        from .numpy import HostRng
        self._host = HostRng(seed)
        self._device = device

    def uniform(self, shape: tuple[int, ...], dtype: Any, out: Any = None) -> Any:
        """Uniform numbers in [0, 1) of `shape` and `dtype` on the device (`out` is ignored)."""
        host = self._host.uniform(shape, dtype_name(dtype))
        return self._device.xp.asarray(host, dtype=dtype, device=self._device.native)

