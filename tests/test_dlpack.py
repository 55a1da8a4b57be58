"""DLPack feeds (issue 14 item 3): an array of another library in the graph's device memory is
taken without a copy (`xp.from_dlpack`), through `graph.step`, `graph.run`, `Input.value` and
`topological_sort`; nothing is counted in the transfer ledger; an array on another device is
still a DeviceError naming both devices and the fix. The CPU libraries here; CUDA pairs
(a torch CUDA tensor fed to 'cuda', a CuPy array to 'torch:cuda') take the same path."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import gpuflow as gf
from gpuflow.backends import LEDGER


def _has(name):
    return importlib.util.find_spec(name) is not None


def make(library, host):
    """`host` (a NumPy array) as an array of `library`, on the CPU, 64-byte aligned (JAX takes
    host memory without a copy only then; it copies anything else)."""
    if library == "numpy":
        buf = np.empty(host.nbytes + 64, np.uint8)
        start = -buf.ctypes.data % 64
        array = buf[start:start + host.nbytes].view(host.dtype).reshape(host.shape)
        array[...] = host
        return array
    if library == "torch":
        import torch
        return torch.tensor(host)  # torch's allocator aligns to 64 bytes
    if library == "jax":
        import jax.numpy as jnp
        return jnp.asarray(host)
    raise AssertionError(library)


def pointer(array):
    """The address of an array's first element, whatever its library."""
    if isinstance(array, np.ndarray):
        return array.__array_interface__["data"][0]
    if hasattr(array, "data_ptr"):
        return array.data_ptr()
    if hasattr(array, "unsafe_buffer_pointer"):
        return array.unsafe_buffer_pointer()
    return pointer(array._array)  # array_api_strict wraps a NumPy array


PAIRS = [("torch", "cpu"), ("jax", "cpu"), ("numpy", "torch:cpu"), ("jax", "torch:cpu"),
         ("torch", "jax:cpu"), ("torch", "array_api_strict")]


def device_or_skip(spec, library):
    if not _has(library):
        pytest.skip(f"{library} is not installed")
    if spec not in gf.available_devices():
        pytest.skip(f"{spec} unavailable here")
    return gf.get_device(spec)


def model(device):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = gf.mlp(X, [4, 3, 2], seed=0)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=device, dtype="float64",
                     inputs=[X, y], outputs=[logits])
    return graph, X, logits


X_HOST = np.linspace(-1, 1, 12).reshape(3, 4)
Y_HOST = np.array([0, 1, 1])


@pytest.mark.parametrize("library, spec", PAIRS, ids=[f"{a}-into-{b}" for a, b in PAIRS])
def test_a_same_device_array_is_fed_without_a_copy(library, spec):
    device = device_or_skip(spec, library)
    graph, X, logits = model(device)
    expected = graph.item(graph.step(X_HOST, Y_HOST))
    expected_out = gf.to_numpy(graph.run(logits, X_HOST))

    x, y = make(library, X_HOST), make(library, Y_HOST)
    LEDGER.reset()
    loss = graph.step(x, y)
    counted = LEDGER.snapshot()
    assert pointer(X.value) == pointer(x), "the feed was copied"
    assert counted == LEDGER.snapshot() and LEDGER.h2d_calls == 0, counted  # nothing moved
    assert graph.item(loss) == expected
    np.testing.assert_array_equal(gf.to_numpy(graph.run(logits, x)), expected_out)
    X.value = x  # the MiniFlow way
    assert pointer(X.value) == pointer(x) and device.owns(X.value)


def test_the_ledger_counts_a_numpy_upload_but_not_a_shared_tensor():
    """The test above can fail: on array_api_strict (not host memory to gpuflow) a NumPy batch
    is an upload, counted; a torch CPU tensor in the same memory is shared, not counted."""
    device = device_or_skip("array_api_strict", "torch")
    graph, X, _ = model(device)
    LEDGER.reset()
    graph.step(X_HOST, Y_HOST)
    assert LEDGER.h2d_calls == 2
    LEDGER.reset()
    graph.step(make("torch", X_HOST), make("torch", Y_HOST))
    assert LEDGER.h2d_calls == 0


def test_a_shared_feed_sees_the_callers_writes():
    """Zero-copy means shared memory: a torch tensor fed to a 'cpu' graph is the same memory,
    as a NumPy array fed there always was."""
    device_or_skip("cpu", "torch")
    graph, X, _ = model("cpu")
    x = make("torch", X_HOST)
    X.value = x
    x[0, 0] = 42.0
    assert X.value[0, 0] == 42.0


def test_topological_sort_takes_another_librarys_array():
    device_or_skip("torch:cpu", "jax")
    X, W, b = gf.Input(), gf.Input(), gf.Input()
    out = gf.Linear(X, W, b)
    x, w = np.ones((2, 3)), np.full((3, 1), 0.5)
    graph = gf.topological_sort({X: make("jax", x), W: make("torch", w), b: np.ones(1)},
                                device="torch:cpu")  # copied once, as every build-time feed
    np.testing.assert_array_equal(gf.to_numpy(gf.forward_pass(out, graph)), x @ w + 1.0)


def test_a_dtype_change_is_made_on_the_device():
    device = device_or_skip("cpu", "torch")
    import torch
    graph, X, _ = model(device)
    graph32 = gf.Graph(graph.loss, device="cpu", dtype="float32", inputs=graph.inputs)
    x = torch.from_numpy(X_HOST)  # float64 into a float32 graph
    graph32.step(x, make("torch", Y_HOST))
    assert X.value.dtype == np.float32
    np.testing.assert_array_equal(X.value, X_HOST.astype(np.float32))


def test_another_device_is_still_a_device_error_naming_both():
    device_or_skip("array_api_strict:device1", "torch")
    graph, X, _ = model("array_api_strict:device1")
    with pytest.raises(gf.DeviceError) as info:
        graph.step(make("torch", X_HOST), Y_HOST)
    message = str(info.value)
    assert "on torch:cpu, but the graph is on array_api_strict:device1" in message
    assert "help: pass a host (NumPy) array" in message and "device='torch:cpu'" in message


def test_a_tensor_that_cannot_be_shared_says_why():
    device_or_skip("cpu", "torch")
    import torch
    graph, X, _ = model("cpu")
    x = torch.from_numpy(X_HOST).requires_grad_()
    with pytest.raises(gf.DeviceError, match="cannot be shared through DLPack .*require"
                                             ".*\nhelp: pass value.detach"):
        graph.step(x, Y_HOST)


@pytest.mark.parametrize("spec, library", [("torch:cpu", "torch"), ("jax:cpu", "jax")])
def test_a_masked_array_is_still_refused(spec, library):
    """DLPack drops a NumPy mask: a masked array is never shared, it is refused as before."""
    device = device_or_skip(spec, library)
    graph, X, _ = model(device)
    x = np.ma.masked_array(X_HOST, mask=X_HOST < 0)
    with pytest.raises(gf.GraphError, match="masked array"):
        graph.step(x, Y_HOST)


@pytest.mark.parametrize("library, spec", PAIRS, ids=[f"{a}-into-{b}" for a, b in PAIRS])
def test_shared_labels_get_the_host_checks(library, spec):
    device = device_or_skip(spec, library)
    graph, X, _ = model(device)
    x = make(library, X_HOST)
    with pytest.raises(gf.GraphError, match="labels have dtype"):
        graph.step(x, make(library, Y_HOST.astype(np.float64)))
    graph.step(x, make(library, Y_HOST))  # now the number of classes is known
    with pytest.raises(gf.GraphError, match="labels range from 0 to 5"):
        graph.step(x, make(library, np.array([0, 5, 1])))


@pytest.mark.parametrize("library, spec", PAIRS, ids=[f"{a}-into-{b}" for a, b in PAIRS])
def test_shared_complex_data_is_refused(library, spec):
    device = device_or_skip(spec, library)
    graph, X, _ = model(device)
    with pytest.raises(gf.GraphError, match="complex.*not numbers"):
        graph.step(make(library, X_HOST.astype(np.complex128)), Y_HOST)


def test_jax_copies_unaligned_host_memory_as_documented():
    """Documented, not silent: JAX shares host memory only 64-byte aligned; otherwise its
    from_dlpack copies (host to host, like a NumPy upload to a host device: not counted)."""
    torch = pytest.importorskip("torch")
    device = device_or_skip("jax:cpu", "jax")
    graph, X, _ = model(device)
    aligned = make("torch", X_HOST)
    buf = torch.empty(aligned.numel() * aligned.element_size() + 64 + 8, dtype=torch.uint8)
    start = (-buf.data_ptr() % 64) + 8  # 8 bytes past a 64-byte boundary
    x = buf[start:start + X_HOST.nbytes].view(aligned.dtype).reshape(X_HOST.shape)
    x.copy_(aligned)
    X.value = x
    assert pointer(X.value) != x.data_ptr()  # copied
    np.testing.assert_array_equal(gf.to_numpy(X.value), X_HOST)
    X.value = aligned
    assert pointer(X.value) == aligned.data_ptr()  # shared


def test_a_numpy_array_fed_to_jax_is_copied():
    """JAX arrays are immutable and a NumPy batch is the caller's to reuse: JAX gets a copy."""
    device = device_or_skip("jax:cpu", "jax")
    graph, X, _ = model(device)
    host = make("numpy", X_HOST)
    X.value = host
    host[...] = 0.0
    np.testing.assert_array_equal(gf.to_numpy(X.value), X_HOST)