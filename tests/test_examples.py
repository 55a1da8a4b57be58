"""The scripts in examples/ run as a user runs them, and give the same numbers on every device."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_example(script: str, *args: str) -> str:
    env = child_env()
    done = subprocess.run([sys.executable, os.path.join(REPO, "examples", script), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, f"{script} {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout


def _losses(out: str) -> list[float]:
    return [float(v) for v in re.findall(r"^Epoch: \d+, Loss: ([0-9.]+)$", out, re.MULTILINE)]


def test_miniflow_nn_same_losses_on_cpu_and_device1():
    pytest.importorskip("array_api_strict")
    runs = {}
    for device in ("cpu", "array_api_strict:device1"):
        out = _run_example("miniflow_nn.py", "--device", device, "--epochs", "2")
        assert f"Device: {device} (" in out, out
        assert "Total number of examples = 506" in out, out
        runs[device] = _losses(out)
    cpu = runs["cpu"]
    assert len(cpu) == 2, f"expected 2 epoch lines, got {cpu}"
    assert runs["array_api_strict:device1"] == cpu, runs
    assert cpu[1] < cpu[0], f"loss did not decrease: {cpu}"


def test_miniflow_nn_seed_changes_the_run():
    a = _losses(_run_example("miniflow_nn.py", "--epochs", "1", "--seed", "1"))
    b = _losses(_run_example("miniflow_nn.py", "--epochs", "1", "--seed", "2"))
    assert len(a) == len(b) == 1 and a != b, (a, b)


def test_miniflow_nn_refuses_an_unknown_device():
    env = child_env()
    done = subprocess.run([sys.executable, os.path.join(REPO, "examples", "miniflow_nn.py"),
                           "--device", "tpu", "--epochs", "1"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode != 0
    assert "DeviceError" in done.stderr and "'tpu'" in done.stderr, done.stderr
