"""Issue 13's API items (silent wrong results, validation gaps, lesson fidelity, conventions):
one regression test or more per item, named after what it checks."""

from __future__ import annotations

import decimal
import warnings

import numpy as np
import pytest

import gpuflow as gf
from conftest import Project, host
from gpuflow.optim import SGD, Adam, AdamW, make_optimizer


def expect(exc_type, fn, *parts):
    """Call fn; it must raise exc_type with every one of `parts` (and 'help:') in the message."""
    with pytest.raises(exc_type) as info:
        fn()
    msg = str(info.value)
    for part in (*parts, "help:"):
        assert part in msg, f"{part!r} missing from: {msg}"
    return msg


# -- item 4: Sigmoid accurate to a few ulp over the whole range -----------------------------------
def _sigmoid_reference(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """sigmoid(x) and its derivative sigmoid(x) sigmoid(-x), to 40 digits (Python's decimal,
    from the exact binary value of each x), rounded to `dtype`."""
    values, grads = [], []
    with decimal.localcontext() as ctx:
        ctx.prec = 40
        for v in x.tolist():
            e = decimal.Decimal(-abs(v)).exp()   # exp(-|x|), never large
            s_neg = e / (1 + e)                  # sigmoid(-|x|)
            s_pos = 1 / (1 + e)                  # sigmoid(|x|)
            values.append(float(s_pos if v >= 0 else s_neg))
            grads.append(float(s_pos * s_neg))
    return np.asarray(values).astype(dtype), np.asarray(grads).astype(dtype)


def _ulps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|got - want| in units of the last place of `want` (its dtype's spacing there)."""
    want = want.astype(got.dtype)
    return np.abs(got.astype(np.float64) - want.astype(np.float64)) / np.spacing(np.abs(want))


@pytest.mark.parametrize("dtype, limit", [("float64", 745.0), ("float32", 100.0)])
def test_sigmoid_and_its_gradient_are_accurate_to_a_few_ulp(device, dtype, limit):
    x = np.concatenate([np.linspace(-limit, limit, 1201),
                        [-38.0, -30.0, -18.0, -15.0, -9.0, -1e-8, 1e-8, 9.0, 36.0]])
    x = x.astype(dtype)
    Z, R = gf.Input(name="Z"), gf.Input(name="R")
    node = gf.Sigmoid(Z, name="s")
    Project(node, R)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise", under="ignore"):
            graph = gf.topological_sort({Z: x[None, :], R: np.ones((1, x.size))},
                                        device=device, dtype=dtype)
            gf.forward_and_backward(graph)
    s, grad = host(device, node.value)[0], host(device, Z.gradients[Z])[0]
    want_s, want_grad = _sigmoid_reference(x, dtype)
    if device.flushes_subnormals:  # XLA (JAX) gives 0 where the true result is subnormal
        tiny = np.finfo(dtype).tiny
        want_s, want_grad = (np.where(np.abs(w) < tiny, 0, w).astype(w.dtype)
                             for w in (want_s, want_grad))
    # measured: values <= 2 ulp, gradients <= 4 (the tanh form: 100% off from x = -38 on)
    for what, got, want, ulps in (("value", s, want_s, 4), ("gradient", grad, want_grad, 6)):
        err = _ulps(got, want)
        worst = int(np.argmax(err))
        assert err[worst] <= ulps, (f"sigmoid {what} at x={x[worst]!r}: {got[worst]!r}, "
                                 f"want {want[worst]!r} ({err[worst]:.1f} ulp)")


def test_sigmoid_of_infinities_is_0_and_1(device):
    Z = gf.Input(name="Z")
    node = gf.Sigmoid(Z)
    graph = gf.topological_sort({Z: np.array([[-np.inf, np.inf]])}, device=device)
    with np.errstate(all="raise", under="ignore"):
        assert host(device, gf.forward_pass(node, graph)).tolist() == [[0.0, 1.0]]


def test_a_sigmoid_graph_step_allocates_no_array_after_warmup():
    from test_buffers import NUMPY_SCRATCH, SIZES, _batch, _net, _peak_of_one_step
    X, y, _, loss, _ = _net(SIZES, activation="sigmoid")
    graph = gf.Graph(loss, device="cpu", dtype="float32", inputs=[X, y])
    opt = SGD(graph, 1e-3)
    xb, yb = _batch(256, SIZES)
    xb = xb.astype(np.float32)

    def step():
        graph.step(xb, yb)
        opt.step()

    peak, net = _peak_of_one_step(step)
    assert peak < NUMPY_SCRATCH, f"a step allocated {peak} bytes at its peak"
    assert net < 1024, f"a step kept {net} bytes"


# -- item 11: the lesson's Linear quiz on vectors (MiniFlow's np.dot) -----------------------------
def test_lesson_linear_quiz_on_vectors_prints_12_7(device):
    inputs, weights, bias = gf.Input(), gf.Input(), gf.Input()
    f = gf.Linear(inputs, weights, bias)
    feed_dict = {inputs: [6, 14, 3], weights: [0.5, 0.25, 1.4], bias: 2}
    graph = gf.topological_sort(feed_dict, device=device)
    output = gf.forward_pass(f, graph)
    assert host(device, output).shape == ()
    assert float(host(device, output)) == pytest.approx(12.7, rel=1e-12)


@pytest.mark.parametrize("x_shape, w_shape, b_shape", [
    ((3,), (3,), ()), ((3,), (3,), (1,)), ((3,), (3, 2), (2,)), ((4, 3), (3,), ()),
    ((4, 3), (3,), (1,)), ((3,), (3, 2), (1, 2))])
def test_linear_on_vectors_matches_np_dot_and_keeps_gradient_shapes(device, x_shape, w_shape,
                                                                    b_shape):
    rng = np.random.default_rng(5)
    x, w, b = (rng.normal(size=s) for s in (x_shape, w_shape, b_shape))
    X, W, B, R = gf.Input(), gf.Input(), gf.Input(), gf.Input()
    f = gf.Linear(X, W, B)
    expected = np.dot(x, w) + b   # MiniFlow's Linear
    r = rng.normal(size=np.shape(expected))
    loss = Project(f, R)
    graph = gf.topological_sort({X: x, W: w, B: b, R: r}, device=device)
    gf.forward_and_backward(graph)
    np.testing.assert_allclose(host(device, f.value), expected, rtol=1e-12)
    assert host(device, f.value).shape == np.shape(expected)
    x2, w2 = x.reshape(-1, x_shape[-1]), w.reshape(w_shape[0], -1)
    r2 = r.reshape(x2.shape[0], w2.shape[1])
    for node, want in ((X, r2 @ w2.T), (W, x2.T @ r2), (B, r2.sum(axis=0))):
        got = host(device, node.gradients[node])
        assert got.shape == {X: x_shape, W: w_shape, B: b_shape}[node], node
        np.testing.assert_allclose(got, want.reshape(got.shape), rtol=1e-12)
    assert float(host(device, loss.value)) == pytest.approx(float(np.sum(expected * r)))


def test_linear_vectors_of_different_lengths_are_refused(device):
    X, W, B = gf.Input(name="X"), gf.Input(name="W"), gf.Input(name="b")
    f = gf.Linear(X, W, B, name="hidden")
    graph = gf.topological_sort({X: np.ones(5), W: np.ones(3), B: 0.0}, device=device)
    expect(gf.GraphError, lambda: gf.forward_pass(f, graph), "Linear 'hidden'",
           "X has shape (5,)", "W has shape (3,)", "Input 'X'")


# -- item 12: MSE keeps MiniFlow's column `diff` ---------------------------------------------------
@pytest.mark.parametrize("shape", [(3,), (3, 1), (1, 3), (3, 2)])
def test_mse_diff_is_a_column_and_gradients_keep_the_inputs_shapes(device, shape):
    rng = np.random.default_rng(2)
    y0, a0 = rng.normal(size=shape), rng.normal(size=shape)
    y, a = gf.Input(), gf.Input()
    cost = gf.MSE(y, a)
    graph = gf.topological_sort({y: y0, a: a0}, device=device)
    gf.forward_and_backward(graph)
    m = y0.size
    assert cost.m == m
    assert tuple(cost.diff.shape) == (m, 1)
    np.testing.assert_allclose(host(device, cost.diff), (y0 - a0).reshape(-1, 1), rtol=1e-12)
    np.testing.assert_allclose(float(host(device, cost.value)), np.mean((y0 - a0) ** 2),
                               rtol=1e-12)
    for node, want in ((y, 2 / m * (y0 - a0)), (a, -2 / m * (y0 - a0))):
        got = host(device, node.gradients[node])
        assert got.shape == shape
        np.testing.assert_allclose(got, want, rtol=1e-12)


# -- item 3: float16 never NaNs quietly; check_finite checks the optimizer's update ---------------
def _classifier_graph(device, dtype, **options):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, params = gf.mlp(X, [4, 8, 3], seed=0)
    loss = gf.SoftmaxCrossEntropy(y, logits, name="loss")
    graph = gf.Graph(loss, device=device, dtype=dtype, inputs=[X, y], **options)
    rng = np.random.default_rng(0)
    return graph, params, rng.normal(size=(16, 4)), rng.integers(0, 3, 16)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_in_float16_stays_finite_and_tracks_float32(device, name):
    losses = {}
    for dtype in ("float16", "float32"):
        try:
            graph, params, xb, yb = _classifier_graph(device, dtype, check_finite=True)
        except gf.GraphError as exc:  # a device without float16
            pytest.skip(str(exc).splitlines()[0])
        opt = make_optimizer(name, graph, 1e-2)
        losses[dtype] = []
        for _ in range(20):
            losses[dtype].append(graph.item(graph.step(xb, yb)))
            opt.step()
        for p in params.values():
            assert np.isfinite(host(device, p.value).astype(np.float64)).all(), p.label
            assert p.value.dtype == graph.dtype, "the update changed the parameter's dtype"
        if dtype == "float16":  # the moments are float32, also after a state round trip
            opt.load_state_dict(opt.state_dict())
            assert all(str(b.dtype).endswith("float32") for st in opt.state.values()
                       for b in st.values())
    assert all(np.isfinite(losses["float16"]))
    assert losses["float16"][-1] < losses["float16"][0] - 0.1, losses["float16"]
    np.testing.assert_allclose(losses["float16"], losses["float32"], atol=0.05)


def test_check_finite_names_the_optimizer_and_parameter_whose_update_overflowed(device):
    graph, params, xb, yb = _classifier_graph(device, "float32", check_finite=True)
    opt = SGD(graph, lr=1e10)
    graph.step(xb, yb)
    W = params["layer1.W"]
    W.gradients[W] = device.put(np.full(W.shape, 1e30), graph.dtype)  # lr * 1e30 overflows
    with np.errstate(over="ignore", invalid="ignore"):
        msg = expect(gf.GraphError, opt.step, "SGD's update of Parameter 'layer1.W'",
                     "at optimizer step 1", "NaN or Inf")
    assert "Linear" not in msg


@pytest.mark.parametrize("form", ["graph.parameters", "gf.mlp's dict"])
def test_check_finite_checks_an_optimizer_over_the_graphs_parameters_too(form):
    """Only SGD(graph) was checked; SGD(graph.parameters) and SGD(params) follow the graph's
    settings alike (issue 18, item 2)."""
    graph, params, xb, yb = _classifier_graph("cpu", "float32", check_finite=True)
    opt = SGD(graph.parameters if form == "graph.parameters" else params, lr=1e10)
    graph.step(xb, yb)
    W = params["layer1.W"]
    W.gradients[W] = np.full(W.shape, 1e30, dtype=np.float32)  # lr * 1e30 overflows
    with np.errstate(over="ignore", invalid="ignore"):
        expect(gf.GraphError, opt.step, "SGD's update of Parameter 'layer1.W'")


def test_check_finite_off_leaves_the_optimizer_unchecked():
    graph, params, xb, yb = _classifier_graph("cpu", "float32")
    opt = SGD(graph, lr=1e10)
    graph.step(xb, yb)
    W = params["layer1.W"]
    W.gradients[W] = np.full(W.shape, 1e30, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        opt.step()
    assert not np.isfinite(params["layer1.W"].value).all()


# -- item 5: every optimizer hyperparameter validated as lr is ------------------------------------
def _one_parameter():
    W = gf.Parameter((2, 2), name="W")
    gf.Graph(Project(W, gf.Input(name="R")), dtype="float64")
    return W


@pytest.mark.parametrize("cls, options, named", [
    (SGD, dict(momentum=float("nan")), "momentum"),
    (SGD, dict(momentum=float("inf")), "momentum"),
    (SGD, dict(momentum=-0.5), "momentum"),
    (SGD, dict(momentum="0.9"), "momentum"),
    (SGD, dict(momentum=None), "momentum"),
    (SGD, dict(weight_decay=float("nan")), "weight_decay"),
    (SGD, dict(weight_decay=float("-inf")), "weight_decay"),
    (SGD, dict(momentum=0.9, nesterov="yes"), "nesterov"),
    (Adam, dict(eps=float("nan")), "eps"),
    (Adam, dict(eps=0.0), "eps"),
    (Adam, dict(eps=float("inf")), "eps"),
    (Adam, dict(weight_decay=float("nan")), "weight_decay"),
    (Adam, dict(betas=(0.9,)), "betas"),
    (Adam, dict(betas=0.9), "betas"),
    (Adam, dict(betas=None), "betas"),
    (Adam, dict(betas="ab"), "betas"),
    (Adam, dict(betas=(0.9, 0.999, 0.5)), "betas"),
    (Adam, dict(betas=(float("nan"), 0.999)), "betas[0]"),
    (Adam, dict(betas=(0.9, 1.0)), "betas[1]"),
    (Adam, dict(betas=(0.9, "0.999")), "betas[1]"),
    (AdamW, dict(eps=-1e-8), "eps"),
    (AdamW, dict(weight_decay=float("inf")), "weight_decay"),
    (AdamW, dict(betas=(-0.1, 0.999)), "betas[0]"),
])
def test_optimizer_hyperparameters_are_validated_naming_argument_and_optimizer(cls, options,
                                                                              named):
    W = _one_parameter()
    before = W.value.copy()
    msg = expect(ValueError, lambda: cls([W], 0.1, **options), f"{cls.__name__}: {named}")
    assert "Error" not in msg.splitlines()[0]
    np.testing.assert_array_equal(W.value, before)


def test_valid_hyperparameters_are_kept_as_floats():
    W = _one_parameter()
    opt = Adam([W], 0.1, betas=[np.float32(0.5), 0.75], eps=np.float64(1e-6), weight_decay=0)
    assert opt.betas == (0.5, 0.75) and opt.eps == 1e-6 and opt.weight_decay == 0.0
    sgd = SGD([W], 0.1, momentum=np.float64(0.9), nesterov=np.True_)
    assert sgd.momentum == 0.9 and sgd.nesterov


# -- item 6: the dict gf.mlp returns, and a non-scalar loss ---------------------------------------
def test_optimizers_take_the_parameter_dict_mlp_returns(device):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, params = gf.mlp(X, [3, 4, 2], seed=0)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=device, inputs=[X, y])
    for cls in (SGD, Adam, AdamW):
        assert cls(params, 0.1).params == list(params.values())
    opt = Adam(params, 0.1)
    before = host(device, params["layer1.W"].value).copy()
    graph.step(np.ones((2, 3)), np.array([0, 1]))
    opt.step()
    assert not np.allclose(host(device, params["layer1.W"].value), before)


@pytest.mark.parametrize("bad, why", [
    (["W"], "an item 'W' (str)"),
    ([np.ones(2)], "(ndarray)"),
    (3, "got int"),
])
def test_optimizers_refuse_what_is_not_parameters(bad, why):
    expect(gf.GraphError, lambda: Adam(bad, 0.1), "Adam: parameters must be gpuflow nodes",
           why, "dict gf.mlp(...) returns")


def test_an_optimizer_given_one_parameter_asks_for_a_list():
    W = _one_parameter()
    expect(gf.GraphError, lambda: SGD(W, 0.1), "SGD: got one node, Parameter 'W'", "[W]")


# -- item 17: a Parameter from weights one already has ---------------------------------------------
def test_parameter_from_an_array_starts_from_a_copy_of_it(device):
    W0 = np.arange(6.0).reshape(2, 3)
    for W in (gf.Parameter(W0, name="W"), gf.Parameter.from_array(W0, name="W")):
        W0_before = W0.copy()
        X, y = gf.Input(name="X"), gf.Input(name="y")
        b = gf.Parameter(np.zeros(3), name="b")
        loss = gf.MSE(y, gf.Linear(X, W, b))
        graph = gf.Graph(loss, device=device, dtype="float64", inputs=[X, y])
        assert W.shape == (2, 3) and b.shape == (3,)
        np.testing.assert_array_equal(host(device, W.value), W0)
        graph.step(np.ones((4, 2)), np.zeros((4, 3)))
        SGD(graph, 0.1).step()
        np.testing.assert_array_equal(W0, W0_before)  # the caller's array never moves
        assert not np.allclose(host(device, W.value), W0)


def test_parameter_from_an_array_is_copied_when_made():
    W0 = np.ones((2, 2))
    W = gf.Parameter(W0, name="W")
    W0[:] = 5.0
    np.testing.assert_array_equal(gf.to_numpy(W.value), np.ones((2, 2)))
    assert gf.Parameter([[1.0, 2.0]], name="rows").shape == (1, 2)


def test_a_list_of_numbers_is_an_initial_value_and_a_tuple_of_ints_a_shape():
    # Regression (issue 18.21): a flat list was read as a shape ("shape [0.1, 0.2, 0.3] must be
    # a tuple of positive ints"); as torch.tensor reads it, a list is a value.
    b = gf.Parameter([0.1, 0.2, 0.3], name="b")
    assert b.shape == (3,)
    np.testing.assert_array_equal(gf.to_numpy(b.value), [0.1, 0.2, 0.3])
    ints = gf.Parameter([3, 4], name="v")  # a value too (of floats), not the shape (3, 4)
    assert ints.shape == (2,) and gf.to_numpy(ints.value).dtype == np.float64
    assert gf.Parameter([[1, 2], [3, 4]], name="M").shape == (2, 2)
    assert gf.Parameter((3, 4), name="W").shape == (3, 4)  # a tuple of ints: a shape
    expect(gf.GraphError, lambda: gf.Parameter((0.1, 0.2), name="t"), "must be a tuple of "
           "positive ints", "a list or an array as the initial value")
    expect(gf.GraphError, lambda: gf.Parameter([], name="e"), "no entries")
    X, y = gf.Input(name="X"), gf.Input(name="y")
    W = gf.Parameter([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]], name="W")
    graph = gf.Graph(gf.MSE(y, gf.Linear(X, W, b)), dtype="float32", inputs=[X, y])
    graph.step(np.ones((4, 2)), np.zeros((4, 3)))
    SGD(graph, 0.1).step()
    assert not np.allclose(gf.to_numpy(b.value), [0.1, 0.2, 0.3])


def test_parameter_from_a_device_array():
    torch = pytest.importorskip("torch")
    W = gf.Parameter(torch.ones(2, 3, requires_grad=True), name="W")
    assert W.shape == (2, 3)
    np.testing.assert_array_equal(gf.to_numpy(W.value), np.ones((2, 3)))


@pytest.mark.parametrize("shape", [(3, "a"), 3.5, None, (0, 2), (2.0, 3), "ab", (True, 2), ()])
def test_a_wrong_parameter_shape_is_a_graph_error(shape):
    expect(gf.GraphError, lambda: gf.Parameter(shape, name="W"), "Parameter 'W': shape",
           "must be a tuple of positive ints")


def test_an_initial_array_and_an_init_together_are_refused():
    expect(gf.GraphError, lambda: gf.Parameter(np.ones((2, 2)), "he", name="W"),
           "Parameter 'W': got an initial array and init='he'")


def test_parameter_shape_as_one_int_or_numpy_ints():
    assert gf.Parameter(3, name="b").shape == (3,)
    assert gf.Parameter((np.int64(2), np.int32(3)), name="W").shape == (2, 3)


# -- item 15: gf.to_numpy on every device ----------------------------------------------------------
def test_to_numpy_brings_back_any_devices_values(device):
    X, W, b = gf.Input(), gf.Input(), gf.Input()
    f = gf.Linear(X, W, b)
    graph = gf.topological_sort({X: np.ones((2, 3)), W: np.ones((3, 2)), b: np.zeros(2)},
                                device=device)
    out = gf.forward_pass(f, graph)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for value, want in ((out, np.full((2, 2), 3.0)), (f.value, np.full((2, 2), 3.0)),
                            (graph.device.xp.sum(out), np.array(12.0))):
            got = gf.to_numpy(value)
            assert type(got) is np.ndarray, type(got)
            np.testing.assert_array_equal(got, want)
    assert gf.to_numpy(2.5).tolist() == 2.5 and gf.to_numpy([1, 2]).tolist() == [1, 2]
    assert type(gf.to_numpy(np.float32(1.5))) is np.ndarray


def test_to_numpy_returns_a_copy_the_next_step_leaves_alone(device):
    graph, params, xb, yb = _classifier_graph(device, "float64")
    W = params["layer1.W"]
    graph.step(xb, yb)
    kept = gf.to_numpy(W.gradients[W])
    graph.step(xb * 2, yb)
    assert not np.allclose(kept, gf.to_numpy(W.gradients[W]))
    np.testing.assert_array_equal(kept, gf.to_numpy(kept))
    assert gf.to_numpy(kept) is not kept


# -- item 1: feed keys must be this graph's Inputs; none may be left out ---------------------------
def _regression_graph(device="cpu"):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    out, params = gf.mlp(X, [3, 4, 1], seed=0)
    loss = gf.MSE(y, out, name="loss")
    return gf.Graph(loss, device=device, dtype="float64", inputs=[X, y]), X, y, out, params


def test_a_step_fed_a_node_that_is_not_an_input_is_refused(device):
    graph, X, y, out, params = _regression_graph(device)
    rng = np.random.default_rng(0)
    graph.step({X: rng.normal(size=(4, 3)), y: np.zeros((4, 1))})
    layer1 = out.inbound_nodes[0].inbound_nodes[0]  # the first Linear
    before = host(device, X.value).copy()
    expect(gf.GraphError, lambda: graph.step({layer1: rng.normal(size=(4, 3)),
                                              y: np.zeros((4, 1))}),
           "Linear 'layer1' is fed but is a Linear, not an Input", "Input 'X', Input 'y'")
    np.testing.assert_array_equal(host(device, X.value), before)


def test_a_step_fed_an_input_of_another_graph_is_refused():
    graph, X, y, out, params = _regression_graph()
    stranger = gf.Input(name="stranger")
    expect(gf.GraphError, lambda: graph.step({stranger: np.ones((4, 3)), X: np.ones((4, 3)),
                                              y: np.zeros((4, 1))}),
           "Input 'stranger' is fed but is not in this graph")
    expect(gf.GraphError, lambda: graph.step({"X": np.ones((4, 3)), y: np.zeros((4, 1))}),
           "'X' is fed but is a str, not an Input")


def test_an_input_left_out_of_a_steps_dict_is_an_error_not_its_last_batch():
    """The documented rule: every data Input (graph.inputs) is fed at every step."""
    graph, X, y, out, params = _regression_graph()
    graph.step({X: np.ones((4, 3)), y: np.zeros((4, 1))})
    expect(gf.GraphError, lambda: graph.step({y: np.ones((4, 1))}),
           "Input 'X' left out of the step's dict", "add Input 'X' to the dict")
    np.testing.assert_array_equal(y.value, np.zeros((4, 1)))  # nothing was fed
    # run needs only what its output depends on
    assert graph.run(out, {X: np.ones((2, 3))}).shape == (2, 1)


def test_a_graph_of_a_non_scalar_loss_is_refused_at_its_first_step(device):
    X = gf.Input(name="X")
    logits, params = gf.mlp(X, [3, 4, 2], seed=0)
    graph = gf.Graph(logits, device=device, inputs=[X])
    W = params["layer1.W"]
    before = host(device, W.value).copy()
    expect(gf.GraphError, lambda: graph.step(np.ones((5, 3))),
           "the loss, Linear 'layer2', has shape (5, 2), not one number",
           "SoftmaxCrossEntropy(y, logits)")
    np.testing.assert_array_equal(host(device, W.value), before)
    assert W.gradients.get(W) is None


# -- item 8: a refused topological_sort changes no node --------------------------------------------
@pytest.mark.parametrize("bad", ["none", "strings", "foreign"])
def test_a_refused_sort_leaves_the_nodes_free_for_another_device(bad):
    X, W, b = gf.Input(name="X"), gf.Input(name="W"), gf.Input(name="b")
    f = gf.Linear(X, W, b, name="f")
    good = {X: np.ones((2, 3)), W: np.ones((3, 2)), b: np.zeros(2)}
    wrong = dict(good)
    if bad == "none":
        wrong[W] = None
    elif bad == "strings":
        wrong[W] = np.array([["a", "b"]] * 3)
    else:
        torch = pytest.importorskip("torch")
        wrong[W] = torch.ones(3, 2)
    with pytest.raises((gf.GraphError, gf.DeviceError)):
        gf.topological_sort(wrong, device="cpu")
    for node in (X, W, b, f):
        assert node.device is None and node.value is None, node
    graph = gf.topological_sort(good, device="array_api_strict:device1")
    assert host(graph.device, gf.forward_pass(f, graph)).tolist() == [[3.0, 3.0]] * 2


# -- item 2: trainable = False after the Graph is built -------------------------------------------
@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw"])
def test_freezing_a_parameter_after_the_graph_is_built_stops_its_training(device, name):
    graph, X, y, out, params = _regression_graph(device)
    opt = make_optimizer(name, graph, 0.1)
    rng = np.random.default_rng(1)
    xb, yb = rng.normal(size=(8, 3)), rng.normal(size=(8, 1))
    graph.step(xb, yb)
    opt.step()
    W1, W2 = params["layer1.W"], params["layer2.W"]
    W1.trainable = False
    frozen, moving = host(device, W1.value).copy(), host(device, W2.value).copy()
    for _ in range(3):
        graph.step(xb, yb)
        opt.step()
    np.testing.assert_array_equal(host(device, W1.value), frozen)
    assert not np.allclose(host(device, W2.value), moving)
    # the graph no longer computes its gradient, nor anything only it needed
    layer1 = out.inbound_nodes[0].inbound_nodes[0]
    assert not layer1.needs_grad[1] and not layer1.needs_grad[0]
    assert W1 in graph.parameters  # still saved in checkpoints
    W1.trainable = True             # and trained again when thawed
    graph.step(xb, yb)
    opt.step()
    assert not np.allclose(host(device, W1.value), frozen)


def test_freezing_is_the_parameters_own_state_across_graphs(device):
    # Regression (issue 19, item 1): a freeze bumped a process-wide counter on the Parameter
    # class, which every optimizer compared; now the optimizer reads `trainable` at its step.
    X, y = gf.Input(name="X"), gf.Input(name="y")
    out, params = gf.mlp(X, [3, 4, 1], seed=0)
    opt = SGD(params, lr=0.1)  # made before the graphs
    graphs = [gf.Graph(loss, device=device, dtype="float64", inputs=[X, y])
              for loss in (gf.MSE(y, out), gf.MSE(y, out))]  # two graphs, one model
    rng = np.random.default_rng(2)
    xb, yb = rng.normal(size=(8, 3)), rng.normal(size=(8, 1))
    graphs[0].step(xb, yb)
    opt.step()
    W1, W2 = params["layer1.W"], params["layer2.W"]
    shared = dict(vars(gf.Parameter))
    W1.trainable = False
    assert dict(vars(gf.Parameter)) == shared, "a freeze changes only its parameter"
    frozen, moving = host(device, W1.value).copy(), host(device, W2.value).copy()
    for graph in graphs:  # the other graph steps it too: still frozen
        graph.step(xb, yb)
        opt.step()
    np.testing.assert_array_equal(host(device, W1.value), frozen)
    assert not np.allclose(host(device, W2.value), moving)
    W1.trainable = True
    graphs[1].step(xb, yb)
    opt.step()
    assert not np.allclose(host(device, W1.value), frozen)


def test_a_parameter_frozen_before_the_graph_is_built_is_not_data():
    X, y = gf.Input(name="X"), gf.Input(name="y")
    out, params = gf.mlp(X, [3, 4, 1], seed=0)
    params["layer1.W"].trainable = False
    graph = gf.Graph(gf.MSE(y, out), dtype="float64")
    assert graph.inputs == [X, y]
    assert params["layer1.W"] in graph.parameters
    graph.step(np.ones((2, 3)), np.zeros((2, 1)))
    assert params["layer1.W"].gradients.get(params["layer1.W"]) is None


def test_trainable_takes_booleans_only():
    W = gf.Parameter((2, 2), name="W")
    expect(gf.GraphError, lambda: setattr(W, "trainable", "no"),
           "Parameter 'W'.trainable must be True or False")
    assert W.trainable is True


# -- item 16: print(graph) -------------------------------------------------------------------------
def test_print_graph_summarises_device_dtype_nodes_shapes_and_parameters(device):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, params = gf.mlp(X, [3, 5, 2], seed=0)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits, name="loss"), device=device,
                     inputs=[X, y], outputs=[logits])
    text = repr(graph)
    assert text == str(graph)
    first = text.splitlines()[0]
    assert first == f"Graph on {device.name}, float32: 10 nodes, 4 parameters (32 values)", first
    assert any(line.split()[1:] == ["Parameter", "'layer1.W'", "(3,", "5)", "15"]
               for line in text.splitlines()), text
    assert "Linear 'layer1'" in text and "?" in text  # no step yet: shapes unknown
    graph.step(np.ones((7, 3)), np.array([0, 1] * 3 + [0]))
    params["layer2.W"].trainable = False
    text = str(graph)
    for part in ("Linear 'layer1'", "(7, 5)", "Linear 'layer2'", "(7, 2)",
                 "SoftmaxCrossEntropy 'loss'", "(the loss)", "10 (frozen)"):
        assert part in text, (part, text)
    lines = text.splitlines()
    row = {name: next(i for i, line in enumerate(lines) if name in line)
           for name in ("Input 'X'", "Linear 'layer1'", "Linear 'layer2'", "'loss'")}
    assert row["Input 'X'"] < row["Linear 'layer1'"] < row["Linear 'layer2'"] < row["'loss'"]
    assert "object at 0x" not in text


def test_print_graph_lists_nodes_in_the_order_the_model_is_written():
    # Regression (issue 18.23): the rows followed Kahn's sort from the loss, which put
    # layer3's parameters first and layer1's last.
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, params = gf.mlp(X, [3, 5, 4, 2], seed=0)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits, name="loss"), inputs=[X, y])
    rows = [line.split()[1:3] for line in str(graph).splitlines()[2:]]
    labels = [f"{kind} {name}" for kind, name in rows]
    assert [label.split("'")[1] for label in labels if label.startswith("Parameter")] == \
        list(params) == ["layer1.W", "layer1.b", "layer2.W", "layer2.b", "layer3.W", "layer3.b"]
    position = {n.label: labels.index(n.label) for n in graph.nodes}
    assert all(position[m.label] < position[n.label] for n in graph.nodes
               for m in n.inbound_nodes)  # every node after its inputs
    assert labels[:2] == ["Input 'X'", "Input 'y'"] and labels[-1] == "SoftmaxCrossEntropy 'loss'"


def test_print_sorted_graph_summarises_the_miniflow_list(device):
    inputs, weights, bias = gf.Input(name="x"), gf.Input(name="w"), gf.Input(name="b")
    f = gf.Linear(inputs, weights, bias, name="f")
    graph = gf.topological_sort({inputs: [6, 14, 3], weights: [0.5, 0.25, 1.4], bias: 2},
                                device=device)
    gf.forward_pass(f, graph)
    text = str(graph)
    assert text.splitlines()[0].startswith(f"SortedGraph (topological_sort) on {device.name}, "
                                           "float64: 4 nodes"), text
    assert "Input 'x'" in text and "(3,)" in text and "Linear 'f'" in text
    assert isinstance(graph, list) and graph[-1] is f  # still MiniFlow's list


@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_adam_on_float16_parameters_outside_mixed_precision_stays_finite(device, cls):
    """A float16 MiniFlow graph (no float32 masters): Adam's moments and step are float32."""
    rng = np.random.default_rng(4)
    x, w0 = rng.normal(size=(16, 4)), rng.normal(size=(4, 1))
    x[:, 3] = 0.0  # W[3]'s gradient is 0: m = v = 0, and 0 / (sqrt(0) + eps) is NaN if eps is 0
    losses = {}
    for dtype in ("float16", "float32"):
        X, W, b, y = gf.Input(name="X"), gf.Input(name="W"), gf.Input(name="b"), gf.Input()
        cost = gf.MSE(y, gf.Linear(X, W, b))
        try:
            graph = gf.topological_sort({X: x, W: w0, b: np.zeros(1), y: x @ np.ones((4, 1))},
                                        device=device, dtype=dtype)
        except gf.GraphError as exc:  # a device without float16
            pytest.skip(str(exc).splitlines()[0])
        opt = cls([W, b], lr=1e-2)
        losses[dtype] = []
        for _ in range(30):
            gf.forward_and_backward(graph)
            losses[dtype].append(float(gf.to_numpy(cost.value)))
            opt.step()
        assert str(W.value.dtype).endswith(dtype)
        if dtype == "float16":
            assert np.isfinite(gf.to_numpy(W.value).astype(np.float64)).all()
            assert all(str(a.dtype).endswith("float32") for a in opt.state[W].values())
    assert np.isfinite(losses["float16"]).all(), losses["float16"]
    np.testing.assert_allclose(losses["float16"], losses["float32"], rtol=0.02, atol=0.02)
