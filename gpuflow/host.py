"""Bringing values back to the host: `to_numpy` for any device's array."""

from __future__ import annotations

from typing import Any

from .backends import array_device, to_host
from .backends.numpy import host_array, host_copy


def to_numpy(x: Any) -> Any:
    """`x` as a NumPy array of your own, whatever device it is on (NumPy, CuPy, torch,
    array_api_strict, ...): a device array is copied to the host through its device's
    `to_host`; a NumPy array, NumPy or Python scalar or list comes back as `numpy.array(x)`
    would give it (a copy; a 0-d array for a scalar), so that the next step, which overwrites
    `node.value` and `node.gradients`, leaves it alone. Counted, and allowed also in strict
    transfer mode."""
    host = to_host(x, array_device(x), what="to_numpy", allowed=True)
    array = host_array(host, "to_numpy's argument")
    return array if host is not x else host_copy(array)  # a device's to_host is a new array
