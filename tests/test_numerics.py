"""Stable forms at extreme inputs (+-1e4, +-1e-30) in float32 and float64: sigmoid, tanh, the
log-sum-exp softmax cross-entropy and Adam's epsilon, forward and backward, with every warning
an error. test_nodes.py has the forward-only case for the activations; this extends it to
gradients and to the optimizers.

Why underflow is allowed: `np.errstate(all="raise")` also raises on *underflow*, and NumPy
sets that flag whenever a result is too small for the format and rounds to 0 or a subnormal,
e.g. exp(-2e4) in log-sum-exp (even in float64), or grad * grad = 1e-60 for Adam's second
moment in float32. Rounding such a value to 0 is the correct answer to working precision,
and the stable forms are written so that it only ever meets larger terms: after the row
maximum is subtracted, the softmax denominator is a sum that contains exp(0) = 1, and Adam
divides by sqrt(v) + eps with eps > 0. So the tests raise on overflow, invalid operations
(NaN) and division by zero, and let underflow round to zero.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest

import gpuflow as gf
from conftest import Project, host
from gpuflow.optim import SGD, Adam, AdamW

EXTREMES = np.array([-1e4, -30.0, -1e-30, 0.0, 1e-30, 30.0, 1e4])
DTYPES = ["float32", "float64"]


@contextlib.contextmanager
def strict_floats():
    """Every warning is an error; so is every floating-point overflow, NaN or division by 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise", under="ignore"):
            yield


def test_numpy_really_flags_the_underflow_we_allow():
    """The reason for under='ignore' above: exp of a very negative number sets the flag."""
    with np.errstate(all="raise"), pytest.raises(FloatingPointError, match="underflow"):
        np.exp(np.float64(-2e4))
    with np.errstate(all="raise", under="ignore"):
        assert np.exp(np.float64(-2e4)) == 0.0


def _activation(device, dtype, cls):
    Z, R = gf.Input(name="Z"), gf.Input(name="R")
    node = cls(Z, name="act")
    loss = Project(node, R)
    with strict_floats():
        graph = gf.topological_sort({Z: EXTREMES[None, :], R: np.ones((1, EXTREMES.size))},
                                    device=device, dtype=dtype)
        gf.forward_and_backward(graph)
    return host(device, node.value)[0], host(device, Z.gradients[Z])[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_and_its_gradient_at_extremes(device, dtype):
    s, grad = _activation(device, dtype, gf.Sigmoid)
    assert np.isfinite(s).all() and np.isfinite(grad).all(), (s, grad)
    tol = 1e-6 if dtype == "float32" else 1e-15
    assert s[0] == 0.0 and s[-1] == 1.0, s
    np.testing.assert_allclose(s[2:5], 0.5, atol=tol)
    np.testing.assert_allclose(grad[2:5], 0.25, atol=tol)  # s (1 - s) at 0
    assert grad[0] == 0.0 and grad[-1] == 0.0, grad        # saturated: exactly zero, not NaN
    assert (grad >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_and_its_gradient_at_extremes(device, dtype):
    t, grad = _activation(device, dtype, gf.Tanh)
    assert np.isfinite(t).all() and np.isfinite(grad).all(), (t, grad)
    assert t[0] == -1.0 and t[-1] == 1.0, t
    np.testing.assert_allclose(t[2:5], [-1e-30, 0.0, 1e-30], rtol=1e-6, atol=0)
    np.testing.assert_allclose(grad[2:5], 1.0)
    assert grad[0] == 0.0 and grad[-1] == 0.0, grad


def _log_softmax(z):
    """Reference in float64 (log-sum-exp, NumPy)."""
    with np.errstate(under="ignore"):
        m = z.max(axis=1, keepdims=True)
        return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_and_its_gradient_at_extremes(device, dtype):
    logits = np.array([[1e4, -1e4, 0.0, 1e-30],
                       [-1e4, -1e4, -1e4, -1e4],      # equal logits, all hugely negative
                       [1e-30, -1e-30, 1e-30, 0.0],
                       [1e4, 1e4 - 1.0, -1e4, 30.0]])
    labels = np.array([1, 2, 0, 1])
    Z, L = gf.Input(name="Z"), gf.Input(name="L")
    loss = gf.SoftmaxCrossEntropy(L, Z)
    with strict_floats():
        graph = gf.topological_sort({Z: logits, L: labels}, device=device, dtype=dtype)
        gf.forward_and_backward(graph)
    value = float(host(device, loss.value))
    grad = host(device, Z.gradients[Z])
    expected_loss = -_log_softmax(logits)[np.arange(4), labels].mean()
    np.testing.assert_allclose(value, expected_loss, rtol=1e-6)   # about 2e4 / 4, finite
    probs = np.exp(_log_softmax(logits))
    expected_grad = (probs - np.eye(4)[labels]) / 4
    assert np.isfinite(grad).all(), grad
    np.testing.assert_allclose(grad, expected_grad, atol=1e-6 if dtype == "float32" else 1e-12)
    np.testing.assert_allclose(grad.sum(axis=1), 0.0, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [lambda p: Adam(p, lr=1e-3), lambda p: AdamW(p, lr=1e-3),
                                  lambda p: SGD(p, lr=1e-3, momentum=0.9, nesterov=True)],
                         ids=["Adam", "AdamW", "SGD-nesterov"])
def test_optimizers_at_extreme_gradients(device, dtype, make):
    """Gradients of +-1e4, +-1e-30 and exactly 0: every update is finite, and Adam's step is
    never larger than lr (its epsilon keeps 0 / 0 away when v underflows or is zero)."""
    grads = np.array([1e4, -1e4, 1e-30, -1e-30, 0.0, 1.0])
    p = gf.Parameter((grads.size,), "zeros", name="p")
    gf.topological_sort({p: np.zeros(grads.size)}, device=device, dtype=dtype)
    opt = make([p])
    with strict_floats():
        for step in range(3):
            p.gradients[p] = device.put(grads, device.dtype(dtype))
            before = host(device, p.value).copy()
            opt.step()
            after = host(device, p.value)
            assert np.isfinite(after).all(), f"step {step}: {after}"
            if isinstance(opt, Adam):
                moved = np.abs(after - before)
                assert (moved <= 1e-3 * (1 + 1e-5)).all(), f"step {step}: moved {moved}"
                assert moved[4] == 0.0, f"zero gradient moved the weight: {moved}"
                assert moved[2] < 1e-15, f"a 1e-30 gradient took a full step: {moved}"
    assert np.sign(host(device, p.value)[0]) == -1.0  # descent


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_state_for_tiny_gradients_stays_finite(dtype):
    """float32 grad * grad for 1e-30 underflows to 0: v is 0, the step is m / eps, tiny."""
    p = gf.Parameter((2,), "zeros", name="p")
    gf.topological_sort({p: np.zeros(2)}, device="cpu", dtype=dtype)
    opt = Adam([p], lr=1.0)
    p.gradients[p] = np.array([1e-30, -1e-30], dtype=dtype)
    with strict_floats():
        opt.step()
    v = opt.state[p]["v"]
    assert np.isfinite(v).all() and (v >= 0).all()
    assert np.all(np.abs(p.value) < 1e-20), p.value


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_whole_training_step_at_extreme_inputs(device, dtype):
    """Sigmoid and tanh layers fed +-1e4 and 1e-30, softmax CE on top, Adam: one strict step."""
    X, y = gf.Input(name="X"), gf.Input(name="y")
    h, _ = gf.dense(X, 4, 5, name="h", activation="sigmoid", rng=0)
    h2, _ = gf.dense(h, 5, 5, name="h2", activation="tanh", rng=1)
    logits, _ = gf.dense(h2, 5, 3, name="out", rng=2)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=device, dtype=dtype,
                     inputs=[X, y], check_finite=True)
    opt = Adam(graph, lr=1e-2)
    xb = np.array([[1e4, -1e4, 1e-30, 0.0], [-1e-30, 1e4, 1e4, -1e4]])
    with strict_floats():
        for _ in range(3):
            graph.step(xb, np.array([0, 2]))  # check_finite would name a NaN/Inf
            opt.step()
