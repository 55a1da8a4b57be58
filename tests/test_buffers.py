"""Buffers a node keeps from step to step, and the ops that write into them (`Device.ops`).

On NumPy, CuPy and torch a step writes every value and gradient into arrays made at the first
step; on array_api_strict (no out=) the same code makes new arrays. Either way the numbers are
the same, and what a caller is handed (a loss, `run`'s output) is the caller's own.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import gpuflow as gf
from gpuflow.optim import SGD, Adam
from conftest import host


def _net(sizes=(8, 16, 4), seed=0, activation="relu"):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, params = gf.mlp(X, list(sizes), activation=activation, seed=seed)
    return X, y, logits, gf.SoftmaxCrossEntropy(y, logits), params


def _batch(n, sizes=(8, 16, 4), seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, sizes[0])), rng.integers(0, sizes[-1], n)


# -- the ops -------------------------------------------------------------------------------------
def _op_cases(xp, device):
    rng = np.random.default_rng(3)

    def put(a, dtype="float64"):
        return device.put(np.asarray(a), device.dtype(dtype))

    a, b = put(rng.normal(size=(5, 4))), put(rng.normal(size=(5, 4)))
    w, col = put(rng.normal(size=(4, 3))), put(rng.uniform(1, 2, size=(5, 1)))
    pos = put(rng.uniform(0.5, 2.0, size=(5, 4)))
    labels, classes = put([[0], [2], [1], [2], [0]], "int64"), put(np.arange(3), "int64")
    f64 = device.dtype("float64")
    return [  # (name, args, kwargs, the namespace's own answer)
        ("matmul", (a, w), {}, xp.matmul(a, w)),
        ("matmul", (a.T, b), {}, xp.matmul(a.T, b)),
        ("add", (a, b), {}, a + b),
        ("add", (a, 2.5), {}, a + 2.5),
        ("subtract", (1.0, a), {}, 1.0 - a),
        ("subtract", (a, col), {}, a - col),
        ("multiply", (a, 0.5), {}, a * 0.5),
        ("multiply", (a, b), {}, a * b),
        ("divide", (a, col), {}, a / col),
        ("maximum", (a, 0.0), {}, xp.maximum(a, xp.zeros_like(a))),
        ("maximum", (a, b), {}, xp.maximum(a, b)),
        ("tanh", (a,), {}, xp.tanh(a)),
        ("exp", (a,), {}, xp.exp(a)),
        ("log", (pos,), {}, xp.log(pos)),
        ("sqrt", (pos,), {}, xp.sqrt(pos)),
        ("greater", (a, 0.0, f64), {}, xp.astype(a > 0.0, f64)),
        ("equal", (labels, classes, f64), {}, xp.astype(labels == classes, f64)),
        ("sum", (a,), {"axis": 0}, xp.sum(a, axis=0)),
        ("sum", (a,), {"axis": 1, "keepdims": True}, xp.sum(a, axis=1, keepdims=True)),
        ("sum", (a,), {}, xp.sum(a)),
        ("max", (a,), {"axis": 1, "keepdims": True}, xp.max(a, axis=1, keepdims=True)),
    ]


def test_ops_give_the_namespaces_answers_with_and_without_out(device):
    xp, ops = device.xp, device.ops
    for name, args, kwargs, expected in _op_cases(xp, device):
        fresh = getattr(ops, name)(*args, **kwargs)
        out = device.new_buffer(tuple(expected.shape), expected.dtype)
        written = getattr(ops, name)(*args, **kwargs, out=out)
        for got in (fresh, written):
            assert device.owns(got) or np.ndim(host(device, got)) == 0, name
            np.testing.assert_allclose(host(device, got), host(device, expected), rtol=1e-12,
                                       err_msg=f"ops.{name}")
            assert got.dtype == expected.dtype, f"ops.{name}: {got.dtype} != {expected.dtype}"
        if ops.writes_out:
            assert written is out, f"ops.{name} did not write into out="
        else:
            assert written is not out


def test_new_buffer_is_on_the_device(device):
    buf = device.new_buffer((3, 2), device.dtype("float32"))
    assert device.owns(buf) and tuple(buf.shape) == (3, 2) and buf.dtype == device.dtype("float32")


# -- reuse -----------------------------------------------------------------------------------------
def test_steps_reuse_their_arrays_where_the_backend_writes_into_them(device):
    X, y, logits, loss, params = _net()
    graph = gf.Graph(loss, device=device, dtype="float64", inputs=[X, y])
    opt = SGD(graph, 0.1, momentum=0.9)
    xb, yb = _batch(6)
    graph.step(xb, yb)
    opt.step()
    first_values = {n: n.value for n in graph.nodes  # the loss is a new scalar each step
                    if not isinstance(n, gf.Input) and not n.is_loss}
    first_grads = {p: p.gradients[p] for p in graph.parameters}
    graph.step(*_batch(6, seed=1))
    opt.step()
    for n, v in first_values.items():
        assert (n.value is v) == device.ops.writes_out, n.label
    for p, g in first_grads.items():
        assert (p.gradients[p] is g) == device.ops.writes_out, p.label


def _train(device, reuse, optimizer, steps=6):
    X, y, logits, loss, params = _net(seed=4, activation="tanh")
    graph = gf.Graph(loss, device=device, dtype="float64", inputs=[X, y], reuse_buffers=reuse)
    opt = optimizer(graph)
    losses = []
    for i in range(steps):
        n = 6 if i % 3 else 5  # shapes change, and come back
        losses.append(graph.item(graph.step(*_batch(n, seed=i))))
        opt.step()
    return losses, [host(device, p.value) for p in graph.parameters]


@pytest.mark.parametrize("optimizer", [
    lambda g: SGD(g, 0.1), lambda g: SGD(g, 0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    lambda g: Adam(g, 0.01, weight_decay=0.1), lambda g: gf.optim.AdamW(g, 0.01)],
    ids=["sgd", "nesterov-wd", "adam-l2", "adamw"])
def test_reused_arrays_give_the_same_numbers_as_new_ones(device, optimizer):
    kept, kept_params = _train(device, True, optimizer)
    new, new_params = _train(device, False, optimizer)
    np.testing.assert_array_equal(kept, new)  # the same operations, in the same order
    for a, b in zip(kept_params, new_params):
        np.testing.assert_array_equal(a, b)


def test_miniflow_loop_reuses_arrays_and_matches_new_ones(device):
    def run(reuse):
        X, y, W, b = gf.Input(), gf.Input(), gf.Input(), gf.Input()
        out = gf.Sigmoid(gf.Linear(X, W, b))
        cost = gf.MSE(y, out)
        rng = np.random.default_rng(0)
        feed = {X: rng.normal(size=(7, 3)), y: rng.normal(size=(7, 1)),
                W: rng.normal(size=(3, 1)), b: np.zeros(1)}
        graph = gf.topological_sort(feed, device=device, reuse_buffers=reuse)
        losses, kept = [], None
        for _ in range(4):
            gf.forward_and_backward(graph)
            gf.sgd_update([W, b], 0.5)
            losses.append(float(host(device, cost.value)))
            kept = kept if kept is not None else W.gradients[W]
        assert (W.gradients[W] is kept) == (reuse and device.ops.writes_out)
        return losses, host(device, W.value)

    (l1, w1), (l2, w2) = run(True), run(False)
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_array_equal(w1, w2)


# -- what callers hold stays theirs ----------------------------------------------------------------
def test_run_step_and_forward_pass_return_arrays_the_caller_keeps(device):
    X, y, logits, loss, params = _net()
    graph = gf.Graph(loss, device=device, dtype="float64", inputs=[X, y], outputs=[logits])
    (x1, y1), (x2, y2) = _batch(6, seed=1), _batch(6, seed=2)
    out1 = graph.run(logits, x1)
    snapshot = host(device, out1).copy()
    loss1 = graph.step(x1, y1)
    loss_snapshot = graph.item(loss1)
    graph.run(logits, x2)
    graph.step(x2, y2)
    np.testing.assert_array_equal(host(device, out1), snapshot)
    assert graph.item(loss1) == loss_snapshot

    A, B = gf.Input(), gf.Input()
    act = gf.Tanh(gf.Linear(A, B, gf.Input(name="bias")))
    sorted_nodes = gf.topological_sort({A: np.ones((2, 2)), B: np.eye(2),
                                        act.inbound_nodes[0].inbound_nodes[2]: np.zeros(2)},
                                       device=device)
    first = gf.forward_pass(act, sorted_nodes)
    kept = host(device, first).copy()
    A.value = 2 * np.ones((2, 2))
    gf.forward_pass(act, sorted_nodes)
    np.testing.assert_array_equal(host(device, first), kept)


def test_feeding_one_nodes_array_to_an_input_copies_it(device):
    """An RNN-style loop feeds a node's value back in; the node overwrites that array at its
    next step, so the Input must hold its own copy (else backward would read the new one)."""
    X, h_in, W, b = gf.Input(name="X"), gf.Input(name="h_in"), gf.Input(name="W"), gf.Input(
        name="b")
    h = gf.Tanh(gf.Linear(X, W, b), name="h")
    feed = {X: np.ones((2, 3)), W: 0.5 * np.ones((3, 3)), b: np.zeros(3)}
    graph = gf.topological_sort(feed, device=device)
    gf.forward_and_backward(graph)
    h_in_graph = gf.topological_sort({h_in: np.zeros((2, 3))}, device=device)
    for fed in (h.value, h.value.T):  # the array itself, and a view of it
        h_in.value = fed
        kept = host(device, h_in.value).copy()
        X.value = np.full((2, 3), 3.0)   # the next step writes a new h into h's array
        gf.forward_and_backward(graph)
        np.testing.assert_array_equal(host(device, h_in.value), kept)
        X.value = np.ones((2, 3))
        gf.forward_and_backward(graph)
    assert h_in_graph  # built on the same device


def test_a_name_keeps_its_last_few_shapes(device):
    if not device.ops.writes_out:
        pytest.skip(f"{device.name} makes new arrays (no out=)")
    X, y, logits, loss, params = _net()
    graph = gf.Graph(loss, device=device, dtype="float64", inputs=[X, y])
    first = next(n for n in graph.nodes if isinstance(n, gf.Linear))
    arrays = {}
    for round_ in range(2):  # train at 6, evaluate at 9, a last batch of 5: nothing new
        for n in (6, 9, 5):
            graph.step(*_batch(n))
            if round_ == 0:
                arrays[n] = first.value
            else:
                assert first.value is arrays[n], f"batch {n} got a new array"
    graph.step(*_batch(4))  # a fourth shape pushes out the oldest
    names = [key[0] for key in first.buffers]
    assert max(names.count(k) for k in set(names)) == 3


# -- no allocation per step (NumPy) ---------------------------------------------------------------
def _peak_of_one_step(step, warmup=3):
    for _ in range(warmup):
        step()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        step()
        end, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - start, end - start


SIZES = (256, 512, 512, 10)   # every value and gradient is >= 256 x 10 floats; most are 512 KiB
NUMPY_SCRATCH = 128 * 1024     # NumPy's own per-call iterator buffers (8192 items), freed inside


def _graph_step(optimizer="sgd", reuse=True):
    """One training step (Graph + optimizer) of a float32 MLP of SIZES at batch 256."""
    X, y, logits, loss, params = _net(SIZES, activation="relu")
    graph = gf.Graph(loss, device="cpu", dtype="float32", inputs=[X, y], reuse_buffers=reuse)
    opt = gf.optim.make_optimizer(optimizer, graph, 1e-3)
    xb, yb = _batch(256, SIZES)
    xb = xb.astype(np.float32)

    def step():
        graph.step(xb, yb)
        opt.step()

    return step


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_a_graph_step_allocates_no_array_after_warmup(optimizer):
    peak, net = _peak_of_one_step(_graph_step(optimizer))
    assert peak < NUMPY_SCRATCH, f"a step allocated {peak} bytes at its peak"
    assert net < 1024, f"a step kept {net} bytes"


def test_the_miniflow_loop_allocates_no_array_after_warmup():
    X, y = gf.Input(), gf.Input()
    rng = np.random.default_rng(0)
    feed, trainables, h = {}, [], X
    for i, (n_in, n_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        W, b = gf.Input(name=f"W{i}"), gf.Input(name=f"b{i}")
        feed[W], feed[b] = 0.05 * rng.normal(size=(n_in, n_out)), np.zeros(n_out)
        trainables += [W, b]
        h = gf.Linear(h, W, b)
        h = gf.ReLU(h) if i < len(SIZES) - 2 else h
    xb, yb = _batch(256, SIZES)
    feed[X], feed[y] = xb, yb
    gf.SoftmaxCrossEntropy(y, h)
    graph = gf.topological_sort(feed, dtype="float32")
    xb = xb.astype(np.float32)

    def step():
        X.value, y.value = xb, yb
        gf.forward_and_backward(graph)
        gf.sgd_update(trainables, 1e-3)

    peak, net = _peak_of_one_step(step)
    assert peak < NUMPY_SCRATCH, f"a step allocated {peak} bytes at its peak"
    assert net < 1024, f"a step kept {net} bytes"


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_cnn_step_allocates_no_array_after_warmup(optimizer):
    # Conv2D with padding, BatchNorm, ReLU, tiling max pooling, Flatten, Dropout, Linear: every
    # value and gradient here is >= 64 x 10 floats, most over 128 KiB.
    rng = np.random.default_rng(0)
    X, y = gf.Input(name="X"), gf.Input(name="y")
    h, _ = gf.layers.lenet(X, (1, 12, 12), 10, dropout=0.3, batch_norm=True)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, h), device="cpu", dtype="float32",
                     inputs=[X, y])
    opt = gf.optim.make_optimizer(optimizer, graph, 1e-3)
    xb, yb = rng.normal(size=(64, 1, 12, 12)).astype(np.float32), rng.integers(0, 10, 64)

    def step():
        graph.step(xb, yb)
        opt.step()

    peak, _ = _peak_of_one_step(step)
    assert peak < NUMPY_SCRATCH, f"a step allocated {peak} bytes at its peak"
    # What a step keeps: only the small views it makes of kept arrays (replacing the last
    # step's); no allocation site keeps 2 KiB more (the smallest array here is 2.5 KiB).
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        step()
        grown = [d for d in tracemalloc.take_snapshot().compare_to(before, "lineno")
                 if d.size_diff >= 2048]
    finally:
        tracemalloc.stop()
    assert not grown, f"a step kept arrays: {grown}"


def test_without_reuse_a_step_allocates_its_arrays():
    """The allocation test can fail: making new arrays each step shows up at once."""
    peak, _ = _peak_of_one_step(_graph_step(reuse=False))
    assert peak > 256 * 512 * 4


# -- corner cases a review found -----------------------------------------------------------------
class _Flatten(gf.Node):
    """A MiniFlow-style reshape: its value views its input's array."""

    def __init__(self, x):
        gf.Node.__init__(self, [x])

    def forward(self):
        self.value = self.xp.reshape(self.inbound_nodes[0].value, (-1,))

    def backward(self):
        x = self.inbound_nodes[0]
        self.gradients[x] = self.xp.reshape(self.upstream_gradient(), x.value.shape)


def test_run_copies_an_output_that_views_a_buffer(device):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    W, b = gf.Parameter((3, 1), name="W", rng=0), gf.Parameter((1,), "zeros", name="b")
    pred = _Flatten(gf.Tanh(gf.Linear(X, W, b)))
    graph = gf.Graph(gf.MSE(y, pred), device=device, dtype="float64", inputs=[X, y],
                     outputs=[pred])
    first = graph.run(pred, np.ones((4, 3)))
    kept = host(device, first).copy()
    graph.run(pred, -np.ones((4, 3)))
    np.testing.assert_array_equal(host(device, first), kept)


def _shares_memory_ways(device):
    if device.backend == "torch":
        ways = [("detach()", lambda a: a.detach()), ("data", lambda a: a.data)]
        if device.is_host:
            ways.append(("numpy()", lambda a: a.numpy()))
        return ways
    if device.name == "cpu":
        return [("as_strided", lambda a: np.lib.stride_tricks.as_strided(a)),
                ("reshape", lambda a: a.reshape(a.shape))]
    return [("T.T", lambda a: a.T.T)]


def test_an_input_fed_memory_shared_with_a_buffer_copies_it(device):
    X, W, b = gf.Input(name="X"), gf.Input(name="W"), gf.Input(name="b")
    h = gf.Tanh(gf.Linear(X, W, b), name="h")
    graph = gf.topological_sort({X: np.ones((2, 3)), W: 0.5 * np.ones((3, 3)),
                                 b: np.zeros(3)}, device=device)
    h_in = gf.Input(name="h_in")
    gf.topological_sort({h_in: np.zeros((2, 3))}, device=device)
    gf.forward_and_backward(graph)
    for how, share in _shares_memory_ways(device):
        h_in.value = share(h.value)
        kept = host(device, h_in.value).copy()
        X.value = np.full((2, 3), -3.0)
        gf.forward_and_backward(graph)
        np.testing.assert_array_equal(host(device, h_in.value), kept, err_msg=how)
        X.value = np.ones((2, 3))
        gf.forward_and_backward(graph)


class _Neuron(gf.Node):
    """The lesson's scalar neuron: `self.value = bias.value; self.value += x * w`."""

    def __init__(self, x, w, bias):
        gf.Node.__init__(self, [x, w, bias])

    def forward(self):
        x, w, bias = self.inbound_nodes
        self.value = bias.value
        self.value += x.value * w.value

    def backward(self):
        G = self.upstream_gradient()
        x, w, bias = self.inbound_nodes
        self.gradients[x], self.gradients[w], self.gradients[bias] = G * w.value, G * x.value, G


def test_scalar_values_stay_immutable_numpy_scalars():
    x, w, b, y = gf.Input(), gf.Input(), gf.Input(), gf.Input()
    s = gf.Sigmoid(b)
    gf.MSE(y, _Neuron(x, w, s))
    graph = gf.topological_sort({x: 2.0, w: 3.0, b: 0.0, y: 10.0})
    gf.forward_and_backward(graph)
    assert isinstance(s.value, np.floating) and float(s.value) == 0.5
    assert float(b.gradients[b]) == -1.75  # 2 (6.5 - 10) * s (1 - s)


class _Scale(gf.Node):
    """y = a * x for a scalar a, whose gradient is a Python float."""

    def __init__(self, x, a):
        gf.Node.__init__(self, [x, a])

    def forward(self):
        x, a = self.inbound_nodes
        self.value = a.value * x.value

    def backward(self):
        G = self.upstream_gradient()
        x, a = self.inbound_nodes
        self.gradients[x] = a.value * G
        self.gradients[a] = float(self.xp.sum(G * x.value))


@pytest.mark.parametrize("update", ["sgd_update", "SGD", "Adam"])
def test_a_python_number_gradient_still_trains(update):
    X, a, y = gf.Input(), gf.Input(), gf.Input()
    gf.MSE(y, _Scale(X, a))
    graph = gf.topological_sort({X: np.ones((4, 1)), a: 0.5, y: np.full((4, 1), 2.0)})
    gf.forward_and_backward(graph)
    {"sgd_update": lambda: gf.sgd_update([a], 0.1), "SGD": lambda: SGD([a], 0.1).step(),
     "Adam": lambda: Adam([a], 0.1).step()}[update]()
    assert float(a.value) > 0.5  # d cost / d a = -3: a grows


def test_hooks_set_on_a_node_after_the_graph_is_built_run(device):
    X, y, logits, loss, params = _net()
    graph = gf.Graph(loss, device=device, dtype="float64", inputs=[X, y])
    node = next(n for n in graph.nodes if isinstance(n, gf.ReLU))
    calls = []
    original = node.forward
    node.forward = lambda: (calls.append(1), original())
    for _ in range(3):
        graph.step(*_batch(6))
    assert len(calls) == 3


class _SumLoss(gf.Node):
    """sum(x), whose gradient it sends back as a 0-d array (it broadcasts)."""

    is_loss = True

    def __init__(self, x):
        gf.Node.__init__(self, [x])

    def forward(self):
        self.value = self.xp.sum(self.inbound_nodes[0].value)

    def backward(self):
        g = self.xp.asarray(self.upstream_gradient(), dtype=self.value.dtype,
                            device=self.device.native)
        self.gradients[self.inbound_nodes[0]] = g


def test_relu_takes_a_broadcast_upstream_gradient(device):
    X = gf.Input()
    W, b = gf.Parameter((3, 2), name="W", rng=0), gf.Parameter((2,), "zeros", name="b")
    graph = gf.Graph(_SumLoss(gf.ReLU(gf.Linear(X, W, b))), device=device, dtype="float64",
                     inputs=[X])
    xb = np.arange(12.0).reshape(4, 3) - 5
    graph.step(xb)
    z = xb @ host(device, W.value)
    np.testing.assert_allclose(host(device, W.gradients[W]), xb.T @ (z > 0), rtol=1e-12)


class _Floor(gf.Node):
    """Integer output (floor as int64), no gradient."""

    def __init__(self, x):
        gf.Node.__init__(self, [x])

    def forward(self):
        xp = self.xp
        self.value = xp.astype(xp.floor(self.inbound_nodes[0].value), xp.int64)

    def backward(self):
        self.gradients[self.inbound_nodes[0]] = self.xp.zeros_like(self.inbound_nodes[0].value)


@pytest.mark.parametrize("activation", [gf.ReLU, gf.Sigmoid, gf.Tanh])
def test_activations_of_integer_values_act_as_without_buffers(device, activation):
    """Integer values promote (NumPy, torch) or are refused (array_api_strict) as the
    namespace decides, whether or not the graph keeps buffers."""
    outcomes = []
    for reuse in (False, True):
        X = gf.Input()
        out = activation(_Floor(X))
        graph = gf.topological_sort({X: np.array([[-1.5, 2.5]])}, device=device,
                                    reuse_buffers=reuse)
        try:
            got = gf.forward_pass(out, graph)
            outcomes.append((str(got.dtype), host(device, got).tolist()))
        except TypeError as exc:
            outcomes.append(type(exc).__name__)
    assert outcomes[0] == outcomes[1]
    if device.name == "cpu":
        assert outcomes[0][0] == "float64"


def test_an_evaluation_batch_of_another_size_is_not_kept():
    X, y, logits, loss, params = _net((8, 64, 4))
    graph = gf.Graph(loss, device="cpu", dtype="float64", inputs=[X, y], outputs=[logits])

    def kept_bytes():
        return sum(a.nbytes for n in graph.nodes for a in n.buffers.values())

    graph.step(*_batch(6, (8, 64, 4)))
    before = kept_bytes()
    big = graph.run(logits, _batch(5000, (8, 64, 4))[0])
    assert big.shape == (5000, 4)
    graph.step(*_batch(6, (8, 64, 4)))
    assert kept_bytes() == before


def test_running_one_graph_forward_only_leaves_other_graphs_keeping_their_arrays():
    """The forward-only switch belongs to a graph's plan, not to the process."""
    from gpuflow.runtime.buffers import forward_only
    X, y, logits, loss, params = _net((8, 16, 4))
    graph = gf.Graph(loss, device="cpu", dtype="float64", inputs=[X, y], outputs=[logits])
    X2, y2, logits2, loss2, params2 = _net((8, 16, 4), seed=1)
    other = gf.Graph(loss2, device="cpu", dtype="float64", inputs=[X2, y2])
    first = next(n for n in other.nodes if isinstance(n, gf.Linear))
    with forward_only([graph.plan]):
        assert graph.plan.keeping is False
        other.step(*_batch(7))   # a shape `other` has not met: kept, as in any training step
    assert graph.plan.keeping is True
    assert any(key[1] == (7, 16) for key in first.buffers)
    graph.run(logits, _batch(11)[0])   # `graph` itself, forward only: not kept
    assert not any(key[1] == (11, 16) for n in graph.nodes for key in n.buffers)


def test_each_graph_over_shared_nodes_sets_its_own_mode():
    """Training mode is recorded per graph plan, with no process-wide counter: a graph that
    set a mode on shared nodes, or a MiniFlow call over a plain list, makes the other graph
    set its own mode again at its next step."""
    X, y, logits, loss, params = _net((8, 16, 4))
    train = gf.Graph(loss, device="cpu", dtype="float64", inputs=[X, y], outputs=[logits])
    evaluate = gf.Graph(loss, device="cpu", dtype="float64", inputs=[X, y], outputs=[logits])
    x, labels = _batch(6)
    train.step(x, labels)
    assert all(n.training for n in train.nodes)
    evaluate.run(logits, x)
    assert not any(n.training for n in train.nodes)
    train.step(x, labels)
    assert all(n.training for n in train.nodes)
    train.step(x, labels)   # nothing changed since: the mode stays, without a loop
    assert all(n.training for n in train.nodes)
    gf.forward_pass(logits, list(train.nodes))   # a plain list: evaluation mode
    assert not any(n.training for n in train.nodes)
    train.step(x, labels)
    assert all(n.training for n in train.nodes)
