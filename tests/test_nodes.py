"""Each node: forward against NumPy, a float64 central-difference gradient check on every device,
the MiniFlow lesson's numbers, and extreme inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import gpuflow as gf
from conftest import Project, assert_on_device, central_difference, host

RNG = np.random.default_rng(1234)


def _away_from_zero(shape):
    x = RNG.uniform(0.2, 2.0, size=shape)
    return x * RNG.choice([-1.0, 1.0], size=shape)


# Each case: a builder taking Input nodes and returning the node under test, and host inputs.
CASES = {
    "Linear": (lambda X, W, b: gf.Linear(X, W, b),
               [RNG.normal(size=(5, 3)), RNG.normal(size=(3, 4)), RNG.normal(size=4)]),
    "Sigmoid": (gf.Sigmoid, [RNG.normal(scale=3.0, size=(4, 3))]),
    "Tanh": (gf.Tanh, [RNG.normal(size=(4, 3))]),
    "ReLU": (gf.ReLU, [_away_from_zero((4, 3))]),
    "MSE": (gf.MSE, [RNG.normal(size=(6, 1)), RNG.normal(size=(6, 1))]),
    "MSE-flat-y": (gf.MSE, [RNG.normal(size=6), RNG.normal(size=(6, 1))]),
    "SoftmaxCrossEntropy": (lambda logits: gf.SoftmaxCrossEntropy(gf.Input(name="labels"),
                                                                  logits),
                            [RNG.normal(scale=2.0, size=(5, 4))]),
}
LABEL_VALUES = np.array([0, 3, 1, 1, 2])


def _build(name, device):
    """Inputs, the node under test, and the scalar loss on top of it."""
    builder, values = CASES[name]
    inputs = [gf.Input(name=f"x{i}") for i in range(len(values))]
    node = builder(*inputs)
    feed = dict(zip(inputs, values))
    if isinstance(node, gf.SoftmaxCrossEntropy):
        feed[node.inbound_nodes[0]] = LABEL_VALUES
    if node.is_loss:
        loss = node
    else:
        R = gf.Input(name="R")
        loss = Project(node, R)
        feed[R] = RNG.normal(size=values[0].shape if name != "Linear" else (5, 4))
    graph = gf.topological_sort(feed, device=device, dtype="float64")
    return inputs, values, node, loss, graph


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_matches_central_differences(name, device):
    inputs, values, node, loss, graph = _build(name, device)
    gf.forward_and_backward(graph)
    for inp, x0 in zip(inputs, values):
        analytic = host(device, inp.gradients[inp])
        assert analytic.shape == x0.shape, f"{name}: gradient of {inp.label} has shape " \
                                           f"{analytic.shape}, value {x0.shape}"
        numeric = central_difference(inp, x0, lambda: gf.forward_pass(loss, graph), device)
        bad = ~np.isclose(analytic, numeric, rtol=1e-6, atol=1e-8)
        assert not bad.any(), (
            f"{name} on {device.name}: d loss / d {inp.label} (shape {x0.shape}) differs at "
            f"{np.argwhere(bad)[:3].tolist()}: analytic {analytic[bad][:3]}, "
            f"numeric {numeric[bad][:3]}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_values_and_gradients_stay_on_the_device(name, device):
    inputs, _, node, loss, graph = _build(name, device)
    gf.forward_and_backward(graph)
    for n in graph:
        assert_on_device(device, n.value, f"{n.label}.value")
        for target, g in n.gradients.items():
            if not isinstance(g, float):
                assert_on_device(device, g, f"{n.label}.gradients[{target.label}]")


def test_forward_matches_numpy(device):
    x, w, b = RNG.normal(size=(5, 3)), RNG.normal(size=(3, 4)), RNG.normal(size=4)
    X, W, B = gf.Input(), gf.Input(), gf.Input()
    lin = gf.Linear(X, W, B)
    outs = {gf.Sigmoid(lin): 1 / (1 + np.exp(-(x @ w + b))), gf.Tanh(lin): np.tanh(x @ w + b),
            gf.ReLU(lin): np.maximum(x @ w + b, 0)}
    graph = gf.topological_sort({X: x, W: w, B: b}, device=device)
    gf.forward_pass(lin, graph)
    np.testing.assert_allclose(host(device, lin.value), x @ w + b, rtol=1e-12)
    for node, expected in outs.items():
        np.testing.assert_allclose(host(device, node.value), expected, rtol=1e-12, atol=1e-15)


def test_softmax_cross_entropy_value(device):
    logits = RNG.normal(size=(6, 5))
    labels = np.array([0, 4, 2, 2, 1, 3])
    L, Z = gf.Input(), gf.Input()
    loss = gf.SoftmaxCrossEntropy(L, Z)
    graph = gf.topological_sort({L: labels, Z: logits}, device=device)
    gf.forward_pass(loss, graph)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -logp[np.arange(6), labels].mean()
    np.testing.assert_allclose(float(host(device, loss.value)), expected, rtol=1e-12)
    assert not np.issubdtype(host(device, L.value).dtype, np.floating), "labels became floats"


# -- the MiniFlow lessons' numbers ---------------------------------------------------------------
LESSON_X = np.array([[-1., -2.], [-1, -2]])


def test_lesson_linear_and_sigmoid(device):
    X, W, b = gf.Input(), gf.Input(), gf.Input()
    f = gf.Linear(X, W, b)
    g = gf.Sigmoid(f)
    graph = gf.topological_sort({X: LESSON_X, W: np.array([[2., -3], [2., -3]]),
                                 b: np.array([-3., -5])}, device=device)
    out = host(device, gf.forward_pass(g, graph))
    np.testing.assert_allclose(host(device, f.value), [[-9., 4.], [-9., 4.]])
    np.testing.assert_allclose(out, [[1.23394576e-04, 9.82013790e-01]] * 2, rtol=1e-8)


def test_lesson_mse(device):
    y, a = gf.Input(), gf.Input()
    cost = gf.MSE(y, a)
    graph = gf.topological_sort({y: np.array([1, 2, 3]), a: np.array([4.5, 5, 10])}, device=device)
    np.testing.assert_allclose(float(host(device, gf.forward_pass(cost, graph))),
                               23.4166666667, rtol=1e-11)


def test_lesson_backprop(device):
    X, W, b, y = gf.Input(), gf.Input(), gf.Input(), gf.Input()
    cost = gf.MSE(y, gf.Sigmoid(gf.Linear(X, W, b)))
    graph = gf.topological_sort({X: LESSON_X, y: np.array([1, 2]), W: np.array([[2.], [3.]]),
                                 b: np.array([-3.])}, device=device)
    gf.forward_and_backward(graph)
    grads = [host(device, t.gradients[t]) for t in (X, y, W, b)]
    expected = [[[-3.34017280e-05, -5.01025919e-05], [-6.68040138e-05, -1.00206021e-04]],
                [0.9999833, 1.9999833], [[5.01028709e-05], [1.00205742e-04]], [-5.01028709e-05]]
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6)


# -- extreme inputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_extreme_inputs_give_no_nan_and_no_warning(device, dtype):
    big = np.array([[-1e4, -30.0, 0.0, 30.0, 1e4], [1e-30, -1e-30, 5.0, -5.0, 0.0]])
    Z, L = gf.Input(), gf.Input()
    nodes = [gf.Sigmoid(Z), gf.Tanh(Z), gf.ReLU(Z)]
    loss = gf.SoftmaxCrossEntropy(L, Z)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise", under="ignore"):
            graph = gf.topological_sort({Z: big, L: np.array([0, 4])}, device=device, dtype=dtype)
            gf.forward_and_backward(graph)
    for node in nodes + [loss]:
        assert np.isfinite(host(device, node.value)).all(), node.label
    assert np.isfinite(host(device, Z.gradients[Z])).all()
    s = host(device, nodes[0].value)
    assert s[0, 0] == 0.0 and s[0, 4] == 1.0 and abs(s[1, 0] - 0.5) < 1e-6
    # row 0: the label's logit is -1e4 against a max of 1e4: the loss is 2e4 / 2 rows, finite
    np.testing.assert_allclose(float(host(device, loss.value)), (2e4 + np.log1p(np.exp(-5) +
                               np.exp(-10) * 2 + 1) - 0.0) / 2, rtol=1e-3)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_relu_gradient_is_the_same_function_on_every_device_nan_and_inf_included(device):
    # (y > 0) * G on every device: an infinite G where the ReLU is off gives NaN (0 * inf), a
    # NaN input gives 0. (torch's threshold_backward differs on both; a one-kernel route
    # through it made torch:cpu train on where cpu stopped, so ReLU does not take it.)
    x = np.array([[-1.0, 0.0, 2.0, np.nan, -3.0, 1.0]])
    G = np.array([[np.inf, 1.0, 5.0, 7.0, 2.0, -np.inf]])
    X, R = gf.Input(), gf.Input()
    node = gf.ReLU(X)
    Project(node, R)
    gf.forward_and_backward(gf.topological_sort({X: x, R: G}, device=device,
                                                dtype="float64"))
    with np.errstate(invalid="ignore"):
        expected = (np.fmax(x, 0.0) > 0) * G
    np.testing.assert_array_equal(gf.to_numpy(X.gradients[X]), expected)
