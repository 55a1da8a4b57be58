"""Fuzzing the file readers: random byte mutations of a good checkpoint (safetensors, and the
old .npz that still loads), IDX file and MNIST .npz (seeded loops, each bounded to a few
seconds; hypothesis for safetensors). Every input must end in a valid result or
a gpuflow error (a GpuflowError subclass): never another exception, a hang, or a large
allocation (tracemalloc peak and RSS are checked). A checkpoint that still loads after a
mutation must hold exactly the values that were saved: never a valid but wrong checkpoint.

What these fuzzers found (fixed, with the regression tests at the end of this file):
zipfile's NotImplementedError (unknown compression method or zip version) and RuntimeError
(encrypted member) escaped both npz readers; an IDX header with more than 64 dims, or a zero
dim next to huge ones, escaped read_idx as a NumPy ValueError; and an .npy header can declare
an array far larger than the file, which NumPy allocates before it reads. The safetensors
format is parsed by the safetensors package; what its fuzzing found here: a flipped byte in
a buffer, or in the JSON metadata gpuflow keeps in its header, loaded as a valid but wrong
checkpoint (safetensors has no checksum), so gpuflow writes CRC-32s of both.
"""

from __future__ import annotations

import gzip
import io
import random
import resource
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

import gpuflow as gf
from gpuflow.checkpoint import load, save
from gpuflow.data import load_mnist, read_idx
from gpuflow.errors import CheckpointError, DataError, GpuflowError
from gpuflow.optim import Adam
from hypothesis import given, settings
from hypothesis import strategies as st

from legacy_npz import legacy_save

TIME_BOUND = 4.0     # seconds per fuzz loop (the loops stop early when it is reached)
SLOW_INPUT = 1.0     # seconds: one input taking longer counts as a hang
MEMORY_BOUND = 8 << 20  # bytes a single read may peak at (the files are a few KB)


def mutate(rng: random.Random, data: bytes, hot: bytes = b"") -> bytes:
    """1-6 random edits: flip a byte, truncate, insert, delete, or hit a 'hot' character
    (the digits and brackets of .npy headers, where shapes and dtypes live)."""
    blob = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        action = rng.random()
        if action < 0.4 and blob:
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        elif action < 0.5:
            del blob[rng.randrange(len(blob) + 1):]
        elif action < 0.6:
            pos = rng.randrange(len(blob) + 1)
            blob[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif action < 0.7 and blob:
            del blob[rng.randrange(len(blob))]
        elif hot:
            spots = [i for i, b in enumerate(blob) if b in hot]
            if spots:
                blob[rng.choice(spots)] = rng.choice(hot)
    return bytes(blob)


def fuzz(inputs, read, check_ok=None):
    """Run `read(blob)` on each input until TIME_BOUND; returns counts of outcomes."""
    counts = {"ok": 0, "error": 0}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    for i, blob in enumerate(inputs):
        if time.monotonic() - start > TIME_BOUND:
            break
        tracemalloc.start()
        t0 = time.monotonic()
        try:
            result = read(blob)
        except GpuflowError:
            counts["error"] += 1
        except Exception as exc:  # the finding: report the input that did it
            pytest.fail(f"input {i} ({len(blob)} bytes, {blob[:64]!r}...) raised "
                        f"{type(exc).__name__}: {exc}")
        else:
            counts["ok"] += 1
            if check_ok is not None:
                check_ok(result)
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        elapsed = time.monotonic() - t0
        assert elapsed < SLOW_INPUT, f"input {i} took {elapsed:.2f} s"
        assert peak < MEMORY_BOUND, f"input {i} peaked at {peak} bytes"
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before  # KiB on Linux
    assert grown < 100_000, f"max RSS grew by {grown} KiB while fuzzing"
    return counts


# -- checkpoints -------------------------------------------------------------------------------
def small_model():
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = gf.mlp(X, [4, 3, 2], seed=0)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device="cpu", dtype="float64",
                     inputs=[X, y])
    return graph, Adam(graph, lr=0.01)


def trained_small(tmp_path, fmt):
    """A trained small model saved in `fmt`: (file bytes, parameters, optimizer state)."""
    graph, opt = small_model()
    graph.step(np.ones((2, 4)), np.array([0, 1]))
    opt.step()
    good = tmp_path / f"good.{fmt}"
    writer = save if fmt == "safetensors" else legacy_save
    writer(good, graph, opt, step=3, state={"history": np.arange(5.0), "n": 3})
    saved = {n: p.value.copy() for n, p in graph.named_parameters().items()}
    saved_opt = {k: np.array(v) for k, v in opt.state_dict().items()}
    return good.read_bytes(), saved, saved_opt


def checkpoint_reader(tmp_path, fmt):
    """(read(blob), check_ok(info)) for fuzzing `load` with files of format `fmt`."""
    base, saved, saved_opt = trained_small(tmp_path, fmt)
    target, target_opt = small_model()
    path = tmp_path / f"m.{fmt}"

    def read(blob):
        path.write_bytes(blob)
        return load(path, target, target_opt)

    read.target = target

    def check_ok(info):  # a mutation that loads must have changed nothing that matters
        assert info["step"] == 3 and info["state"]["n"] == 3
        np.testing.assert_array_equal(info["state"]["history"], np.arange(5.0))
        for name, p in target.named_parameters().items():
            np.testing.assert_array_equal(p.value, saved[name], err_msg=name)
        for key, value in target_opt.state_dict().items():
            np.testing.assert_array_equal(value, saved_opt[key], err_msg=key)

    return base, read, check_ok


# the characters of shapes, offsets and dtypes in .npy and safetensors headers
HOT = {"npz": b"0123456789(),'<>|fiub", "safetensors": b'0123456789[],:"FIU'}


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_fuzz_checkpoint_reader(tmp_path, fmt):
    base, read, check_ok = checkpoint_reader(tmp_path, fmt)
    rng = random.Random(20240605)
    inputs = (mutate(rng, base, HOT[fmt]) for _ in range(3000))
    counts = fuzz(inputs, read, check_ok)
    assert counts["error"] > 200, counts


@pytest.fixture(scope="module")
def safetensors_reader(tmp_path_factory):
    return checkpoint_reader(tmp_path_factory.mktemp("hypothesis"), "safetensors")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.data())
def test_hypothesis_flips_and_truncations_of_a_safetensors_checkpoint(safetensors_reader, data):
    """Byte flips in the header and the buffers, and truncations, chosen by hypothesis: each
    file is refused as a CheckpointError naming it, with the model unchanged, or loads the
    values that were saved."""
    base, read, check_ok = safetensors_reader
    blob = bytearray(base)
    header = 8 + int.from_bytes(base[:8], "little")
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        pos = data.draw(st.integers(0, header - 1) | st.integers(0, len(blob) - 1), label="pos")
        blob[pos] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.none() | st.integers(0, len(blob)), label="truncate at")
    if cut is not None:
        del blob[cut:]
    target = read.target
    before = {n: p.value for n, p in target.named_parameters().items()}
    try:
        check_ok(read(bytes(blob)))
    except CheckpointError as exc:
        assert "m.safetensors" in str(exc) and str(exc).count("help:") == 1, str(exc)
        assert all(p.value is before[n] for n, p in target.named_parameters().items())


# -- IDX files ----------------------------------------------------------------------------------
def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def mutate_idx_header(rng: random.Random, data: bytes) -> bytes:
    """Edits aimed at the header: the type code, ndim (up to 255) and the dims' bytes."""
    blob = bytearray(data)
    pos = rng.choice([2, 3, 4, 5, 6, 7, 8, 11, 12, 15])
    if pos < len(blob):
        blob[pos] = rng.choice([0, 1, 2, 3, 8, 0x0D, 0x0E, 64, 65, 127, 255])
    return bytes(blob)


def test_fuzz_idx_reader(tmp_path):
    bases = [idx_bytes(np.arange(60, dtype=np.uint8).reshape(3, 4, 5)),
             idx_bytes(np.arange(12, dtype=np.float32).reshape(3, 4), 0x0D)]
    path = tmp_path / "f.idx"

    def read(blob):
        path.write_bytes(blob)
        return read_idx(path)

    def inputs():
        rng = random.Random(7)
        for i in range(4000):
            base = bases[i % 2]
            blob = mutate_idx_header(rng, base) if i % 3 == 0 else mutate(rng, base)
            yield gzip.compress(blob, compresslevel=1) if i % 4 == 1 else blob

    counts = fuzz(inputs(), read)
    assert counts["error"] > 200 and counts["ok"] > 10, counts


def test_fuzz_mnist_npz_reader(tmp_path):
    buf = io.BytesIO()
    np.savez(buf, x_train=np.zeros((3, 2, 2), np.uint8), y_train=np.arange(3, dtype=np.uint8))
    base = buf.getvalue()
    path = tmp_path / "mnist.npz"

    def read(blob):
        path.write_bytes(blob)
        return load_mnist(path, "train")

    rng = random.Random(11)
    counts = fuzz((mutate(rng, base, b"0123456789(),'<>|u") for _ in range(3000)), read)
    assert counts["error"] > 200, counts


# -- what the fuzzers found, as regression tests ------------------------------------------------
def _zip_with(member_name: str, payload: bytes, *, method=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as z:
        z.writestr(member_name, payload)
    return buf.getvalue()


def _npy_header(shape, descr="<f8") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


def _patch_method(data: bytes, method: int) -> bytes:
    """Set the compression method of the (only) member in its local and central headers."""
    blob = bytearray(data)
    local = blob.find(b"PK\x03\x04")
    central = blob.find(b"PK\x01\x02")
    blob[local + 8:local + 10] = method.to_bytes(2, "little")
    blob[central + 10:central + 12] = method.to_bytes(2, "little")
    return bytes(blob)


def test_checkpoint_with_an_unknown_zip_method_is_a_checkpoint_error(tmp_path):
    graph, opt = small_model()
    path = tmp_path / "c.npz"
    path.write_bytes(_patch_method(_zip_with("__gpuflow__.npy", _npy_header((3,)) + bytes(24)),
                                   99))
    with pytest.raises(CheckpointError, match=r"c\.npz.*(compression method|damaged)"):
        load(path, graph, opt)


def test_checkpoint_header_declaring_a_huge_array_allocates_nothing(tmp_path):
    """The .npy header says 10**12 float64s (8 TB); the member holds 8 bytes."""
    graph, opt = small_model()
    path = tmp_path / "c.npz"
    path.write_bytes(_zip_with("param/layer1.W.npy", _npy_header((10**12,)) + bytes(8)))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as info:
            load(path, graph, opt)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "declares shape (1000000000000,)" in str(info.value) and "holds 8 bytes" in \
        str(info.value), str(info.value)
    assert peak < 1 << 20, f"peak {peak} bytes"


def test_checkpoint_with_an_object_array_is_refused_without_unpickling(tmp_path):
    graph, opt = small_model()
    path = tmp_path / "c.npz"
    np.savez(path, __gpuflow__=np.array([{"x": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="object array, which only pickle can load"):
        load(path, graph, opt)


@pytest.mark.parametrize("header, why", [
    (bytes([0, 0, 8, 70]) + b"\0\0\0\1" * 70 + b"\5", "maximum supported dimension"),
    (bytes([0, 0, 8, 3]) + b"\0\0\0\0" + b"\xff\xff\xff\xff" * 2, "array is too big"),
], ids=["70-dims", "zero-by-huge"])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_dims_numpy_cannot_hold_are_a_data_error(tmp_path, header, why, gz):
    path = tmp_path / "f.idx"
    path.write_bytes(gzip.compress(header) if gz else header)
    with pytest.raises(DataError, match=rf"f\.idx: header dims .*cannot make a NumPy array.*{why}"):
        read_idx(path)


@pytest.mark.parametrize("offset", [6, 10])  # version needed; compression method
def test_mnist_npz_with_an_unsupported_zip_entry_is_a_data_error(tmp_path, offset):
    buf = io.BytesIO()
    np.savez(buf, x_train=np.zeros((2, 2, 2), np.uint8), y_train=np.zeros(2, np.uint8))
    blob = bytearray(buf.getvalue())
    blob[blob.find(b"PK\x01\x02") + offset] = 99
    path = tmp_path / "mnist.npz"
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"mnist\.npz: cannot read arrays x_train, y_train"):
        load_mnist(path, "train")
