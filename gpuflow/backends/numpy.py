"""NumPy on the CPU: the 'cpu' / 'numpy' device, and the host side of every transfer."""

from __future__ import annotations

from typing import Any

import array_api_compat
import array_api_compat.numpy as xp
import numpy

from ..errors import DeviceError, GraphError
from . import Device, missing_library

EXAMPLE_SPECS = ("cpu",)
import_problem = missing_library("numpy")


class NumpyDevice(Device):
    """The CPU, through NumPy."""

    backend = "numpy"

    def owns(self, value: Any) -> bool:
        # Only plain numeric arrays: an object or string array must go through host_array's
        # check, and a subclass (np.matrix, where * is a matrix product; a masked array) is
        # converted or refused there.
        return ((type(value) is numpy.ndarray or isinstance(value, numpy.generic))
                and value.dtype.kind in "biuf")

    def describe(self) -> str:
        return f"NumPy {numpy.__version__} on the CPU"

    def _put(self, host: Any, dtype: Any) -> Any:
        return host if dtype is None or host.dtype == dtype else host.astype(dtype)

    def _to_host(self, value: Any) -> Any:
        return numpy.asarray(value)


def make_device(rest: str, spec: str) -> NumpyDevice:
    """'cpu', 'numpy' or 'numpy:cpu'."""
    if rest.lower() not in ("", "cpu"):
        raise DeviceError(f"unknown device spec {spec!r}: NumPy has only the CPU.\n"
                          "help: pass 'cpu'.")
    return NumpyDevice("cpu", xp, "cpu")


def candidate_specs() -> list[str]:
    return ["cpu"]


def array_device_name(value: Any) -> str | None:
    """'cpu' for a NumPy array, None for anything else."""
    return "cpu" if array_api_compat.is_numpy_array(value) else None


def is_host_value(value: Any) -> bool:
    """Whether `value` is a host value: a NumPy array or scalar, a Python scalar or list.

    None and strings count too, so that `host_array` reports them as what they are.
    """
    return value is None or isinstance(
        value, (numpy.ndarray, numpy.generic, int, float, bool, list, tuple, str, bytes))


def host_array(value: Any, what: str) -> numpy.ndarray:
    """`value` as a NumPy array; GraphError if it is not numeric data."""
    if value is None:
        raise GraphError(f"{what} is None.\nhelp: feed an array (or set .value) first.")
    if isinstance(value, numpy.ma.MaskedArray):
        raise GraphError(f"{what} is a masked array; gpuflow would ignore its mask.\n"
                         "help: feed value.filled(fill_value) or drop the masked rows.")
    try:
        array = numpy.asarray(value)
    except (ValueError, TypeError) as exc:
        raise GraphError(f"{what} cannot be made into an array: {exc}.\n"
                         "help: feed a rectangular NumPy array or list of numbers.") from None
    if array.dtype.kind not in "biuf":
        raise GraphError(f"{what} has dtype {array.dtype}, not numbers.\n"
                         "help: feed a float (or integer label) NumPy array.")
    return array


def host_range(value: Any) -> tuple[Any, Any]:
    """(min, max) of a non-empty host array."""
    return value.min(), value.max()


def host_rng(seed: int | None) -> numpy.random.Generator:
    """The seeded host generator that initial weights are drawn from on every device."""
    return numpy.random.default_rng(seed)


def host_zeros(shape: tuple[int, ...]) -> numpy.ndarray:
    """A float64 host array of zeros."""
    return numpy.zeros(shape)
