"""gpuflow.set_num_threads: large NumPy operations split over threads (backends/numpy_threads).

The thresholds are lowered here so that small arrays are split; each test compares with one
plain NumPy call."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import gpuflow as gf
from gpuflow.backends import numpy_threads as nt


@pytest.fixture(params=[2, 3])
def split(request, monkeypatch):
    """Split everything over 2 or 3 threads (3: uneven slabs)."""
    monkeypatch.setattr(nt, "MIN_SPLIT", 1)
    monkeypatch.setattr(nt, "MIN_SPLIT_PRODUCT", 1)
    monkeypatch.setattr(nt, "BLAS_ALONE", 1)
    before = gf.get_num_threads()
    gf.set_num_threads(request.param)
    runs = []
    real = nt.WORKERS.run
    monkeypatch.setattr(nt.WORKERS, "run", lambda slabs: (runs.append(len(slabs)), real(slabs)))
    yield runs
    gf.set_num_threads(before)


def _ops():
    return gf.get_device("cpu").ops


RNG = np.random.default_rng(0)


def test_the_default_is_one_thread_and_bad_counts_are_refused():
    assert nt._default_threads() == int(os.environ.get("GPUFLOW_NUM_THREADS", "1"))
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(gf.DeviceError, match="must be an int >= 1"):
            gf.set_num_threads(bad)


def test_split_elementwise_ops_equal_one_call_bit_for_bit(split):
    threads = gf.get_num_threads()
    ops = _ops()
    x = RNG.normal(size=(7, 5, 6)).astype(np.float32)
    y = RNG.normal(size=(7, 5, 6)).astype(np.float32)
    row = RNG.normal(size=(6,)).astype(np.float32)       # broadcast along the first axis
    lead1 = RNG.normal(size=(1, 5, 6)).astype(np.float32)
    strided = RNG.normal(size=(7, 5, 12)).astype(np.float32)[..., ::2]
    cases = [("add", (x, y)), ("subtract", (1.0, x)), ("multiply", (x, row)),
             ("divide", (x, lead1)), ("maximum", (strided, y)), ("exp", (x,)),
             ("tanh", (strided,)), ("sqrt", (np.abs(x),))]
    for name, args in cases:
        out = np.empty((7, 5, 6), np.float32)
        split.clear()
        got = getattr(ops, name)(*args, out=out)
        assert got is out and split == [threads], f"{name} was not split"
        np.testing.assert_array_equal(out, getattr(np, name)(*args), err_msg=name)
    other = np.where(RNG.random(x.shape) < 0.5, x, y)
    for name in ("greater", "equal"):
        out = np.empty((7, 5, 6), np.float32)
        getattr(ops, name)(x, other, np.float32, out=out)
        np.testing.assert_array_equal(out, getattr(np, name)(x, other).astype(np.float32))
    # in place: out is one of the operands
    z = x.copy()
    ops.multiply(z, y, out=z)
    np.testing.assert_array_equal(z, x * y)


def test_an_operand_overlapping_out_otherwise_than_in_place_runs_as_one_call(split):
    ops = _ops()
    a = np.arange(40, dtype=np.float64).reshape(10, 4)
    expected = a[:-1] + 1.0
    ops.add(a[:-1], 1.0, out=a[1:])  # each row reads the row before, which another slab writes
    np.testing.assert_array_equal(a[1:], expected)
    assert not split
    # A product reads all of one operand in every slab: in place is not safe either.
    a, b = RNG.normal(size=(64, 64)), RNG.normal(size=(64, 64))
    expected = a @ b
    np.testing.assert_allclose(ops.matmul(a, b, out=b), expected, rtol=1e-13)
    assert not split


def test_split_products_equal_one_call_and_give_openblas_its_threads_back(split):
    ops = _ops()
    get, _ = nt._blas()
    before = get() if get is not None else None
    for shape_a, shape_b in [((9, 13), (13, 4)), ((3, 13), (13, 17)), ((1, 5), (5, 8))]:
        a, b = RNG.normal(size=shape_a), RNG.normal(size=shape_b)
        out = np.empty((shape_a[0], shape_b[1]))
        assert ops.matmul(a, b, out=out) is out
        np.testing.assert_allclose(out, a @ b, rtol=1e-13)
        np.testing.assert_allclose(ops.matmul(a.T.copy().T, b, out=out), a @ b, rtol=1e-13)
    assert split, "no product was split"
    if before is not None:
        assert get() == before


def test_two_python_threads_give_openblas_its_count_back(split):
    import threading
    get, _ = nt._blas()
    if get is None:
        pytest.skip("NumPy's BLAS is not the bundled OpenBLAS")
    before = get()
    a = RNG.normal(size=(200, 300))

    def products():
        for _ in range(20):
            _ops().matmul(a, a.T, out=np.empty((200, 200)))

    workers = [threading.Thread(target=products) for _ in range(3)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert get() == before and nt._HOLDERS[0] == 0


def test_split_stack_and_col2im_equal_one_call(split):
    ops = _ops()
    parts = [RNG.normal(size=(5, 2, 3, 4)) for _ in range(4)]
    out = np.empty((5, 4, 2, 3, 4))
    ops.stack(parts, axis=1, out=out)
    np.testing.assert_array_equal(out, np.stack(parts, axis=1))
    assert split
    ops.stack(parts, axis=-5, out=np.empty((4, 5, 2, 3, 4)))  # axis 0: not split
    from gpuflow.backends.windows import col2im_in_place
    got = ops.col2im(parts, 2, 2, 1, 1, out=np.full((5, 2, 4, 5), np.nan))
    np.testing.assert_array_equal(got, col2im_in_place(parts, 2, 1, 1, np.empty((5, 2, 4, 5))))


def test_a_workers_error_reaches_the_caller_and_the_pool_goes_on(split):
    split = gf.get_num_threads()
    calls = []

    def bad():
        raise ValueError("from a worker")

    with pytest.raises(ValueError, match="from a worker"):
        nt.WORKERS.run([lambda: calls.append(0)] + [bad] * (split - 1))
    nt.WORKERS.run([lambda: calls.append(1)] + [lambda: calls.append(2)] * (split - 1))
    assert calls.count(2) == split - 1


def test_workers_run_under_the_callers_numpy_error_state(split):
    x = np.zeros((8, 4))
    x[-1, -1] = 1000.0  # overflows in exp, in the last slab (a worker's)
    with np.errstate(over="raise"):
        with pytest.raises(FloatingPointError):
            _ops().exp(x, out=np.empty_like(x))
    with np.errstate(over="ignore"):
        with __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("error")
            _ops().exp(x, out=np.empty_like(x))  # no RuntimeWarning from the worker either
    assert split == [gf.get_num_threads()] * 2


def test_a_split_operation_inside_a_slab_runs_as_one_call(split):
    ops = _ops()
    out = np.empty((6, 4))
    # A slab that itself calls a split op: would wait on the pool it is part of.
    nt.split_along_first(lambda parts, o: ops.add(parts[0], 1.0, out=o), [np.ones((6, 4))], out)
    np.testing.assert_array_equal(out, 2.0)


@pytest.mark.skipif(not hasattr(__import__("signal"), "setitimer"), reason="POSIX timers")
def test_a_signal_during_a_split_waits_for_the_slabs_and_the_pool_stays_in_step(split):
    import signal
    import time

    class Alarm(Exception):
        pass

    def ring(*_):
        raise Alarm

    old = signal.signal(signal.SIGALRM, ring)
    try:
        done = []
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Alarm):  # raised once the slabs are done, not in the middle
            # The caller's slab is quick: the signal comes while it waits for the workers.
            nt.WORKERS.run([lambda: None] + [lambda: (time.sleep(0.3), done.append(1))]
                    * (gf.get_num_threads() - 1))
            time.sleep(0.1)  # where the held signal is delivered at the latest
        assert done, "the call returned before its workers were done"
        flag = []
        nt.WORKERS.run([lambda: None, lambda: (time.sleep(0.1), flag.append(1))])
        assert flag, "a later call returned before its worker was done"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_cnn_trains_the_same_split_or_not(monkeypatch):
    before = gf.get_num_threads()

    def losses(threads):
        gf.set_num_threads(threads)
        try:
            X, y = gf.Input(name="X"), gf.Input(name="y")
            h, params = gf.layers.lenet(X, (1, 8, 8), 4, batch_norm=True, seed=3)
            graph = gf.Graph(gf.SoftmaxCrossEntropy(y, h), device="cpu", dtype="float64",
                             inputs=[X, y])
            opt = gf.optim.Adam(graph, lr=1e-2)
            rng = np.random.default_rng(1)
            xb, yb = rng.normal(size=(16, 1, 8, 8)), rng.integers(0, 4, 16)
            out = []
            for _ in range(5):
                out.append(float(graph.step(xb, yb)))
                opt.step()
            return out
        finally:
            gf.set_num_threads(before)

    monkeypatch.setattr(nt, "MIN_SPLIT", 1)
    monkeypatch.setattr(nt, "MIN_SPLIT_PRODUCT", 1)
    monkeypatch.setattr(nt, "BLAS_ALONE", 1)
    runs = []
    real = nt.WORKERS.run
    monkeypatch.setattr(nt.WORKERS, "run", lambda slabs: (runs.append(len(slabs)), real(slabs)))
    one = losses(1)
    assert not runs
    two = losses(2)
    assert len(runs) > 50, "the CNN step was not split"
    np.testing.assert_allclose(two, one, rtol=1e-12)
    assert one[-1] < one[0]


_FORK_SCRIPT = """
import os, numpy as np, gpuflow as gf
from gpuflow.backends import numpy_threads as nt
nt.MIN_SPLIT = 1
gf.set_num_threads(2)
ops = gf.get_device("cpu").ops
runs = []
real = nt.WORKERS.run
nt.WORKERS.run = lambda slabs: (runs.append(1), real(slabs))
ops.add(np.ones((4, 3)), 1.0, out=np.empty((4, 3)))  # the parent's workers exist
pid = os.fork()
if pid == 0:  # the child: the parent's worker threads are not here
    out = ops.add(np.ones((4, 3)), 1.0, out=np.empty((4, 3)))
    os._exit(0 if (out == 2.0).all() and len(runs) == 2 else 1)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_forked_child_makes_its_own_threads():
    # In a fresh interpreter: this one may hold JAX's threads, which a fork must not copy.
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True,
                          timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr


def test_a_graph_bound_before_set_num_threads_follows_it(monkeypatch):
    """The cpu device has one set of ops (backends/numpy.OPS): a graph bound with one thread
    splits once gf.set_num_threads(2) is called, and stops at set_num_threads(1)."""
    before = gf.get_num_threads()
    gf.set_num_threads(1)
    monkeypatch.setattr(nt, "MIN_SPLIT", 1)
    runs = []
    real = nt.WORKERS.run
    monkeypatch.setattr(nt.WORKERS, "run", lambda slabs: (runs.append(len(slabs)), real(slabs)))
    try:
        X = gf.Input(name="X")
        graph = gf.Graph(gf.Tanh(X), device="cpu", dtype="float64", inputs=[X])
        xb = RNG.normal(size=(8, 3))
        one = graph.run(None, xb).copy()
        assert not runs
        assert graph.device.ops is gf.get_device("cpu").ops
        gf.set_num_threads(2)
        two = graph.run(None, xb)
        assert runs, "the bound graph did not split after set_num_threads(2)"
        np.testing.assert_array_equal(two, one)
        gf.set_num_threads(1)
        runs.clear()
        graph.run(None, xb)
        assert not runs
    finally:
        gf.set_num_threads(before)
