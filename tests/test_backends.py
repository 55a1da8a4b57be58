"""The backend contract (gpuflow/backends/base.py): every registered module provides it, the
registry alone decides spec parsing, ops bind by name, and distributed training reaches a
device's own collectives through its capabilities."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import gpuflow as gf
from gpuflow.backends import (BACKENDS, INSTALL_HINTS, REGISTRY, Device, Ops, UfuncOps,
                              parse_spec, rank_spec)
from gpuflow.backends.ops import OP_NAMES
from gpuflow.distributed import Context

MODULE_NAMES = ("import_problem", "EXAMPLE_SPECS", "make_device", "candidate_specs",
                "array_device_name")


@pytest.mark.parametrize("backend", [b.name for b in REGISTRY])
def test_every_registered_module_provides_the_contract(backend):
    module = importlib.import_module(f"gpuflow.backends.{backend}")  # never imports the library
    missing = [name for name in MODULE_NAMES if not hasattr(module, name)]
    assert not missing, f"gpuflow/backends/{backend}.py lacks {missing} (see base.py)"
    problem = module.import_problem()
    assert problem is None or isinstance(problem, str)
    assert module.EXAMPLE_SPECS and all(isinstance(s, str) for s in module.EXAMPLE_SPECS)


def test_the_registry_is_the_one_list():
    assert BACKENDS == tuple(b.name for b in REGISTRY)
    assert set(INSTALL_HINTS) == set(BACKENDS)
    for b in REGISTRY:
        for head in b.heads:
            assert parse_spec(f"{head}:x") == (b.name, "x")
            assert parse_spec(head.upper()) == (b.name, "")


def test_unknown_head_names_every_head():
    with pytest.raises(gf.DeviceError) as info:
        parse_spec("tpu:0")
    for b in REGISTRY:
        assert any(f"'{h}" in str(info.value) for h in b.heads), (b.name, str(info.value))


def test_capabilities_have_their_types(device):
    assert isinstance(device.ops.writes_out, bool)
    for flag in ("mutable_arrays", "is_host", "is_gpu", "supports_dlpack", "flushes_subnormals"):
        assert isinstance(getattr(device, flag), bool), flag
    assert device.collectives is None or isinstance(device.collectives, str)
    assert device.index is None or isinstance(device.index, int)
    assert isinstance(device.identity(), str)
    if device.ops.writes_out:  # writing into out= needs arrays that can be written
        assert device.mutable_arrays


def test_every_op_agrees_with_the_generic_one(device):
    """Each backend's op (its library's function, or its own route) gives what the generic
    `Ops` gives on the array namespace, with and without an out= buffer."""
    rng = np.random.default_rng(0)
    a_host, b_host = rng.uniform(0.5, 2.0, (3, 4)), rng.uniform(0.5, 2.0, (3, 4))
    a, b = device.put(a_host), device.put(b_host)
    mat = device.put(rng.normal(size=(4, 2)))
    generic, ops = Ops(device.xp), device.ops
    f64 = device.dtype("float64")
    cases = {
        "add": (a, b), "subtract": (a, b), "multiply": (a, b), "divide": (a, b),
        "maximum": (a, b), "tanh": (a,), "exp": (a,), "log": (a,), "sqrt": (a,),
        "matmul": (a, mat), "greater": (a, b, f64), "equal": (a, a, f64),
    }
    for name, args in cases.items():
        want = device.to_host(getattr(generic, name)(*args))
        got = getattr(ops, name)(*args)
        np.testing.assert_allclose(device.to_host(got), want, rtol=1e-15, err_msg=name)
        if ops.writes_out:
            out = device.new_buffer(tuple(want.shape), f64)
            got = getattr(ops, name)(*args, out=out)
            assert got is out, f"{name} did not write into out="
            np.testing.assert_allclose(device.to_host(out), want, rtol=1e-15, err_msg=name)
    for name in ("sum", "max"):
        for axis, keepdims in ((None, False), (1, True), (0, False)):
            want = device.to_host(getattr(generic, name)(a, axis=axis, keepdims=keepdims))
            got = getattr(ops, name)(a, axis=axis, keepdims=keepdims)
            np.testing.assert_allclose(device.to_host(got), want, rtol=1e-14,
                                       err_msg=f"{name} axis={axis}")


def test_fused_routes_agree_with_the_ops_they_replace(device):
    """The optional one-kernel routes (torch: matmul_add, subtract_scaled) give what the
    two-op route they stand in for gives (subtract_scaled rounds once: within an ulp), with and
    without out=."""
    ops = device.ops
    routes = [n for n in ("matmul_add", "subtract_scaled") if getattr(ops, n) is not None]
    if not routes:
        pytest.skip(f"{device.name} has no fused routes: nodes take the two-op ones")
    rng = np.random.default_rng(1)
    f64 = device.dtype("float64")
    G, y = device.put(rng.normal(size=(5, 3))), device.put(rng.normal(size=(5, 3)))
    x, w, b = (device.put(rng.normal(size=s)) for s in ((5, 4), (4, 3), (3,)))
    want = {"matmul_add": device.to_host(x) @ device.to_host(w) + device.to_host(b)}
    args = {"matmul_add": (x, w, b)}
    for name in routes:
        if name == "subtract_scaled":
            value = device.put(device.to_host(G))
            ops.subtract_scaled(value, y, 0.3)
            step = 0.3 * device.to_host(y)
            two_op = device.to_host(G) - step
            # One rounding against two: apart by at most the product's rounding and the
            # result's.
            assert np.all(np.abs(device.to_host(value) - two_op)
                          <= np.spacing(np.abs(step)) + np.spacing(np.abs(two_op)))
            continue
        np.testing.assert_allclose(device.to_host(getattr(ops, name)(*args[name])), want[name],
                                   rtol=1e-14, err_msg=name)
        out = device.new_buffer(tuple(want[name].shape), f64)
        got = getattr(ops, name)(*args[name], out=out)
        assert got is out, f"{name} did not write into out="
        np.testing.assert_allclose(device.to_host(out), want[name], rtol=1e-14, err_msg=name)


def test_ufunc_ops_bind_the_table_of_routes_they_are_given():
    class Lib:  # a library with some of the ops, under NumPy's names
        add = staticmethod(np.add)
        tanh = staticmethod(np.tanh)

    class Mine(UfuncOps):
        def tanh(self, x, out=None):
            return "mine"

    ops = Mine(None, Lib, routes={"add": Lib.add})
    assert ops.add is np.add                     # bound as it is: the library's own function
    assert ops.tanh(1.0) == "mine"              # not in the table: the backend's own method
    assert ops.exp.__func__ is Ops.exp          # in neither: the generic one
    with pytest.raises(TypeError, match="addd"):  # a route the contract does not declare
        UfuncOps(None, Lib, routes={"addd": np.add})
    before = gf.get_num_threads()  # GPUFLOW_NUM_THREADS may have turned splitting on
    gf.set_num_threads(1)
    try:  # with splitting off (the default), the cpu ops are NumPy's own functions
        cpu = gf.get_device("cpu").ops
        assert all(getattr(cpu, n) is getattr(np, n) for n in Ops.LIBRARY_NAMED)
    finally:
        gf.set_num_threads(before)


def test_every_route_a_backend_binds_is_declared_in_ops(device):
    """The op you read is the op that runs: each public op or route of a device's ops (its
    class's methods, the table it binds) is declared in `Ops`, and each optional route is None
    (the portable route runs) or callable."""
    ops = device.ops
    names = {n for n in dir(ops) if not n.startswith("_") and callable(getattr(ops, n))}
    assert names <= OP_NAMES, f"{device.name} binds routes Ops does not declare: " \
                              f"{sorted(names - OP_NAMES)} (declare them in backends/ops.py)"
    for name in Ops.OPTIONAL:
        route = getattr(Ops, name)
        assert route is None, f"Ops.{name} must default to None (the portable route)"
        assert getattr(ops, name) is None or callable(getattr(ops, name)), name
    declared = Ops.__dict__.get("__annotations__", {})
    assert set(Ops.OPTIONAL) <= set(declared), "each optional route is annotated in Ops"


def test_rank_spec_gives_gpus_an_index_and_leaves_the_rest():
    assert rank_spec("cpu", 3) == "cpu"
    assert rank_spec("array_api_strict:device1", 1) == "array_api_strict:device1"
    assert rank_spec("auto", 1) in ("cpu", "cuda:1", "cuda:0")
    if importlib.util.find_spec("torch") is not None:
        assert rank_spec("torch:cuda", 1).startswith("torch:cuda:")
        assert rank_spec("torch:cuda:2", 1) == "torch:cuda:2"


# -- distributed training asks the device for its collectives ------------------------------------
class _Comm:
    """mpi4py's world, as far as Context.communicator uses it: allgather over two ranks where
    rank 1 answers `other`."""

    def __init__(self, other):
        self.other = other

    def allgather(self, mine):
        return [mine, self.other(mine)]


class _FastDevice(Device):
    """A device with its own collectives, as CuPy has NCCL."""

    collectives = "FASTLINK"
    is_gpu = True
    is_host = False

    def __init__(self, problem=None):
        super().__init__("fast:0", gf.get_device("cpu").xp, None)
        self.problem = problem

    def collectives_problem(self):
        return self.problem

    def communicator(self, mpi_comm):
        return ("fastlink communicator", mpi_comm)

    def identity(self):
        return "bus 0"


def test_a_device_with_collectives_gets_its_own_communicator():
    comm = _Comm(lambda mine: (None, mine[1], "bus 1"))  # rank 1: its own GPU
    ctx = Context(0, 2, 0, comm)
    assert ctx.communicator(_FastDevice()) == ("fastlink communicator", comm)


@pytest.mark.parametrize("problem, other, why", [
    ("no library here", lambda mine: (None, mine[1], "bus 1"), "rank 0: no library here"),
    (None, lambda mine: mine, "FASTLINK needs one GPU per rank"),  # both ranks on bus 0
])
def test_collectives_fall_back_to_mpi_and_say_why(problem, other, why, capsys):
    ctx = Context(0, 2, 0, _Comm(other))
    comm = ctx.communicator(_FastDevice(problem))
    assert type(comm).__name__ == "MpiCommunicator"
    assert why in capsys.readouterr().err


def test_to_host_is_the_one_way_back(device):
    """backends.to_host (used by to_numpy, checkpoints, moving a graph, the gradient check): a
    device's array comes back as a new host array; a host value as it is, or copied."""
    from gpuflow.backends import LEDGER, to_host
    host = np.arange(6.0).reshape(2, 3)
    array = device.put(host)
    back = to_host(array, device, what="test")
    assert isinstance(back, np.ndarray) and back is not array
    np.testing.assert_array_equal(back, host)
    if device.mutable_arrays:  # never the live array
        back[...] = -1
        np.testing.assert_array_equal(device.to_host(array), host)
    assert to_host(host, None) is host and to_host(3.0, device) == 3.0
    copied = to_host(host, None, copy=True)
    assert copied is not host and np.array_equal(copied, host)
    with LEDGER.enforcing():  # strict mode: `allowed` lets it through
        np.testing.assert_array_equal(to_host(array, device, allowed=True), host)
        if not device.is_host:  # a host device moves nothing, so records nothing
            with pytest.raises(gf.TransferError):
                to_host(array, device)
    np.testing.assert_array_equal(gf.to_numpy(array), host)
