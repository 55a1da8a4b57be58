"""Bringing values back to the host: `to_numpy` for any device's array."""

from __future__ import annotations

from typing import Any

from .backends import LEDGER, foreign_device_name, get_device
from .backends.numpy import host_array, host_copy


def to_numpy(x: Any) -> Any:
    """`x` as a NumPy array of your own, whatever device it is on (NumPy, CuPy, torch,
    array_api_strict, ...): a device array is copied to the host through its device's
    `to_host`; a NumPy array, NumPy or Python scalar or list comes back as `numpy.array(x)`
    would give it (a copy; a 0-d array for a scalar), so that the next step, which overwrites
    `node.value` and `node.gradients`, leaves it alone. Counted, and allowed also in strict
    transfer mode."""
    name = foreign_device_name(x)
    if name is None or name.startswith("an unknown library"):
        return host_copy(host_array(x, "to_numpy's argument"))
    device = get_device(name)
    with LEDGER.allowed():
        host = host_array(device.to_host(x, what="to_numpy"), "to_numpy's argument")
    return host_copy(host) if device.is_host else host  # a host device may share memory
