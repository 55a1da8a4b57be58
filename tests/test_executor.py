"""The executor: gradients only where needed, the transfer ledger and its strict mode, and no
growth of memory across steps."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import gpuflow as gf
from gpuflow.backends import LEDGER
from gpuflow.optim import SGD


def _classifier(seed=0, sizes=(8, 16, 4)):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, params = gf.mlp(X, list(sizes), seed=seed)
    loss = gf.SoftmaxCrossEntropy(y, logits)
    return X, y, logits, loss, params


def _batch(n=6, sizes=(8, 16, 4), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, sizes[0])), rng.integers(0, sizes[-1], n)


def test_graph_computes_no_gradient_for_data(device):
    X, y, logits, loss, params = _classifier()
    graph = gf.Graph(loss, device=device, dtype="float64", inputs=[X, y])
    graph.step(*_batch())
    assert X not in graph.nodes[-1].gradients
    first = next(n for n in graph.nodes if isinstance(n, gf.Linear))
    assert X not in first.gradients, "dX of the data was computed though nothing trains X"
    assert set(graph.parameters) == set(params.values())
    for p in graph.parameters:
        assert p in p.gradients and device.owns(p.gradients[p])


def test_graph_and_miniflow_give_the_same_gradients(device):
    xb, yb = _batch()
    X, y, logits, loss, params = _classifier()
    graph = gf.Graph(loss, device=device, dtype="float64", inputs=[X, y])
    graph.step(xb, yb)
    lean = {name: device.to_host(p.gradients[p]) for name, p in params.items()}
    sorted_nodes = gf.topological_sort({X: xb, y: yb}, device=device, dtype="float64")
    gf.forward_and_backward(sorted_nodes)
    for name, p in params.items():
        np.testing.assert_allclose(device.to_host(p.gradients[p]), lean[name], rtol=1e-13)
    assert X.gradients[X].shape == xb.shape, "MiniFlow mode computes every Input's gradient"


def test_run_does_no_gradient_work(device):
    X, y, logits, loss, params = _classifier()
    graph = gf.Graph(loss, device=device, dtype="float64", inputs=[X, y], outputs=[logits])
    xb, yb = _batch()
    out = graph.run(logits, xb)
    assert tuple(out.shape) == (6, 4)
    assert all(not p.gradients for p in params.values())
    ref = graph.run(logits, {X: xb})
    np.testing.assert_array_equal(device.to_host(out), device.to_host(ref))


def test_ledger_counts_one_upload_per_batch_input_and_one_loss_read():
    device = gf.get_device("array_api_strict:device1")
    X, y, logits, loss, params = _classifier()
    graph = gf.Graph(loss, device=device, dtype="float64", inputs=[X, y])
    opt = SGD(graph, 0.1)
    xb, yb = _batch()
    graph.step(xb, yb)
    opt.step()
    LEDGER.reset()
    for _ in range(5):
        graph.item(graph.step(xb, yb))
        opt.step()
    counts = LEDGER.snapshot()
    assert counts["h2d_calls"] == 10 and counts["h2d_bytes"] == 5 * (xb.nbytes + yb.nbytes)
    assert counts["d2h_calls"] == 5 and counts["syncs"] == 0, counts


class _Leaky(gf.Node):
    """A custom node that (wrongly) round-trips its input through the host every step."""

    def __init__(self, node):
        gf.Node.__init__(self, [node], name="leaky")

    def forward(self):
        host = self.device.to_host(self.inbound_nodes[0].value)
        self.value = self.device.put(host)

    def backward(self):
        self.gradients[self.inbound_nodes[0]] = self.upstream_gradient()


def test_strict_mode_names_the_node_that_transfers():
    device = gf.get_device("array_api_strict:device1")
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, params = gf.mlp(_Leaky(X), [8, 4], seed=0)
    loss = gf.SoftmaxCrossEntropy(y, logits)
    graph = gf.Graph(loss, device=device, dtype="float64", inputs=[X, y], strict=True)
    xb, yb = _batch(sizes=(8, 4))
    graph.step(xb, yb)  # warm-up step: allowed
    with pytest.raises(gf.TransferError, match=r"_Leaky 'leaky'.forward\(\): strict transfer "
                                               r"mode: d2h of 384 bytes on "
                                               r"array_api_strict:device1"):
        graph.step(xb, yb)


class _Peek(gf.Node):
    """x, after reading its largest value as a Python float: a hidden device-to-host read."""

    def __init__(self, node):
        gf.Node.__init__(self, [node], name="peek")

    def forward(self):
        x = self.inbound_nodes[0].value
        self.seen = float(self.xp.max(x))
        self.value = x

    def backward(self):
        self.gradients[self.inbound_nodes[0]] = self.upstream_gradient()


def _peek_graph(device, strict):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = gf.mlp(_Peek(X), [8, 4], seed=0)
    return gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=device, dtype="float64",
                    inputs=[X, y], strict=strict)


def test_strict_mode_sees_a_nodes_own_float_read_on_array_api_strict():
    # what strict mode claims (docs/guide.md, Graph's docstring): a node's float()/bool()/int()
    # of a device array is refused on array_api_strict's devices (a stand-in for a GPU), and not
    # seen on the host devices, where it moves nothing
    xb, yb = _batch(sizes=(8, 4))
    graph = _peek_graph("array_api_strict:device1", strict=True)
    graph.step(xb, yb)  # the first step may read
    with pytest.raises(gf.TransferError, match=r"_Peek 'peek'.forward\(\): strict transfer "
                                               r"mode: d2h .* \(float\(\) of an array\)"):
        graph.step(xb, yb)
    before = LEDGER.snapshot()["d2h_calls"]
    x = graph.inputs[0].value
    assert float(graph.device.xp.max(x)) == xb.max()  # outside a strict step: as ever
    assert LEDGER.snapshot()["d2h_calls"] == before
    for device, strict in (("array_api_strict:device1", False), ("cpu", True)):
        graph = _peek_graph(device, strict)
        for _ in range(3):
            graph.step(xb, yb)


def test_strict_mode_allows_batch_upload_and_loss_read(monkeypatch):
    monkeypatch.setenv("GPUFLOW_STRICT_TRANSFERS", "1")
    device = gf.get_device("array_api_strict:device1")
    X, y, logits, loss, params = _classifier()
    graph = gf.Graph(loss, device=device, dtype="float64", inputs=[X, y])
    assert graph.strict
    opt = SGD(graph, 0.1)
    xb, yb = _batch()
    losses = []
    for _ in range(4):
        losses.append(graph.item(graph.step(xb, yb)))
        opt.step()
    assert losses[-1] < losses[0]


def test_memory_does_not_grow_across_steps():
    X, y, logits, loss, params = _classifier(sizes=(32, 64, 10))
    graph = gf.Graph(loss, device="cpu", dtype="float32", inputs=[X, y])
    opt = SGD(graph, 0.01, momentum=0.9)
    xb, yb = _batch(n=16, sizes=(32, 64, 10))
    for _ in range(20):
        graph.step(xb, yb)
        opt.step()
    tracemalloc.start()
    try:
        for _ in range(10):
            graph.step(xb, yb)
            opt.step()
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(300):
            graph.step(xb, yb)
            opt.step()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 4096, f"memory grew by {after - before} bytes over 300 steps"


def test_check_finite_names_the_node_and_step(device):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    hidden, _ = gf.dense(X, 4, 3, name="hidden", activation="tanh", rng=0)
    logits, _ = gf.dense(hidden, 3, 2, name="out", rng=1)
    loss = gf.SoftmaxCrossEntropy(y, logits)
    graph = gf.Graph(loss, device=device, dtype="float64", inputs=[X, y], check_finite=True)
    xb, yb = np.ones((3, 4)), np.array([0, 1, 1])
    graph.step(xb, yb)
    graph.step(xb, yb)
    bad = xb.copy()
    bad[1, 2] = np.nan
    with pytest.raises(gf.GraphError, match=r"first appeared in Linear 'hidden', in its value "
                                            r"\(shape \(3, 3\)\) at step 2"):
        graph.step(bad, yb)


def test_check_finite_checks_node_state_and_names_batchnorm(device):
    # Regression (issue 18.5): BatchNorm's running variance overflowed to inf while every value
    # and gradient stayed finite (a batch variance of inf gives inv_std 0, xhat 0), and the
    # check said nothing; NumPy printed overflow warnings from norm.py instead.
    import warnings
    X, y = gf.Input(name="X"), gf.Input(name="y")
    h, _ = gf.dense(X, 4, 3, name="fc", rng=0)
    h, _ = gf.batchnorm(h, 3, name="bn")
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, h), device=device, dtype="float32",
                     inputs=[X, y], check_finite=True)
    rng = np.random.default_rng(0)
    graph.step(rng.normal(size=(8, 4)), np.arange(8) % 3)  # a finite state passes
    huge = rng.normal(size=(8, 4)) * 1e20  # squares past float32's 3.4e38
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error replaces NumPy's warnings
        with pytest.raises(gf.GraphError, match=r"first appeared in BatchNorm 'bn', in its "
                                                r"state running_var \(shape \(3,\)\) at step 1"):
            graph.step(huge, np.arange(8) % 3)


def test_graph_needs_a_dtype():
    X, y, logits, loss, params = _classifier()
    with pytest.raises(gf.GraphError, match="dtype=None(.|\n)*help: pass dtype='float32'"):
        gf.Graph(loss, dtype=None)


def test_two_graphs_over_shared_nodes_each_keep_working(device):
    """A training graph and a second loss over the same net: each re-plans when needed."""
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, params = gf.mlp(X, [8, 16, 4], seed=0)
    train = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=device, dtype="float64",
                     inputs=[X, y])
    target = gf.Input(name="target")
    other = gf.Graph(gf.MSE(target, logits), device=device, dtype="float64",
                     inputs=[X, target])
    xb, yb = _batch()
    expected = {}
    for name, graph, batch in (("ce", train, (xb, yb)), ("mse", other, (xb, np.ones((6, 4))))):
        graph.step(*batch)
        expected[name] = {k: device.to_host(p.gradients[p]) for k, p in params.items()}
    for _ in range(2):  # alternate: each graph's gradients stay its own
        for name, graph, batch in (("ce", train, (xb, yb)),
                                   ("mse", other, (xb, np.ones((6, 4))))):
            graph.step(*batch)
            for k, p in params.items():
                np.testing.assert_allclose(device.to_host(p.gradients[p]), expected[name][k],
                                           rtol=1e-13, err_msg=f"{name} {k}")
    sorted_nodes = gf.topological_sort({X: xb, y: yb}, device=device, dtype="float64")
    gf.forward_and_backward(sorted_nodes)
    train.step(xb, yb)  # the MiniFlow sort re-planned the nodes: the Graph plans again
    for k, p in params.items():
        np.testing.assert_allclose(device.to_host(p.gradients[p]), expected["ce"][k],
                                   rtol=1e-13, err_msg=k)


class _Promote(gf.Node):
    """A custom node that (wrongly) multiplies by a float64 array in any graph."""

    def __init__(self, node):
        gf.Node.__init__(self, [node], name="promote")

    def forward(self):
        x = self.inbound_nodes[0].value
        twos = self.xp.full(x.shape, 2.0, dtype=self.xp.float64, device=self.device.native)
        self.value = x * twos

    def backward(self):
        self.gradients[self.inbound_nodes[0]] = 2.0 * self.upstream_gradient()


def test_a_node_that_promotes_float32_is_reported(device):
    if device.backend == "array_api_strict":
        pytest.skip("array_api_strict refuses float32 * float64 by itself")
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = gf.mlp(_Promote(X), [8, 4], seed=0)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=device, dtype="float32",
                     inputs=[X, y])
    with pytest.raises(gf.GraphError, match=r"the value of _Promote 'promote' has dtype float64 in "
                                            r"a float32 graph(.|\n)*help:"):
        graph.step(*_batch(sizes=(8, 4)))


def test_running_a_second_graph_keeps_the_first_graphs_gradients():
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, params = gf.mlp(X, [8, 16, 4], seed=0)
    train = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), dtype="float64", inputs=[X, y])
    target = gf.Input(name="target")
    check = gf.Graph(gf.MSE(target, logits), dtype="float64", inputs=[X, target])
    xb, yb = _batch()
    train.step(xb, yb)
    before = {k: p.gradients[p].copy() for k, p in params.items()}
    check.run(None, xb, np.ones((6, 4)))  # a validation pass between step and update
    SGD(train, 0.1).step()
    for k, p in params.items():
        assert k in before and p in p.gradients


def test_a_refused_graph_changes_no_shared_node():
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, params = gf.mlp(X, [8, 16, 4], seed=0)
    loss = gf.SoftmaxCrossEntropy(y, logits)
    graph = gf.Graph(loss, dtype="float32", inputs=[X, y])
    with pytest.raises(gf.GraphError, match="not in the graph"):
        gf.Graph(loss, dtype="float64", inputs=[gf.Input(name="stray")])
    value = graph.step(*_batch())
    assert value.dtype == np.float32
    assert all(p.value.dtype == np.float32 for p in params.values())


class _Scale(gf.Node):
    """A lesson-style node: a * x, with a a scalar."""

    def __init__(self, x, a):
        gf.Node.__init__(self, [x, a])

    def forward(self):
        self.value = self.inbound_nodes[0].value * self.inbound_nodes[1].value

    def backward(self):
        G = self.upstream_gradient()
        x, a = self.inbound_nodes
        self.gradients[x] = G * a.value
        self.gradients[a] = self.xp.sum(G * x.value)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_optimizers_train_a_scalar_fed_as_a_python_number(name):
    from gpuflow.optim import make_optimizer
    x, t, a = gf.Input(name="x"), gf.Input(name="t"), gf.Input(name="a")
    loss = gf.MSE(t, _Scale(x, a))
    graph = gf.topological_sort({x: np.arange(4.0), t: 3 * np.arange(4.0), a: 1.0})
    opt = make_optimizer(name, [a], 0.05)
    for _ in range(300):
        gf.forward_and_backward(graph)
        opt.step()
    assert abs(float(a.value) - 3.0) < 1e-2, (name, a.value, loss.value)
