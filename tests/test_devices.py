"""Device specs, availability reports, lazy imports, host<->device transfers and the LEDGER."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import gpuflow as gf
from gpuflow.backends import LEDGER, backend_report
from conftest import child_env, host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_present() -> bool:
    """Whether CuPy imports and sees a GPU (the 'no GPU here' tests skip then)."""
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no driver, broken install: no GPU either way
        return False


needs_no_gpu = pytest.mark.skipif(_cuda_present(), reason="a CUDA GPU is present here")


# -- canonical specs ----------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["cpu", "numpy", "numpy:cpu", " CPU ", "Numpy"])
def test_cpu_specs_are_one_device(spec):
    device = gf.get_device(spec)
    assert device is gf.get_device("cpu"), f"{spec!r} gave {device!r}"
    assert device.name == "cpu"
    assert str(device) == "cpu"


def test_strict_specs_are_canonical():
    pytest.importorskip("array_api_strict")
    a = gf.get_device("array_api_strict")
    assert gf.get_device("array_api_strict:cpu") is a
    assert a.name == "array_api_strict"
    d1 = gf.get_device("array_api_strict:device1")
    assert d1.name == "array_api_strict:device1"
    assert d1 is not a


def test_torch_specs_are_canonical():
    pytest.importorskip("torch")
    t = gf.get_device("torch")
    assert gf.get_device("torch:cpu") is t
    assert t.name == "torch:cpu"


def test_a_device_object_passes_through():
    device = gf.get_device("cpu")
    assert gf.get_device(device) is device


# -- specs this machine cannot provide ----------------------------------------------------------
@needs_no_gpu
def test_cuda_without_gpu_says_what_was_tried():
    with pytest.raises(gf.DeviceError) as info:
        gf.get_device("cuda")
    msg = str(info.value)
    assert "no CUDA device found" in msg
    assert "'cuda'" in msg, msg          # names the spec
    assert "CuPy" in msg, msg            # and what it tried
    assert "help:" in msg and "cpu" in msg, msg


@pytest.mark.parametrize("spec", ["cuda:x", "cupy:one"])
def test_cuda_index_must_be_an_integer(spec):
    if importlib.util.find_spec("cupy") is None:
        # Without CuPy the import failure is reported first; still a DeviceError naming the spec.
        with pytest.raises(gf.DeviceError, match=repr(spec)):
            gf.get_device(spec)
        return
    with pytest.raises(gf.DeviceError, match="must be an integer"):
        gf.get_device(spec)


def test_unknown_spec_lists_the_valid_ones():
    with pytest.raises(gf.DeviceError) as info:
        gf.get_device("tpu")
    msg = str(info.value)
    assert "'tpu'" in msg
    for valid in ("'cpu'", "'cuda'", "'auto'", "'torch:cpu'", "'array_api_strict:device1'"):
        assert valid in msg, f"{valid} missing from: {msg}"
    assert "help:" in msg


def test_cpu_takes_no_index():
    with pytest.raises(gf.DeviceError, match=r"'cpu:1'.*\n.*help:"):
        gf.get_device("cpu:1")


@pytest.mark.parametrize("spec", [3, 1.5, ["cpu"]])
def test_non_string_spec_is_refused(spec):
    with pytest.raises(gf.DeviceError, match="spec string"):
        gf.get_device(spec)


def test_unknown_strict_device():
    pytest.importorskip("array_api_strict")
    with pytest.raises(gf.DeviceError, match="device1"):
        gf.get_device("array_api_strict:device9")


# -- auto and GPUFLOW_DEVICE --------------------------------------------------------------------
@needs_no_gpu
def test_auto_is_cpu_without_gpu_and_says_so(capsys):
    assert gf.get_device("auto") is gf.get_device("cpu")
    assert capsys.readouterr().out == ""
    assert gf.get_device(" AUTO ", verbose=True) is gf.get_device("cpu")
    out = capsys.readouterr().out
    assert "auto" in out and "cpu" in out, out
    assert "CUDA" in out or "CuPy" in out, f"no reason given: {out}"


def test_env_var_is_used_when_device_is_none(monkeypatch):
    pytest.importorskip("array_api_strict")
    monkeypatch.setenv("GPUFLOW_DEVICE", "array_api_strict:device1")
    assert gf.get_device(None).name == "array_api_strict:device1"
    X, W, b = gf.Input(name="X"), gf.Input(name="W"), gf.Input(name="b")
    out = gf.Linear(X, W, b)
    graph = gf.topological_sort({X: np.ones((2, 3)), W: np.ones((3, 1)), b: np.zeros(1)})
    device = gf.get_device("array_api_strict:device1")
    assert graph.device is device
    for node in (X, W, b):
        assert device.owns(node.value), f"{node.label} not on device1: {node.value!r}"
    gf.forward_pass(out, graph)
    assert device.owns(out.value)
    np.testing.assert_array_equal(host(device, out.value), np.full((2, 1), 3.0))


def test_env_var_unset_means_cpu(monkeypatch):
    monkeypatch.delenv("GPUFLOW_DEVICE", raising=False)
    assert gf.get_device(None) is gf.get_device("cpu")
    monkeypatch.setenv("GPUFLOW_DEVICE", "")
    assert gf.get_device(None) is gf.get_device("cpu")


def test_env_var_with_a_bad_spec_is_an_error(monkeypatch):
    monkeypatch.setenv("GPUFLOW_DEVICE", "tpu")
    with pytest.raises(gf.DeviceError, match="'tpu'"):
        gf.get_device(None)


# -- what this machine has ----------------------------------------------------------------------
def test_available_devices_cpu_first():
    devices = gf.available_devices()
    assert devices[0] == "cpu", devices
    assert len(devices) == len(set(devices)), devices
    if importlib.util.find_spec("array_api_strict") is not None:
        for spec in ("array_api_strict", "array_api_strict:device1", "array_api_strict:device2"):
            assert spec in devices, devices
    if not _cuda_present():
        assert not any(d.startswith("cuda") for d in devices), devices
    for spec in devices:
        assert gf.get_device(spec).name == spec


def test_backend_report_lists_every_backend():
    rows = backend_report()
    assert {r["backend"] for r in rows} == {"numpy", "cupy", "torch", "array_api_strict", "jax"}
    for row in rows:
        assert set(row) >= {"backend", "spec", "available", "detail"}, row
        assert isinstance(row["detail"], str) and row["detail"], row
    cpu = [r for r in rows if r["spec"] == "cpu"]
    assert cpu and cpu[0]["available"] and "NumPy" in cpu[0]["detail"]
    if not _cuda_present():
        cupy = [r for r in rows if r["backend"] == "cupy"]
        assert cupy and not any(r["available"] for r in cupy), cupy
        detail = cupy[0]["detail"]
        assert "cupy" in detail.lower() and len(detail) > 20, detail


def test_import_gpuflow_loads_no_gpu_library():
    code = ("import sys, gpuflow\n"
            "from gpuflow import *\n"
            "gpuflow.get_device('cpu')\n"
            "print(sorted(m for m in ('cupy', 'torch') if m in sys.modules))\n")
    env = child_env()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"import gpuflow loaded: {done.stdout}"


# -- transfers ----------------------------------------------------------------------------------
def test_put_and_to_host_round_trip(device):
    x = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    on = device.put(x)
    assert device.owns(on), f"put gave {type(on).__name__}, not an array on {device.name}"
    back = device.to_host(on)
    assert isinstance(back, np.ndarray)
    assert back.dtype == np.float64 and back.shape == (3, 4)
    np.testing.assert_array_equal(back, x)
    f32 = device.put(x, device.dtype("float32"))
    assert device.owns(f32) and f32.dtype == device.dtype("float32")
    np.testing.assert_allclose(device.to_host(f32), x, rtol=1e-6)
    assert device.put(on) is on  # already there: no copy


def test_put_of_lists_and_scalars(device):
    lst = device.put([[1.0, 2.0], [3.0, 4.0]])
    assert device.owns(lst)
    np.testing.assert_array_equal(device.to_host(lst), [[1.0, 2.0], [3.0, 4.0]])
    s = device.put(2.5)
    assert device.owns(s) and tuple(s.shape) == ()
    assert device.item(s) == 2.5
    i = device.put(3)
    assert device.owns(i) and device.to_host(i) == 3


@pytest.mark.parametrize("bad, why", [
    (np.array([object(), 1], dtype=object), "dtype object"),
    ("hello", "not numbers"),
    (np.array(["a", "b"]), "not numbers"),
    ([[1.0, 2.0], [3.0]], "cannot be made into an array"),
    (None, "is None"),
])
def test_put_refuses_non_numbers(device, bad, why):
    with pytest.raises(gf.GraphError, match=why) as info:
        device.put(bad, what="thing")
    assert "thing" in str(info.value) and "help:" in str(info.value)


def test_ledger_counts_transfers_on_device1():
    pytest.importorskip("array_api_strict")
    device = gf.get_device("array_api_strict:device1")
    x = np.ones((4, 5), dtype=np.float64)
    LEDGER.reset()
    on = device.put(x)
    assert LEDGER.h2d_calls == 1 and LEDGER.h2d_bytes == x.nbytes, LEDGER.snapshot()
    device.put(on)  # already there: not a transfer
    assert LEDGER.h2d_calls == 1, LEDGER.snapshot()
    device.to_host(on)
    assert LEDGER.d2h_calls == 1 and LEDGER.d2h_bytes == x.nbytes, LEDGER.snapshot()
    device.synchronize()
    assert LEDGER.syncs == 1
    LEDGER.reset()
    assert LEDGER.snapshot() == dict.fromkeys(
        ("h2d_calls", "h2d_bytes", "d2h_calls", "d2h_bytes", "syncs"), 0)


def test_ledger_counts_nothing_on_cpu():
    device = gf.get_device("cpu")
    LEDGER.reset()
    on = device.put(np.ones((4, 5)))
    device.to_host(on)
    device.put([1.0, 2.0])
    device.synchronize()
    assert LEDGER.snapshot() == dict.fromkeys(
        ("h2d_calls", "h2d_bytes", "d2h_calls", "d2h_bytes", "syncs"), 0), LEDGER.snapshot()


@pytest.fixture
def strict_ledger():
    """LEDGER enforcing strict mode for one test, restored afterwards."""
    LEDGER.reset()
    try:
        with LEDGER.enforcing():
            yield LEDGER
    finally:
        LEDGER.reset()


def test_strict_ledger_refuses_unallowed_transfers(strict_ledger):
    pytest.importorskip("array_api_strict")
    device = gf.get_device("array_api_strict:device1")
    with pytest.raises(gf.TransferError) as info:
        device.put(np.ones(3), what="the batch")
    msg = str(info.value)
    assert "h2d" in msg and "24 bytes" in msg and "array_api_strict:device1" in msg, msg
    assert "the batch" in msg and "help:" in msg, msg
    assert strict_ledger.h2d_calls == 0
    with strict_ledger.allowed():
        on = device.put(np.ones(3))
        device.to_host(on)
    assert strict_ledger.h2d_calls == 1 and strict_ledger.d2h_calls == 1
    with pytest.raises(gf.TransferError, match="d2h"):
        device.to_host(on)
    # The CPU never transfers, so strict mode does not get in its way.
    gf.get_device("cpu").put(np.ones(3))


def test_describe_names_the_library_version(device):
    text = device.describe()
    assert isinstance(text, str) and text.strip(), repr(text)
    import importlib

    from gpuflow.backends import REGISTRY
    library = importlib.import_module({b.name: b.library for b in REGISTRY}[device.backend])
    assert library.__version__ in text, f"{device.name}: {text!r} lacks {library.__version__}"


class _Opaque:
    """An object of a library gpuflow does not know."""


def test_put_of_an_unknown_object_says_what_it_is(device):
    with pytest.raises(gf.DeviceError) as info:
        device.put(_Opaque(), what="X")
    msg = str(info.value)
    assert "_Opaque" in msg and device.name in msg and "help:" in msg, msg
    assert "device='an unknown" not in msg, f"nonsense fix suggested: {msg}"
