"""Device parametrization: every test that takes `device` runs on every device spec.

The default set lists every backend, available or not, so the skips (with their reasons) show
in the report. GPUFLOW_TEST_DEVICES=spec,spec replaces the set (e.g. 'cpu,cuda').
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import gpuflow as gf

DEFAULT_SPECS = ["cpu", "array_api_strict", "array_api_strict:device1", "torch:cpu", "jax:cpu",
                 "cuda"]


def device_specs() -> list[str]:
    """The specs under test: GPUFLOW_TEST_DEVICES if set, else DEFAULT_SPECS."""
    env = os.environ.get("GPUFLOW_TEST_DEVICES", "")
    specs = [s.strip() for s in env.split(",") if s.strip()]
    return specs or DEFAULT_SPECS


@pytest.fixture(params=device_specs())
def device(request: pytest.FixtureRequest) -> gf.Device:
    """A gpuflow Device for each spec under test; unavailable ones are skipped with the reason."""
    try:
        return gf.get_device(request.param)
    except gf.DeviceError as exc:
        pytest.skip(f"{request.param} unavailable: {str(exc).splitlines()[0]}")


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**changes: str) -> dict[str, str]:
    """This environment for a child Python: the repo first on PYTHONPATH (keeping the rest,
    e.g. a --target folder of wheels), without GPUFLOW_* settings, plus `changes`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    env.update(changes)
    return env


def host(device: gf.Device, value) -> np.ndarray:
    """A device array (or Python scalar) as a float64-or-native NumPy array."""
    if isinstance(value, (int, float)):
        return np.asarray(value)
    return np.asarray(device.to_host(value))


def central_difference(node: gf.Node, x0: np.ndarray, loss, device: gf.Device, *,
                       entries=None, h: float = 1e-6) -> np.ndarray:
    """(f(x + h) - f(x - h)) / 2h for each entry of `node`'s value (all, or `entries`), where
    f is the scalar `loss()` with `node.value` set to the perturbed host array `x`; `node` is
    left at `x0`. Entries not asked for stay 0."""
    numeric = np.zeros_like(x0)
    for i in np.ndindex(*x0.shape) if entries is None else entries:
        for sign in (1.0, -1.0):
            x = x0.copy()
            x[i] += sign * h
            node.value = x
            numeric[i] += sign * float(host(device, loss()))
        numeric[i] /= 2 * h
    node.value = x0
    return numeric


class Project(gf.Node):
    """sum(node * R): a scalar loss from any node, R a fixed random upstream gradient."""

    is_loss = True

    def __init__(self, node: gf.Node, R: gf.Node):
        gf.Node.__init__(self, [node, R])

    def forward(self) -> None:
        a, R = self.inbound_nodes
        self.value = self.xp.sum(a.value * R.value)

    def backward(self) -> None:
        g = self.upstream_gradient()
        a, R = self.inbound_nodes
        self.gradients[a] = R.value * g
        self.gradients[R] = a.value * g


def assert_on_device(device: gf.Device, value, what: str) -> None:
    """Fail unless `value` is an array of `device`'s library on that device."""
    assert device.owns(value), \
        f"{what} is {type(value).__name__} not on {device.name}: {value!r:.200}"
