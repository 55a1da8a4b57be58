"""gpuflow.gradient_check: passes on the built-in nodes and on a Graph on every device, catches
planted wrong backward passes (and says where), and leaves the checked graph as it was."""

from __future__ import annotations

import numpy as np
import pytest

import gpuflow as gf
from conftest import host

RNG = np.random.default_rng(99)


def _cases():
    """(name, builder(inputs) -> node, host values) for each built-in node."""
    away = RNG.uniform(0.2, 2.0, size=(4, 3)) * RNG.choice([-1.0, 1.0], size=(4, 3))
    return {
        "Linear": (lambda X, W, b: gf.Linear(X, W, b),
                   [RNG.normal(size=(5, 3)), RNG.normal(size=(3, 4)), RNG.normal(size=4)]),
        "Sigmoid": (gf.Sigmoid, [RNG.normal(scale=3.0, size=(4, 3))]),
        "Tanh": (gf.Tanh, [RNG.normal(size=(4, 3))]),
        "ReLU": (gf.ReLU, [away]),
        "MSE": (gf.MSE, [RNG.normal(size=(6, 1)), RNG.normal(size=(6, 1))]),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_builtin_nodes_pass(device, name):
    builder, values = CASES[name]
    inputs = [gf.Input(name=f"x{i}") for i in range(len(values))]
    node = builder(*inputs)
    report = gf.gradient_check(node, dict(zip(inputs, values)), device=device)
    assert report.ok and report.device == device.name
    assert [r.label for r in report.inputs] == [n.label for n in inputs]
    assert [r.checked for r in report.inputs] == [v.size for v in values]
    assert all(r.max_rel_error < 1e-6 for r in report.inputs), str(report)
    assert not node.outbound_nodes, "the reduction node was left attached"


def test_softmax_cross_entropy_passes_and_labels_are_not_checked(device):
    labels, logits = gf.Input(name="labels"), gf.Input(name="logits")
    loss = gf.SoftmaxCrossEntropy(labels, logits)
    report = gf.gradient_check(loss, {labels: np.array([0, 3, 1, 2]),
                                      logits: RNG.normal(scale=2.0, size=(4, 5))}, device=device)
    assert [r.label for r in report.inputs] == ["Input 'logits'"]


class Square(gf.Node):
    """x ** 2, with a backward that can be wrong in two ways."""

    def __init__(self, x, mistake=None):
        gf.Node.__init__(self, [x])
        self.mistake = mistake

    def forward(self):
        self.value = self.inbound_nodes[0].value ** 2

    def backward(self):
        x = self.inbound_nodes[0]
        if self.mistake == "factor":
            self.gradients[x] = 3 * x.value * self.upstream_gradient()
        elif self.mistake == "first outbound only":  # forgets to sum over outbound nodes
            self.gradients[x] = 2 * x.value * self.outbound_nodes[0].gradients[self]
        else:
            self.gradients[x] = 2 * x.value * self.upstream_gradient()


def test_a_planted_wrong_factor_is_caught_with_shapes_and_values(device):
    x = gf.Input(name="x")
    x0 = np.array([[1.0, -2.0, 0.5]])
    assert gf.gradient_check(Square(x), {x: x0}, device=device).ok
    with pytest.raises(gf.GradientCheckError) as info:
        gf.gradient_check(Square(x, "factor"), {x: x0}, device=device)
    message = str(info.value)
    assert "Input 'x' (1, 3)" in message and "3 differ, first at [0, 0]" in message, message
    assert "FAILED" in message and "help:" in message
    # the first differing values: backward 3 x R, the central difference 2 x R
    report = gf.gradient_check(Square(x, "factor"), {x: x0}, device=device,
                               raise_on_failure=False)
    bad = report.inputs[0]
    assert not report.ok and bad.first_bad == (0, 0)
    assert bad.backward == pytest.approx(1.5 * bad.numeric, rel=1e-6)


def test_a_node_that_forgets_to_sum_over_outbound_nodes_is_caught():
    """Caught through a graph where the node feeds two others."""
    x, y = gf.Input(name="x"), gf.Input(name="y")
    sq = Square(x, "first outbound only")
    loss = gf.MSE(y, sq)  # sq's only consumer: the mistake is invisible here ...
    assert gf.gradient_check(loss, {x: np.array([[0.3], [-0.4]]), y: np.zeros((2, 1))}).ok
    x2 = gf.Input(name="x2")
    sq2 = Square(x2, "first outbound only")
    both = gf.MSE(gf.Tanh(sq2), gf.Sigmoid(sq2))  # ... and shows with two consumers
    with pytest.raises(gf.GradientCheckError, match="Input 'x2'"):
        gf.gradient_check(both, {x2: np.array([[0.3], [-0.4]])})


def test_a_gradient_of_the_wrong_shape_is_reported():
    class SumRows(gf.Node):
        def __init__(self, x):
            gf.Node.__init__(self, [x])

        def forward(self):
            self.value = self.xp.sum(self.inbound_nodes[0].value, axis=1)

        def backward(self):  # forgets to broadcast back to (rows, columns)
            self.gradients[self.inbound_nodes[0]] = self.upstream_gradient()

    x = gf.Input(name="x")
    with pytest.raises(gf.GradientCheckError,
                       match=r"backward gradient has shape \(4,\), the value \(4, 3\)"):
        gf.gradient_check(SumRows(x), {x: RNG.normal(size=(4, 3))})


def _mlp(seed=0):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, params = gf.mlp(X, [6, 5, 3], activation="tanh", seed=seed)
    return X, y, gf.SoftmaxCrossEntropy(y, logits), params


def test_a_graph_passes_and_trains_on_unchanged_afterwards(device):
    from gpuflow.optim import SGD
    xb, yb = RNG.normal(size=(8, 6)), RNG.integers(0, 3, size=8)
    runs = []
    for check in (False, True):
        X, y, loss, params = _mlp()
        graph = gf.Graph(loss, device=device, dtype="float32", inputs=[X, y])
        opt = SGD(graph, lr=0.1)
        graph.step(xb, yb)
        opt.step()
        if check:
            report = gf.gradient_check(graph, xb, yb, samples=6)
            assert report.ok and report.dtype == "float64", str(report)
            assert [r.checked for r in report.inputs] == [6, 5, 6, 3]  # b2 has 3 entries
            assert [r.label for r in report.inputs] == [p.label for p in graph.parameters]
            # regression (issue 18.9): a check on another device bound the graph's nodes there
            other = "array_api_strict" if device.name == "cpu" else "cpu"
            assert gf.gradient_check(graph, xb, yb, samples=2, device=other).ok
            assert all(n.device is graph.device for n in graph.nodes)
        losses = []
        for _ in range(3):
            losses.append(graph.item(graph.step(xb, yb)))
            opt.step()
        assert graph.parameters[0].value.dtype == graph.dtype
        runs.append(losses + [host(graph.device, p.value) for p in graph.parameters])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_a_node_checked_on_one_device_then_another_is_left_as_found(device):
    # Regression (issue 18.9): the check bound the user's Input to its device, so checking the
    # same node on torch:cpu after cpu failed with "Input 'x' already belongs to a graph on cpu".
    x, W, b = gf.Input(name="x"), gf.Input(name="W"), gf.Input(name="b")
    node = gf.Tanh(gf.Linear(x, W, b))
    feed = {x: RNG.normal(size=(3, 4)), W: RNG.normal(size=(4, 2)), b: RNG.normal(size=2)}
    nodes = gf.graph.reachable([node], "inbound_nodes")
    outbound = {n: list(n.outbound_nodes) for n in nodes}
    for spec in ("cpu", device, "cpu"):
        report = gf.gradient_check(node, feed, device=spec)
        assert report.ok and report.device == gf.get_device(spec).name, str(report)
        for n in nodes:
            assert n.device is None and n.value is None, f"{n.label} left bound"
            assert n.outbound_nodes == outbound[n]


def test_bad_targets_are_refused():
    with pytest.raises(gf.GraphError, match="expected a Node or a Graph, got int"):
        gf.gradient_check(3)
    x = gf.Input(name="x")
    with pytest.raises(gf.GraphError, match="Input 'x' has no value"):
        gf.gradient_check(gf.Tanh(x), {})
    with pytest.raises(gf.GraphError, match="feed a node with one dict"):
        gf.gradient_check(gf.Tanh(x), np.ones(3))


def _normed_graph(kind, device):
    """Linear -> BatchNorm or Dropout -> Linear -> softmax cross-entropy, float64."""
    X, y = gf.Input(name="X"), gf.Input(name="y")
    h, _ = gf.dense(X, 4, 6, name="l1", rng=0)
    if kind == "BatchNorm":
        h, _ = gf.batchnorm(h, 6, name="bn")
    else:
        h = gf.Dropout(h, 0.5, seed=1, name="drop")
    h, _ = gf.dense(h, 6, 3, name="l2", rng=1)
    return gf.Graph(gf.SoftmaxCrossEntropy(y, h), device=device, dtype="float64")


@pytest.mark.parametrize("kind", ["BatchNorm", "Dropout"])
def test_a_graph_with_batchnorm_or_dropout_passes_and_keeps_its_statistics(device, kind):
    # Regression: the backward ran in training mode but the central differences in evaluation
    # mode (BatchNorm's running statistics, no Dropout), so a correct graph failed, and the
    # check's own steps moved BatchNorm's running statistics.
    graph = _normed_graph(kind, device)
    x, y = RNG.normal(size=(8, 4)), RNG.integers(0, 3, size=8)
    graph.step(x, y)
    stateful = [n for n in graph.nodes if hasattr(n, "state_dict")]
    before = [{k: gf.to_numpy(v) for k, v in n.state_dict().items()} for n in stateful]
    report = gf.gradient_check(graph, x, y, raise_on_failure=False)
    assert report.ok, str(report)
    after = [{k: gf.to_numpy(v) for k, v in n.state_dict().items()} for n in stateful]
    for b, a in zip(before, after):
        for key in b:
            np.testing.assert_array_equal(a[key], b[key])


def test_a_batchnorm_node_passes_its_own_check(device):
    x, g, b = gf.Input(name="x"), gf.Input(name="gamma"), gf.Input(name="beta")
    node = gf.BatchNorm(x, g, b)
    feed = {x: RNG.normal(size=(6, 3)), g: RNG.uniform(0.5, 2.0, size=3), b: RNG.normal(size=3)}
    report = gf.gradient_check(node, feed, device=device, raise_on_failure=False)
    assert report.ok, str(report)
