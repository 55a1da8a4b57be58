"""Building and running graphs: Kahn's sort, gradient accumulation, custom MiniFlow-style nodes,
error messages, device placement, training loops across devices, agreement with torch autograd,
and sgd_update."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gpuflow as gf
from conftest import assert_on_device, central_difference, host


# -- custom nodes written the way the MiniFlow lessons write them --------------------------------
class Add(gf.Node):
    """MiniFlow's Add: forward sums the inputs; backward loops over the outbound nodes."""

    def __init__(self, *inputs):
        gf.Node.__init__(self, list(inputs))

    def forward(self):
        total = self.inbound_nodes[0].value
        for n in self.inbound_nodes[1:]:
            total = total + n.value
        self.value = total

    def backward(self):
        self.gradients = {n: self.xp.zeros_like(n.value) for n in self.inbound_nodes}
        for n in self.outbound_nodes:
            grad_cost = n.gradients[self]
            for inbound in self.inbound_nodes:
                self.gradients[inbound] += grad_cost


class SumLosses(gf.Node):
    """The sum of scalar losses: the end of the graph, so its own gradient is 1."""

    def __init__(self, *losses):
        gf.Node.__init__(self, list(losses))

    def forward(self):
        self.value = self.xp.sum(self.xp.stack([n.value for n in self.inbound_nodes]))

    def backward(self):
        for n in self.inbound_nodes:
            self.gradients[n] = self.xp.ones_like(n.value)


class NumpyAdd(gf.Node):
    """An Add that calls NumPy directly, as old MiniFlow code does: fine on the CPU."""

    def __init__(self, x, y):
        gf.Node.__init__(self, [x, y])

    def forward(self):
        self.value = np.add(self.inbound_nodes[0].value, self.inbound_nodes[1].value)

    def backward(self):
        self.gradients = {n: np.zeros_like(n.value) for n in self.inbound_nodes}
        for n in self.outbound_nodes:
            for inbound in self.inbound_nodes:
                self.gradients[inbound] += n.gradients[self]


def _mlp_weights(rng, sizes):
    return [(rng.normal(size=(a, b)) / math.sqrt(a), rng.normal(size=b) * 0.1)
            for a, b in zip(sizes[:-1], sizes[1:])]


# -- Kahn's sort ---------------------------------------------------------------------------------
def test_sort_puts_every_node_after_its_inputs():
    rng = np.random.default_rng(0)
    X, W1, b1, W2, b2, y = (gf.Input(name=n) for n in ("X", "W1", "b1", "W2", "b2", "y"))
    h = gf.Linear(X, W1, b1, name="h")
    s = gf.Sigmoid(h, name="s")
    t = gf.Tanh(h, name="t")
    both = Add(s, t)
    out = gf.Linear(both, W2, b2, name="out")
    cost = gf.MSE(y, out, name="cost")
    # Fed in an order unlike the topological one; W2 and b2 are set through .value beforehand,
    # as MiniFlow's weights may be, so they are reachable only through inbound edges.
    W2.value = rng.normal(size=(4, 1))
    b2.value = np.zeros(1)
    graph = gf.topological_sort({y: rng.normal(size=(3, 1)), b1: np.zeros(4),
                                 X: rng.normal(size=(3, 2)), W1: rng.normal(size=(2, 4))})
    expected = {X, W1, b1, W2, b2, y, h, s, t, both, out, cost}
    assert set(graph) == expected, f"missing {expected - set(graph)}"
    assert len(graph) == len(expected), f"duplicates in {graph}"
    position = {n: i for i, n in enumerate(graph)}
    for node in graph:
        for n in node.inbound_nodes:
            assert position[n] < position[node], f"{n.label} sorted after {node.label}: {graph}"
    assert graph[-1] is cost
    gf.forward_and_backward(graph)
    assert W2.gradients[W2].shape == (4, 1)


def test_sort_handles_a_node_using_one_input_twice(device):
    x = gf.Input(name="x")
    double = Add(x, x)
    graph = gf.topological_sort({x: np.array([1.0, 2.0])}, device=device)
    assert graph == [x, double]
    np.testing.assert_array_equal(host(device, gf.forward_pass(double, graph)), [2.0, 4.0])


def test_feed_dict_key_must_be_an_input():
    X, W, b = gf.Input(), gf.Input(), gf.Input()
    lin = gf.Linear(X, W, b, name="hidden")
    with pytest.raises(gf.GraphError, match=r"Linear 'hidden'.*not an Input(.|\n)*help:"):
        gf.topological_sort({X: np.ones((1, 1)), lin: np.ones((1, 1))})
    with pytest.raises(gf.GraphError, match="feed_dict must be a dict"):
        gf.topological_sort([(X, np.ones((1, 1)))])


def test_feed_of_none_names_the_input():
    X, W, b = gf.Input(name="X"), gf.Input(name="weights"), gf.Input(name="b")
    gf.Linear(X, W, b, name="hidden")
    with pytest.raises(gf.GraphError) as info:
        gf.topological_sort({X: np.ones((2, 3)), W: None, b: np.zeros(1)})
    msg = str(info.value)
    assert "Input 'weights'" in msg and "Linear 'hidden'" in msg and "help:" in msg, msg


def test_missing_feed_names_the_input_and_its_user():
    X, W = gf.Input(name="X"), gf.Input(name="W")
    b = gf.Input(name="b")  # used by the Linear, never fed, no value
    gf.Linear(X, W, b, name="hidden")
    with pytest.raises(gf.GraphError) as info:
        gf.topological_sort({X: np.ones((2, 3)), W: np.ones((3, 1))})
    msg = str(info.value)
    assert "Input 'b'" in msg and "Linear 'hidden'" in msg, msg
    assert "help:" in msg and "feed_dict" in msg, msg


def test_cycle_is_reported_as_a_cycle():
    X = gf.Input(name="X")
    s = gf.Sigmoid(X, name="s")
    t = gf.Tanh(s, name="t")
    r = gf.ReLU(t, name="r")
    # Close the loop r -> s by hand: s now depends on its own output.
    s.inbound_nodes.append(r)
    r.outbound_nodes.append(s)
    with pytest.raises(gf.GraphError) as info:
        gf.topological_sort({X: np.ones(3)})
    msg = str(info.value)
    assert "cycle" in msg, msg
    for label in ("Sigmoid 's'", "Tanh 't'", "ReLU 'r'"):
        assert label in msg, f"{label} missing from: {msg}"
    assert "Input 'X'" not in msg.split("\n")[0], f"X is not on the cycle: {msg}"


# -- shape errors, when the graph runs -----------------------------------------------------------
def test_linear_shape_mismatch_names_node_and_shapes(device):
    X, W, b = gf.Input(name="X"), gf.Input(name="W"), gf.Input(name="b")
    hidden = gf.Linear(X, W, b, name="hidden")
    graph = gf.topological_sort({X: np.ones((32, 5)), W: np.ones((4, 10)), b: np.zeros(10)},
                                device=device)
    with pytest.raises(gf.GraphError) as info:
        gf.forward_pass(hidden, graph)
    msg = str(info.value)
    for part in ("Linear 'hidden'", "(32, 5)", "(4, 10)", "help:"):
        assert part in msg, f"{part} missing from: {msg}"


def test_mse_length_mismatch_names_both_shapes(device):
    y, a = gf.Input(name="y"), gf.Input(name="a")
    cost = gf.MSE(y, a, name="cost")
    graph = gf.topological_sort({y: np.ones((5, 1)), a: np.ones((4, 1))}, device=device)
    with pytest.raises(gf.GraphError) as info:
        gf.forward_pass(cost, graph)
    msg = str(info.value)
    for part in ("MSE 'cost'", "(5, 1)", "(4, 1)", "Input 'y'", "Input 'a'"):
        assert part in msg, f"{part} missing from: {msg}"


# -- gradients summed over outbound nodes, custom nodes ------------------------------------------
def test_two_outbound_nodes_get_the_sum_of_gradients(device):
    rng = np.random.default_rng(3)
    x, y_ = rng.normal(size=(6, 3)), rng.normal(size=(6, 1))
    w1, b1_, w2, b2_ = (rng.normal(size=(3, 1)), rng.normal(size=1),
                        rng.normal(size=(3, 1)), rng.normal(size=1))
    X, y, W1, b1, W2, b2 = (gf.Input(name=n) for n in ("X", "y", "W1", "b1", "W2", "b2"))
    total = Add(gf.Linear(X, W1, b1), gf.Linear(X, W2, b2))   # X has two outbound nodes
    cost = gf.MSE(y, total)
    graph = gf.topological_sort({X: x, y: y_, W1: w1, b1: b1_, W2: w2, b2: b2_}, device=device)
    gf.forward_and_backward(graph)

    a = x @ w1 + b1_ + x @ w2 + b2_
    G = -2.0 * (y_ - a) / y_.size               # d cost / d a
    expected = {X: G @ w1.T + G @ w2.T, W1: x.T @ G, W2: x.T @ G,
                b1: G.sum(axis=0), b2: G.sum(axis=0), y: -G}
    np.testing.assert_allclose(float(host(device, cost.value)), np.mean((y_ - a) ** 2),
                               rtol=1e-12)
    for node, want in expected.items():
        got = host(device, node.gradients[node])
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14,
                                   err_msg=f"d cost / d {node.label} on {device.name}")
        assert_on_device(device, node.gradients[node], f"{node.label}.gradients")


def test_an_input_feeding_two_losses_gets_both_gradients(device):
    rng = np.random.default_rng(4)
    x, y1_, y2_ = rng.normal(size=(5, 2)), rng.normal(size=(5, 1)), rng.normal(size=(5, 3))
    w1, w2 = rng.normal(size=(2, 1)), rng.normal(size=(2, 3))
    b1_, b2_ = np.zeros(1), np.zeros(3)
    X, W1, W2, b1, b2, y1, y2 = (gf.Input(name=n)
                                 for n in ("X", "W1", "W2", "b1", "b2", "y1", "y2"))
    loss1 = gf.MSE(y1, gf.Linear(X, W1, b1))
    loss2 = gf.MSE(y2, gf.Sigmoid(gf.Linear(X, W2, b2)))
    total = SumLosses(loss1, loss2)
    graph = gf.topological_sort({X: x, W1: w1, W2: w2, b1: b1_, b2: b2_, y1: y1_, y2: y2_},
                                device=device)
    assert graph[-1] is total
    gf.forward_and_backward(graph)

    a1 = x @ w1 + b1_
    z2 = x @ w2 + b2_
    s2 = 1 / (1 + np.exp(-z2))
    G1 = -2.0 * (y1_ - a1) / y1_.size
    G2 = -2.0 * (y2_ - s2) / y2_.size * s2 * (1 - s2)
    np.testing.assert_allclose(float(host(device, total.value)),
                               np.mean((y1_ - a1) ** 2) + np.mean((y2_ - s2) ** 2), rtol=1e-12)
    np.testing.assert_allclose(host(device, X.gradients[X]), G1 @ w1.T + G2 @ w2.T,
                               rtol=1e-10, err_msg=device.name)
    np.testing.assert_allclose(host(device, W1.gradients[W1]), x.T @ G1, rtol=1e-10)
    np.testing.assert_allclose(host(device, W2.gradients[W2]), x.T @ G2, rtol=1e-10)


def test_numeric_gradient_through_custom_nodes(device):
    """The hand-derived gradients above, checked against central differences too."""
    rng = np.random.default_rng(5)
    x, w = rng.normal(size=(4, 3)), rng.normal(size=(3, 2))
    X, W, b, y = gf.Input(name="X"), gf.Input(name="W"), gf.Input(name="b"), gf.Input(name="y")
    lin = gf.Linear(X, W, b)
    cost = SumLosses(gf.MSE(y, Add(gf.Tanh(lin), gf.Sigmoid(lin))), gf.MSE(y, lin))
    feed = {X: x, W: w, b: np.zeros(2), y: rng.normal(size=(4, 2))}
    graph = gf.topological_sort(feed, device=device)
    gf.forward_and_backward(graph)
    analytic = host(device, W.gradients[W])
    numeric = central_difference(W, w, lambda: gf.forward_pass(cost, graph), device)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9, err_msg=device.name)


def test_custom_node_calling_numpy_works_on_cpu():
    x, y = gf.Input(name="x"), gf.Input(name="y")
    s = NumpyAdd(x, y)
    target = gf.Input(name="target")
    cost = gf.MSE(target, s)
    graph = gf.topological_sort({x: np.array([1.0, 2.0]), y: np.array([3.0, 5.0]),
                                 target: np.array([4.0, 4.0])}, device="cpu")
    gf.forward_and_backward(graph)
    np.testing.assert_array_equal(s.value, [4.0, 7.0])
    assert float(cost.value) == 4.5
    np.testing.assert_allclose(x.gradients[x], [0.0, 3.0])
    np.testing.assert_allclose(y.gradients[y], [0.0, 3.0])


# -- feeds: MiniFlow's scalars and lists, values set after the graph is built --------------------
def test_lesson_add_with_python_scalars(device):
    x, y = gf.Input(), gf.Input()
    f = Add(x, y)
    graph = gf.topological_sort({x: 10, y: 5}, device=device)
    out = gf.forward_pass(f, graph)
    assert float(host(device, out)) == 15.0
    assert_on_device(device, out, "x + y")


def test_lists_as_feeds(device):
    x, y, z = gf.Input(), gf.Input(), gf.Input()
    f = Add(x, y, z)
    graph = gf.topological_sort({x: [1, 2], y: [3.5, 4], z: 1}, device=device)
    np.testing.assert_array_equal(host(device, gf.forward_pass(f, graph)), [5.5, 7.0])
    x.value = [10, 20]
    np.testing.assert_array_equal(host(device, gf.forward_pass(f, graph)), [14.5, 25.0])


def test_value_set_later_lands_on_the_device_in_its_dtype(device):
    X, W, b = gf.Input(name="X"), gf.Input(name="W"), gf.Input(name="b")
    L = gf.Input(name="labels")
    logits = gf.Linear(X, W, b)
    loss = gf.SoftmaxCrossEntropy(L, logits)
    rng = np.random.default_rng(0)
    graph = gf.topological_sort({X: rng.normal(size=(4, 3)), W: rng.normal(size=(3, 2)),
                                 b: np.zeros(2), L: np.array([0, 1, 1, 0])},
                                device=device, dtype="float32")
    f32 = device.dtype("float32")
    assert W.value.dtype == f32

    X.value = rng.normal(size=(5, 3))                     # float64 host array
    assert device.owns(X.value), f"X.value is {type(X.value).__name__}, not on {device.name}"
    assert X.value.dtype == f32, f"float64 batch kept {X.value.dtype} on a float32 graph"

    X.value = np.arange(15).reshape(5, 3)                 # integer data becomes float
    assert device.owns(X.value) and X.value.dtype == f32, X.value.dtype

    L.value = np.array([1, 0, 1, 1, 0], dtype=np.int64)   # labels stay integer
    assert device.owns(L.value)
    assert not device.xp.isdtype(L.value.dtype, "real floating"), L.value.dtype
    gf.forward_and_backward(graph)
    assert loss.value.dtype == f32
    assert X.gradients[X].shape == (5, 3) and W.gradients[W].dtype == f32
    np.testing.assert_array_equal(host(device, L.value), [1, 0, 1, 1, 0])


def test_value_set_later_takes_the_fed_float_dtype_by_default(device):
    X, W, b = gf.Input(name="X"), gf.Input(name="W"), gf.Input(name="b")
    gf.Linear(X, W, b)
    gf.topological_sort({X: np.ones((2, 2)), W: np.ones((2, 1)), b: np.zeros(1)}, device=device)
    X.value = np.arange(4).reshape(2, 2)
    assert device.owns(X.value) and X.value.dtype == device.dtype("float64"), X.value.dtype
    X.value = np.ones((2, 2), dtype=np.float32)  # no dtype given: the fed one (float64) wins
    assert device.owns(X.value) and X.value.dtype == device.dtype("float64"), X.value.dtype


def test_mixed_float_dtypes_without_a_graph_dtype_are_reported(device):
    X, W, b = gf.Input(name="X"), gf.Input(name="W"), gf.Input(name="b")
    gf.Linear(X, W, b)
    feed = {X: np.ones((2, 2), dtype=np.float32), W: np.ones((2, 1)), b: np.zeros(1)}
    with pytest.raises(gf.GraphError, match=r"Input 'X': float32(.|\n)*Input 'W': float64"
                                            r"(.|\n)*help: pass dtype="):
        gf.topological_sort(feed, device=device)
    graph = gf.topological_sort(feed, device=device, dtype="float32")
    assert all(n.value.dtype == device.dtype("float32") for n in graph if isinstance(n, gf.Input))


def test_a_node_lives_on_one_device():
    X, W, b = gf.Input(name="X"), gf.Input(name="W"), gf.Input(name="b")
    f = gf.Linear(X, W, b, name="hidden")
    feed = {X: np.ones((2, 2)), W: np.ones((2, 1)), b: np.zeros(1)}
    gf.topological_sort(feed, device="cpu")
    gf.topological_sort(feed, device="cpu")  # sorting again on the same device is fine
    with pytest.raises(gf.GraphError, match=r"already belongs to a graph on cpu(.|\n)*"
                                            r"array_api_strict:device1(.|\n)*help:"):
        gf.topological_sort(feed, device="array_api_strict:device1")
    assert f.device.name == "cpu"


# -- arrays that live on another device are refused, never moved silently ------------------------
def test_torch_tensor_fed_to_a_cpu_graph_is_shared_and_to_device1_refused():
    """A torch CPU tensor is in a 'cpu' graph's memory: taken through DLPack without a copy
    (issue 14; test_dlpack.py has the rest). On another device it is still refused."""
    torch = pytest.importorskip("torch")
    X, W, b = gf.Input(name="X"), gf.Input(name="W"), gf.Input(name="b")
    gf.Linear(X, W, b)
    x = torch.ones(2, 3, dtype=torch.float64)
    graph = gf.topological_sort({X: x, W: np.ones((3, 1)), b: np.zeros(1)}, device="cpu")
    assert isinstance(X.value, np.ndarray) and X.value.ctypes.data == x.data_ptr()

    pytest.importorskip("array_api_strict")
    X1, W1, b1 = gf.Input(name="X"), gf.Input(name="W"), gf.Input(name="b")
    gf.Linear(X1, W1, b1)
    with pytest.raises(gf.DeviceError) as info:
        gf.topological_sort({X1: x, W1: np.ones((3, 1)), b1: np.zeros(1)},
                            device="array_api_strict:device1")
    msg = str(info.value)
    for part in ("Input 'X'", "torch:cpu", "graph is on array_api_strict:device1", "help:"):
        assert part in msg, f"{part} missing from: {msg}"
    y = torch.zeros(2, 3, dtype=torch.float64)
    X.value = y  # the MiniFlow way shares too
    assert graph[0].value.ctypes.data == y.data_ptr()


def test_device1_array_fed_to_a_cpu_graph_is_refused():
    pytest.importorskip("array_api_strict")
    d1 = gf.get_device("array_api_strict:device1")
    X, W, b = gf.Input(name="X"), gf.Input(name="W"), gf.Input(name="b")
    gf.Linear(X, W, b)
    gf.topological_sort({X: np.ones((2, 3)), W: np.ones((3, 1)), b: np.zeros(1)}, device="cpu")
    with pytest.raises(gf.DeviceError) as info:
        W.value = d1.put(np.ones((3, 1)))
    msg = str(info.value)
    for part in ("Input 'W'", "array_api_strict:device1", "cpu", "help:"):
        assert part in msg, f"{part} missing from: {msg}"


def test_strict_cpu_array_fed_to_a_device1_graph_is_refused():
    pytest.importorskip("array_api_strict")
    strict_cpu = gf.get_device("array_api_strict")
    X, W, b = gf.Input(name="X"), gf.Input(name="W"), gf.Input(name="b")
    gf.Linear(X, W, b)
    with pytest.raises(gf.DeviceError) as info:
        gf.topological_sort({X: strict_cpu.put(np.ones((2, 3))), W: np.ones((3, 1)),
                             b: np.zeros(1)}, device="array_api_strict:device1")
    msg = str(info.value)
    assert "Input 'X'" in msg and "array_api_strict:device1" in msg, msg
    assert "is an array on array_api_strict," in msg and "help:" in msg, msg


# -- training loops ------------------------------------------------------------------------------
def _regression_graph(device, dtype=None, seed=0):
    """MiniFlow's nn.py network (Linear-Sigmoid-Linear-MSE) on seeded host data."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 4))
    y_ = x @ rng.normal(size=(4, 1)) + 0.1 * rng.normal(size=(40, 1))
    w1, b1_ = rng.normal(size=(4, 6)), np.zeros(6)
    w2, b2_ = rng.normal(size=(6, 1)), np.zeros(1)
    X, y, W1, b1, W2, b2 = (gf.Input(name=n) for n in ("X", "y", "W1", "b1", "W2", "b2"))
    cost = gf.MSE(y, gf.Linear(gf.Sigmoid(gf.Linear(X, W1, b1)), W2, b2))
    # Copies: on the CPU the graph uses the fed arrays themselves and sgd_update changes them.
    feed = {X: x[:8], y: y_[:8], W1: w1.copy(), b1: b1_.copy(), W2: w2.copy(), b2: b2_.copy()}
    graph = gf.topological_sort(feed, device=device, dtype=dtype)
    return graph, (X, y), (W1, b1, W2, b2), (x, y_), cost


def _train(device, steps, check=None):
    graph, (X, y), trainables, (x, y_), cost = _regression_graph(device)
    losses = []
    for step in range(steps):
        rows = slice(8 * step % 40, 8 * step % 40 + 8)
        X.value = x[rows]
        y.value = y_[rows]
        gf.forward_and_backward(graph)
        gf.sgd_update(trainables, learning_rate=0.1)
        losses.append(float(host(graph.device, graph[-1].value)))
        if check is not None:
            check(graph, step)
    return losses


def test_training_on_device1_keeps_everything_on_device1():
    pytest.importorskip("array_api_strict")
    device = gf.get_device("array_api_strict:device1")

    def check(graph, step):
        for node in graph:
            assert_on_device(device, node.value, f"step {step}: {node.label}.value")
            for target, g in node.gradients.items():
                assert_on_device(device, g, f"step {step}: {node.label}.gradients"
                                            f"[{target.label}]")

    losses = _train(device, 20, check)
    assert losses[-1] < losses[0], losses


def test_same_losses_on_every_device(device):
    expected = _train("cpu", 12)
    got = _train(device, 12)
    np.testing.assert_allclose(got, expected, rtol=1e-9, err_msg=f"{device.name} vs cpu")
    assert expected[-1] < expected[0]


def test_float32_training_runs_in_float32(device):
    graph, (X, y), trainables, (x, y_), cost = _regression_graph(device, dtype="float32")
    f32 = device.dtype("float32")
    for step in range(3):
        X.value, y.value = x[8 * step:8 * step + 8], y_[8 * step:8 * step + 8]
        gf.forward_and_backward(graph)
        gf.sgd_update(trainables)
    for node in graph:
        assert node.value.dtype == f32, f"{node.label}.value is {node.value.dtype}"
    for t in trainables:
        assert t.gradients[t].dtype == f32, f"{t.label} gradient is {t.gradients[t].dtype}"


def test_gradients_match_torch_autograd(device):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    sizes = [5, 8, 6, 4]
    weights = _mlp_weights(rng, sizes)
    x = rng.normal(size=(10, 5))
    labels = rng.integers(0, 4, size=10)

    X, L = gf.Input(name="X"), gf.Input(name="labels")
    params = [(gf.Input(name=f"W{i}"), gf.Input(name=f"b{i}")) for i in range(3)]
    h = gf.ReLU(gf.Linear(X, *params[0]))
    h = gf.Tanh(gf.Linear(h, *params[1]))
    loss = gf.SoftmaxCrossEntropy(L, gf.Linear(h, *params[2]))
    feed = {X: x, L: labels}
    for (W, b), (w, b_) in zip(params, weights):
        feed[W], feed[b] = w, b_
    graph = gf.topological_sort(feed, device=device, dtype="float64")
    gf.forward_and_backward(graph)

    def t(a):
        return torch.tensor(a, dtype=torch.float64, requires_grad=True)
    tx = t(x)
    tw = [(t(w), t(b_)) for w, b_ in weights]
    th = torch.relu(tx @ tw[0][0] + tw[0][1])
    th = torch.tanh(th @ tw[1][0] + tw[1][1])
    tloss = torch.nn.functional.cross_entropy(th @ tw[2][0] + tw[2][1], torch.tensor(labels))
    tloss.backward()

    np.testing.assert_allclose(float(host(device, loss.value)), tloss.item(), rtol=1e-12)
    pairs = [(X, tx)] + [(n, tn) for p, tp in zip(params, tw) for n, tn in zip(p, tp)]
    for node, tnode in pairs:
        np.testing.assert_allclose(host(device, node.gradients[node]), tnode.grad.numpy(),
                                   rtol=1e-9, atol=1e-15,
                                   err_msg=f"d loss / d {node.label} on {device.name}")


# -- sgd_update ----------------------------------------------------------------------------------
def _one_step_graph(device="cpu"):
    graph, (X, y), trainables, _, cost = _regression_graph(device)
    gf.forward_and_backward(graph)
    return graph, trainables


@pytest.mark.parametrize("lr, why", [
    (-0.1, "> 0"), (0.0, "> 0"), (0, "> 0"), (float("nan"), "> 0"), (float("inf"), "> 0"),
    ("0.1", "number"), (None, "number"), ([0.1], "number"), (True, "number"),
])
def test_sgd_update_refuses_bad_learning_rates(lr, why):
    graph, trainables = _one_step_graph()
    before = [t.value.copy() for t in trainables]
    with pytest.raises(ValueError, match=why) as info:
        gf.sgd_update(trainables, learning_rate=lr)
    assert "learning_rate" in str(info.value) and repr(lr) in str(info.value)
    for t, b in zip(trainables, before):
        np.testing.assert_array_equal(t.value, b, err_msg=f"{t.label} changed on refusal")


def test_sgd_update_accepts_numpy_scalars():
    graph, trainables = _one_step_graph()
    gf.sgd_update(trainables, learning_rate=np.float32(0.01))


def test_sgd_update_without_gradient_names_the_trainable():
    graph, trainables = _one_step_graph()
    stray = gf.Input(name="stray")
    stray.value = np.ones(3)
    with pytest.raises(gf.GraphError) as info:
        gf.sgd_update(list(trainables) + [stray])
    msg = str(info.value)
    assert "Input 'stray'" in msg and "forward_and_backward" in msg, msg

    graph, (X, y), trainables, _, cost = _regression_graph("cpu")  # built, never run
    with pytest.raises(gf.GraphError, match="Input 'W1' has no gradient"):
        gf.sgd_update(trainables)


def test_sgd_update_steps_by_minus_lr_times_gradient(device):
    graph, trainables = _one_step_graph(device)
    before = [host(device, t.value).copy() for t in trainables]
    grads = [host(device, t.gradients[t]).copy() for t in trainables]
    assert all(np.abs(g).max() > 0 for g in grads)
    gf.sgd_update(trainables, learning_rate=0.25)
    for t, b, g in zip(trainables, before, grads):
        assert_on_device(device, t.value, t.label)
        np.testing.assert_allclose(host(device, t.value), b - 0.25 * g, rtol=1e-13,
                                   err_msg=f"{t.label} on {device.name}")


def test_sgd_update_default_learning_rate_is_1e_2():
    graph, trainables = _one_step_graph()
    W1 = trainables[0]
    before, grad = W1.value.copy(), W1.gradients[W1].copy()
    gf.sgd_update(trainables)
    np.testing.assert_allclose(W1.value, before - 1e-2 * grad, rtol=1e-13)


# -- forward_and_backward on any list ------------------------------------------------------------
def test_forward_and_backward_on_a_plain_list(device):
    graph, (X, y), trainables, _, cost = _regression_graph(device)
    gf.forward_and_backward(graph)
    expected = [host(device, t.gradients[t]).copy() for t in trainables]
    loss = float(host(device, cost.value))
    plain = list(graph)
    assert type(plain) is list
    gf.forward_and_backward(plain)
    assert float(host(device, cost.value)) == loss
    for t, want in zip(trainables, expected):
        np.testing.assert_array_equal(host(device, t.gradients[t]), want, err_msg=t.label)
    assert float(host(device, gf.forward_pass(cost, plain))) == loss


def test_one_node_in_two_slots_of_a_linear_gets_both_gradients(device):
    """Linear(X, X, b) is X @ X + b: d/dX is G Xᵀ + Xᵀ G, not just the last slot's term."""
    rng = np.random.default_rng(8)
    x, y_ = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    X, b, y = gf.Input(name="X"), gf.Input(name="b"), gf.Input(name="y")
    gf.MSE(y, gf.Linear(X, X, b))
    graph = gf.topological_sort({X: x, b: np.zeros(3), y: y_}, device=device)
    for _ in range(2):  # twice: nothing may carry over from one backward pass to the next
        gf.forward_and_backward(graph)
        G = -2.0 * (y_ - x @ x) / y_.size
        np.testing.assert_allclose(host(device, X.gradients[X]), G @ x.T + x.T @ G,
                                   rtol=1e-12, err_msg=device.name)


def test_training_never_changes_the_callers_arrays(device):
    X, W, b, y = gf.Input(), gf.Input(), gf.Input(), gf.Input()
    cost = gf.MSE(y, gf.Linear(X, W, b))
    W_, b_ = np.ones((2, 1)), np.zeros(1)
    graph = gf.topological_sort({X: np.ones((3, 2)), W: W_, b: b_, y: np.zeros(3)},
                                device=device)
    gf.forward_and_backward(graph)
    gf.sgd_update([W, b], 0.1)
    assert (W_ == 1).all() and (b_ == 0).all(), "sgd_update changed the fed arrays"
    assert not np.allclose(host(device, W.value), 1.0), "W did not train"


class _LessonLinear(gf.Node):
    """The MiniFlow lesson's first Linear: lists of inputs and weights and a scalar bias."""

    def __init__(self, inputs, weights, bias):
        gf.Node.__init__(self, [inputs, weights, bias])

    def forward(self):
        inputs = self.inbound_nodes[0].value
        weights = self.inbound_nodes[1].value
        bias = self.inbound_nodes[2]
        self.value = bias.value
        for x, w in zip(inputs, weights):
            self.value += x * w


def test_lesson_linear_with_lists_and_a_scalar_bias_runs_twice_the_same():
    inputs, weights, bias = gf.Input(), gf.Input(), gf.Input()
    f = _LessonLinear(inputs, weights, bias)
    graph = gf.topological_sort({inputs: [6, 14, 3], weights: [0.5, 0.25, 1.4], bias: 2})
    assert float(gf.forward_pass(f, graph)) == pytest.approx(12.7)
    assert float(gf.forward_pass(f, graph)) == pytest.approx(12.7), "the bias changed in place"


def test_a_miniflow_graph_and_a_float32_graph_can_share_weights():
    X, W, b, y = gf.Input(name="X"), gf.Input(name="W"), gf.Input(name="b"), gf.Input(name="y")
    cost = gf.MSE(y, gf.Linear(X, W, b))
    sorted_nodes = gf.topological_sort({X: np.ones((3, 2)), W: np.ones((2, 1)), b: np.zeros(1),
                                        y: np.zeros(3)})
    gf.Graph(cost, dtype="float32", inputs=[X, y]).step(np.ones((3, 2)), np.zeros(3))
    gf.forward_and_backward(sorted_nodes)  # binds back to the fed float64
    assert W.value.dtype == np.float64 and W.gradients[W].dtype == np.float64


def test_weights_set_through_value_before_the_sort_are_not_the_callers():
    X, W, b, y = gf.Input(), gf.Input(), gf.Input(), gf.Input()
    cost = gf.MSE(y, gf.Linear(X, W, b))
    W0 = np.ones((2, 1))
    W.value = W0
    graph = gf.topological_sort({X: np.ones((3, 2)), b: np.zeros(1), y: np.zeros(3)})
    gf.forward_and_backward(graph)
    gf.sgd_update([W], 0.1)
    assert (W0 == 1).all() and W.value is not W0 and not np.allclose(W.value, 1)


def test_a_fed_0d_array_stays_immutable_on_the_cpu():
    inputs, weights, bias = gf.Input(), gf.Input(), gf.Input()
    f = _LessonLinear(inputs, weights, bias)
    graph = gf.topological_sort({inputs: [6, 14, 3], weights: [0.5, 0.25, 1.4],
                                 bias: np.array(2.0)})
    assert [float(gf.forward_pass(f, graph)) for _ in range(3)] == [pytest.approx(12.7)] * 3


def test_run_of_something_not_a_node_is_a_graph_error():
    # Regression: graph.run("logits", ...) escaped as AttributeError ('str' has no 'label').
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = gf.mlp(X, [3, 2], seed=0)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device="cpu", outputs=[logits])
    with pytest.raises(gf.GraphError, match="'logits' is not in this graph"):
        graph.run("logits", np.ones((2, 3)))


class _RefusesAfterInit(gf.Node):
    """A MiniFlow-style custom node that checks an option after Node.__init__ linked it."""

    def __init__(self, x, scale):
        gf.Node.__init__(self, [x])
        if scale <= 0:
            raise gf.GraphError("scale must be > 0.\nhelp: pass scale=1.")
        self.scale = scale


# Each builds on X (2, 1, 4, 4) and P (a second Input) and must be refused when made.
REFUSED_CONSTRUCTIONS = {
    "Conv2D stride": lambda X, P: gf.Conv2D(X, P, stride=0),
    "Conv2D padding": lambda X, P: gf.Conv2D(X, P, P, padding=-1),
    "MaxPool2D size": lambda X, P: gf.MaxPool2D(X, 0),
    "AvgPool2D stride": lambda X, P: gf.AvgPool2D(X, 2, stride=(1, 2, 3)),
    "Dropout p": lambda X, P: gf.Dropout(X, 1.0),
    "BatchNorm momentum": lambda X, P: gf.BatchNorm(X, P, P, momentum=2.0),
    "LayerNorm eps": lambda X, P: gf.LayerNorm(X, P, P, eps=0.0),
    "Add weights": lambda X, P: gf.Add(X, P, weights=(1.0,)),
    "Linear not a node": lambda X, P: gf.Linear(X, P, np.zeros(3)),  # Node.__init__'s check
    "Scale c": lambda X, P: gf.Scale(X, math.inf),
    "attention causal and mask": lambda X, P: gf.ScaledDotProductAttention(
        X, P, X, causal=True, mask=np.ones((4, 4), bool)),
    "custom node": lambda X, P: _RefusesAfterInit(X, 0),
    "mlp dropout": lambda X, P: gf.mlp(X, [16, 8, 8, 2], dropout=1.5)[0],
    "lenet too many blocks": lambda X, P: gf.layers.lenet(X, (1, 4, 4), 3, channels=(2, 2, 2)),
    "lenet dropout": lambda X, P: gf.layers.lenet(X, (1, 4, 4), 3, channels=(2,), dropout=1.0),
}


@pytest.mark.parametrize("build", REFUSED_CONSTRUCTIONS.values(), ids=REFUSED_CONSTRUCTIONS)
def test_a_refused_node_leaves_its_inputs_as_they_were(build):
    # Regression: nodes that checked their options after Node.__init__ stayed in their inputs'
    # outbound_nodes, so the next sort over those inputs ran the broken node.
    X, P = gf.Input(name="x"), gf.Input(name="p")
    ok = gf.ReLU(X, name="ok")
    before = {n: list(n.outbound_nodes) for n in (X, P, ok)}
    with pytest.raises(gf.GraphError):
        build(X, P)
    assert {n: list(n.outbound_nodes) for n in (X, P, ok)} == before
    x = np.linspace(-1.0, 1.0, 32).reshape(2, 1, 4, 4)
    graph = gf.topological_sort({X: x, P: np.ones(3)}, device="cpu")
    assert set(graph) == {X, P, ok}
    np.testing.assert_array_equal(gf.forward_pass(ok, graph), np.maximum(x, 0.0))
    y = gf.Input(name="y")
    loss = gf.SoftmaxCrossEntropy(y, gf.Linear(gf.Flatten(ok), gf.Parameter((16, 3), name="W"),
                                               gf.Parameter((3,), "zeros", name="b")))
    assert gf.Graph(loss, device="cpu").step(x, np.array([0, 2])) > 0
