"""Libraries with immutable arrays (JAX): nodes, graphs and optimizers use what an op returns.

The "frozen" test device is NumPy with JAX's array semantics: no in-place operators (so Python
computes `x += y` as `x = x + y`, a new array), `x[...] = v` and `out=` into an array refused,
and `Ops` that return new arrays. Training on it must give the CPU's numbers: state updated in
place but not assigned back would stop changing here, and a write into an array raises.
"""

from __future__ import annotations

import inspect
import types

import array_api_compat.numpy as compat_numpy
import numpy as np
import pytest

import gpuflow as gf
from gpuflow.backends import Ops
from gpuflow.backends.numpy import NumpyDevice
from gpuflow.optim import SGD, Adam, AdamW


class Frozen(np.ndarray):
    """A NumPy array that cannot change, as JAX's cannot."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("frozen array: written in place (use what the op returns)")

    def _no_in_place_operator(self, other):
        return NotImplemented  # as for a class without it: Python computes x = x + y

    __iadd__ = __isub__ = __imul__ = __itruediv__ = __imatmul__ = __ipow__ = (
        __ifloordiv__) = _no_in_place_operator
    __setitem__ = _refuse

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if out is not None and any(isinstance(o, Frozen) for o in out):
            self._refuse()
        inputs = tuple(x.view(np.ndarray) if isinstance(x, Frozen) else x for x in inputs)
        if out is not None:
            kwargs["out"] = out
        return _freeze(getattr(ufunc, method)(*inputs, **kwargs))


def _freeze(value):
    return value.view(Frozen) if type(value) is np.ndarray else value


def _frozen_namespace():
    """array-api-compat's NumPy namespace whose functions return Frozen arrays."""
    ns = types.ModuleType("frozen_xp")
    for name, obj in vars(compat_numpy).items():
        if name.startswith("__"):
            continue
        if callable(obj) and not inspect.isclass(obj):
            obj = (lambda f: lambda *a, **k: _freeze(f(*a, **k)))(obj)
        setattr(ns, name, obj)
    return ns


class FrozenDevice(NumpyDevice):
    """NumPy with immutable arrays and ops that return new ones (no out=)."""

    def _make_ops(self):
        return Ops(self.xp)

    def owns(self, value):
        return ((isinstance(value, np.generic) or (isinstance(value, Frozen) and value.ndim > 0))
                and value.dtype.kind in "biuf")

    def _put(self, host, dtype):
        out = super()._put(host, dtype)
        return _freeze(out) if isinstance(out, np.ndarray) else out


FROZEN = FrozenDevice("frozen", _frozen_namespace(), "cpu")


def test_the_frozen_device_never_changes_an_array():
    """The check itself: `+=` makes a new array, writes raise, ops give new arrays."""
    a = FROZEN.put(np.ones((2, 3)))
    b = a
    b += 1.0
    b *= 3.0
    assert b is not a and isinstance(b, Frozen)
    np.testing.assert_array_equal(b, np.full((2, 3), 6.0))
    for write in (lambda: a.__setitem__(..., 0.0), lambda: np.multiply(a, 0.0, out=a)):
        with pytest.raises(TypeError, match="frozen"):
            write()
    assert FROZEN.ops.add(a, a, out=a) is not a
    assert isinstance(FROZEN.xp.asarray(a, copy=True), Frozen)
    np.testing.assert_array_equal(a, np.ones((2, 3)))


def _miniflow_losses(device, steps=4):
    """MiniFlow's loop: Linear, Sigmoid, Tanh, ReLU, MSE; a dead-end Input; sgd_update."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 1))
    w1, b1 = rng.normal(size=(3, 4)), rng.normal(size=(4,))
    w2, b2 = rng.normal(size=(4, 1)), rng.normal(size=(1,))
    X, Y, W1, B1, W2, B2 = (gf.Input(name=n) for n in ("X", "Y", "W1", "B1", "W2", "B2"))
    unused = gf.Input(name="unused")  # feeds a node whose output no loss reads: a dead end
    gf.ReLU(unused)
    h = gf.Tanh(gf.Sigmoid(gf.Linear(X, W1, B1)))
    cost = gf.MSE(Y, gf.Linear(gf.ReLU(h), W2, B2))
    feed = {X: x, Y: y, W1: w1, B1: b1, W2: w2, B2: b2, unused: np.ones((2, 2))}
    graph = gf.topological_sort(feed, device=device)
    losses = []
    for _ in range(steps):
        gf.forward_and_backward(graph)
        losses.append(float(device.to_host(cost.value)))
        gf.sgd_update([W1, B1, W2, B2], learning_rate=0.1)
    weights = [device.to_host(t.value) for t in (W1, B1, W2, B2)]
    return losses, weights, device.to_host(unused.gradients[unused])


def test_miniflow_training_on_immutable_arrays_matches_the_cpu():
    cpu = gf.get_device("cpu")
    losses, weights, dead = _miniflow_losses(FROZEN)
    want_losses, want_weights, want_dead = _miniflow_losses(cpu)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-12)
    for got, want in zip(weights, want_weights):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(dead, np.zeros((2, 2)))
    np.testing.assert_array_equal(want_dead, np.zeros((2, 2)))


OPTIMIZERS = [
    ("sgd", lambda g: SGD(g, lr=0.1)),
    ("momentum, weight decay", lambda g: SGD(g, lr=0.1, momentum=0.9, weight_decay=1e-2)),
    ("nesterov", lambda g: SGD(g, lr=0.1, momentum=0.9, nesterov=True)),
    ("adam, L2", lambda g: Adam(g, lr=1e-2, weight_decay=1e-2)),
    ("adamw", lambda g: AdamW(g, lr=1e-2)),
]


def _graph_training(device, make_optimizer, steps=4):
    """Graph + an optimizer on an MLP with softmax cross-entropy; losses and final weights."""
    rng = np.random.default_rng(1)
    x, labels = rng.normal(size=(8, 5)), rng.integers(0, 3, 8)
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, params = gf.mlp(X, [5, 6, 3], activation="tanh", seed=2)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=device, dtype="float64",
                     inputs=[X, y])
    opt = make_optimizer(graph)
    losses = []
    for _ in range(steps):
        losses.append(graph.item(graph.step(x, labels)))
        opt.step()
    state = {f"{k}": np.asarray(v) for k, v in opt.state_dict().items() if k != "t"}
    return losses, [device.to_host(p.value) for p in graph.parameters], state


@pytest.mark.parametrize("name, make_optimizer", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_optimizers_on_immutable_arrays_match_the_cpu(name, make_optimizer):
    losses, weights, state = _graph_training(FROZEN, make_optimizer)
    want_losses, want_weights, want_state = _graph_training(gf.get_device("cpu"),
                                                            make_optimizer)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-12)
    for got, want in zip(weights, want_weights):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    assert state.keys() == want_state.keys()
    for key in state:  # the state was reassigned each step, not left at its first value
        np.testing.assert_allclose(state[key], want_state[key], rtol=1e-12, err_msg=key)
    assert losses[-1] < losses[0]


def test_a_dead_ends_zero_gradient_is_zeros_again_at_each_step(device):
    """Whatever a reader wrote into it (a clip scaling by NaN), the next step gives zeros."""
    X, W, b = gf.Input(name="X"), gf.Input(name="W"), gf.Input(name="b")
    dead = gf.Sigmoid(gf.Linear(X, W, b), name="dead")   # no outbound node, not a loss
    graph = gf.topological_sort({X: np.ones((3, 2)), W: np.ones((2, 4)), b: np.zeros(4)},
                                device=device)
    for _ in range(3):
        gf.forward_and_backward(graph)
        grad = dead.upstream_gradient()
        np.testing.assert_array_equal(device.to_host(grad), np.zeros((3, 4)))
        if device.ops.writes_out:   # a kept array: scribble on it, as a careless reader may
            grad[...] = float("nan")
