"""Device parametrization: every test that takes `device` runs on every device spec.

The default set lists every backend, available or not, so the skips (with their reasons) show
in the report. GPUFLOW_TEST_DEVICES=spec,spec replaces the set (e.g. 'cpu,cuda').
"""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

import gpuflow as gf
from gpuflow.gradcheck import Project, central_difference  # noqa: F401 - the tests' helpers

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


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """One line per distinct skip reason with its count, instead of one line per skipped test
    (pyproject's addopts leave skips out of -r); the final 'N passed, N skipped' line stays."""
    if "s" in config.option.reportchars.lower() or "a" in config.option.reportchars.lower():
        return  # -rs / -ra asked for every skip line: pytest prints them itself
    reasons: collections.Counter[str] = collections.Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if not reasons:
        return
    terminalreporter.section("skips by reason (-rs lists each test)", sep="-")
    for reason, count in sorted(reasons.items(), key=lambda item: (-item[1], item[0])):
        terminalreporter.line(f"{count:4d} skipped: {reason}")


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


def assert_on_device(device: gf.Device, value, what: str) -> None:
    """Fail unless `value` is an array of `device`'s library on that device."""
    assert device.owns(value), \
        f"{what} is {type(value).__name__} not on {device.name}: {value!r:.200}"


def run_epochs(graph, opt, schedule, batches, epochs: int) -> list[float]:
    """`epochs` epochs of graph.step + opt.step over `batches`, schedule stepped after each;
    every step's loss, read on the host."""
    losses = []
    for _ in range(epochs):
        for xb, yb in batches:
            losses.append(graph.item(graph.step(xb, yb)))
            opt.step()
        schedule.step()
    return losses


def keep_save(monkeypatch, key: str, value: int, kept) -> None:
    """Patch gpuflow.checkpoint.save so that the save whose `key` keyword (epoch, step) is
    `value` is also copied to `kept`: the checkpoint a run killed then would leave."""
    import shutil

    from gpuflow import checkpoint
    save = checkpoint.save

    def save_and_keep(path, *args, **kwargs):
        save(path, *args, **kwargs)
        if kwargs[key] == value:
            shutil.copyfile(path, kept)

    monkeypatch.setattr(checkpoint, "save", save_and_keep)
