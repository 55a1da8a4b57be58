"""Conv2D, MaxPool2D, AvgPool2D, Flatten: central differences on every device, PyTorch autograd
as the oracle (float64), and the errors a user gets for bad shapes and options."""

from __future__ import annotations

import numpy as np
import pytest

import gpuflow as gf
from conftest import Project, assert_on_device, central_difference, host

RNG = np.random.default_rng(2024)

# (N, C_in, H, W, C_out, kh, kw, stride, padding): stride 1 and 2, padding 0, 1, 2, non-square
# inputs and kernels, batch 1, one and three channels.
CONV_CASES = {
    "s1-p0-1ch": (1, 1, 5, 4, 2, 3, 2, 1, 0),
    "s2-p1-3ch": (2, 3, 5, 6, 2, 2, 3, 2, 1),
    "s21-p2-3ch": (1, 3, 4, 5, 1, 3, 3, (2, 1), 2),
    "s2-tiles": (2, 1, 6, 4, 2, 2, 2, 2, 0),
}
# (builder, input shape): pools with the default stride (windows tile, the rest cropped),
# overlapping windows, and stride 1.
POOL_CASES = {
    "max-2": (lambda x: gf.MaxPool2D(x, 2), (2, 1, 5, 4)),
    "max-3s2": (lambda x: gf.MaxPool2D(x, 3, stride=2), (1, 3, 5, 6)),
    "max-2x1s1": (lambda x: gf.MaxPool2D(x, (2, 1), stride=1), (1, 1, 3, 4)),
    "avg-2": (lambda x: gf.AvgPool2D(x, 2), (2, 1, 5, 4)),
    "avg-3s2": (lambda x: gf.AvgPool2D(x, 3, stride=2), (1, 3, 5, 6)),
    "avg-2x1s1": (lambda x: gf.AvgPool2D(x, (2, 1), stride=1), (1, 1, 3, 4)),
    "flatten": (gf.Flatten, (2, 3, 2, 2)),
}


def _conv_inputs(case, bias=True):
    n, c, h, w, co, kh, kw, stride, padding = CONV_CASES[case]
    values = [RNG.normal(size=(n, c, h, w)), RNG.normal(size=(co, c, kh, kw))]
    if bias:
        values.append(RNG.normal(size=co))
    return values, dict(stride=stride, padding=padding)


def _output_shape(builder, values):
    """The shape of the node `builder` makes, run once on the CPU over fresh Inputs."""
    inputs = [gf.Input() for _ in values]
    node = builder(*inputs)
    gf.forward_pass(node, gf.topological_sort(dict(zip(inputs, values)), device="cpu"))
    return tuple(node.value.shape)


def _check_gradients(node, inputs, values, loss, graph, device, what):
    gf.forward_and_backward(graph)
    for inp, x0 in zip(inputs, values):
        analytic = host(device, inp.gradients[inp])
        assert analytic.shape == x0.shape, (what, inp.label, analytic.shape, x0.shape)
        numeric = central_difference(inp, x0, lambda: gf.forward_pass(loss, graph), device)
        bad = ~np.isclose(analytic, numeric, rtol=1e-6, atol=1e-8)
        assert not bad.any(), (
            f"{what} on {device.name}: d loss / d {inp.label} (shape {x0.shape}) differs at "
            f"{np.argwhere(bad)[:3].tolist()}: analytic {analytic[bad][:3]}, "
            f"numeric {numeric[bad][:3]}")


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv2d_gradients_match_central_differences(case, device):
    values, options = _conv_inputs(case)
    inputs = [gf.Input(name=n) for n in ("x", "W", "b")]
    node = gf.Conv2D(*inputs, **options)
    R = gf.Input(name="R")
    loss = Project(node, R)
    feed = dict(zip(inputs, values))
    feed[R] = RNG.normal(size=_output_shape(lambda *n: gf.Conv2D(*n, **options), values))
    graph = gf.topological_sort(feed, device=device, dtype="float64")
    _check_gradients(node, inputs, values, loss, graph, device, f"Conv2D {case}")
    for n in graph:
        assert_on_device(device, n.value, f"{n.label}.value")


@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_pool_and_flatten_gradients_match_central_differences(case, device):
    builder, shape = POOL_CASES[case]
    X = gf.Input(name="x")
    x = RNG.normal(size=shape)  # distinct values: no ties, where max has no derivative
    node = builder(X)
    R = gf.Input(name="R")
    loss = Project(node, R)
    graph = gf.topological_sort({X: x, R: RNG.normal(size=_output_shape(builder, [x]))},
                                device=device, dtype="float64")
    _check_gradients(node, [X], [x], loss, graph, device, case)
    assert_on_device(device, X.gradients[X], f"{case} gradient")


# -- PyTorch autograd as the oracle (float64, rel 1e-9) ------------------------------------------
def _close(device, ours, theirs, what):
    ours = host(device, ours)
    theirs = theirs.detach().numpy()
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12, err_msg=what)


def _torch_grads(fn, arrays, R):
    torch = pytest.importorskip("torch")
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    (out * torch.tensor(R)).sum().backward()
    return out, [t.grad for t in tensors]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv2d_matches_torch(case, bias, device):
    torch = pytest.importorskip("torch")
    values, options = _conv_inputs(case, bias)
    inputs = [gf.Input() for _ in values]
    node = gf.Conv2D(*inputs, **options)
    expected = torch.nn.functional.conv2d(*(torch.tensor(v) for v in values), **options)
    R_value = RNG.normal(size=tuple(expected.shape))
    out, grads = _torch_grads(lambda *t: torch.nn.functional.conv2d(*t, **options), values,
                              R_value)
    R = gf.Input()
    Project(node, R)
    feed = dict(zip(inputs, values))
    feed[R] = R_value
    gf.forward_and_backward(gf.topological_sort(feed, device=device, dtype="float64"))
    _close(device, node.value, out, f"Conv2D {case} value")
    for inp, g, name in zip(inputs, grads, ("x", "W", "b")):
        _close(device, inp.gradients[inp], g, f"Conv2D {case} d{name}")


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("size, stride", [(2, None), (3, 2), ((2, 3), (1, 2)), (2, 1),
                                          (3, None), ((2, 3), (2, 3)), ((1, 2), None)])
def test_pooling_matches_torch_ties_included(kind, size, stride, device):
    torch = pytest.importorskip("torch")
    # Small integers: many ties inside windows, where PyTorch sends the gradient to the first.
    x = RNG.integers(0, 3, size=(2, 3, 7, 6)).astype(np.float64)
    X, R = gf.Input(), gf.Input()
    node = (gf.MaxPool2D if kind == "max" else gf.AvgPool2D)(X, size, stride=stride)
    fn = torch.nn.functional.max_pool2d if kind == "max" else torch.nn.functional.avg_pool2d
    step = size if stride is None else stride
    R_value = RNG.normal(size=tuple(fn(torch.tensor(x), size, step).shape))
    out, (dx,) = _torch_grads(lambda t: fn(t, size, step), [x], R_value)
    Project(node, R)
    gf.forward_and_backward(gf.topological_sort({X: x, R: R_value}, device=device,
                                                dtype="float64"))
    _close(device, node.value, out, f"{kind} pool value")
    _close(device, X.gradients[X], dx, f"{kind} pool dx")


def _poison_new_buffers(device, monkeypatch) -> None:
    """Kept buffers start uninitialised: make every new one NaN, so that a node that relies on
    zeros it never wrote shows it."""
    original = type(device).new_buffer

    def poisoned(self, shape, dtype):
        buf = original(self, shape, dtype)
        return self.ops.add(self.xp.full(shape, float("nan"), dtype=dtype, device=self.native),
                            0.0, out=buf) if self.ops.writes_out else buf

    monkeypatch.setattr(type(device), "new_buffer", poisoned)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_tiling_pool_zeroes_the_rows_and_columns_no_window_covers(kind, device, monkeypatch):
    # The gradient's rows and columns past the last window (7 = 3 * 2 + 1, 8 = 3 * 2 + 2) are
    # zeroed, step after step.
    _poison_new_buffers(device, monkeypatch)
    x = RNG.normal(size=(2, 3, 7, 8))
    X, R = gf.Input(), gf.Input()
    node = (gf.MaxPool2D if kind == "max" else gf.AvgPool2D)(X, 3)
    Project(node, R)
    graph = gf.topological_sort({X: x, R: RNG.normal(size=(2, 3, 2, 2))}, device=device,
                                dtype="float64")
    for _ in range(2):
        gf.forward_and_backward(graph)
        dx = gf.to_numpy(X.gradients[X])
        assert np.isfinite(dx).all(), f"{kind} pool: NaN left in the gradient"
        assert not dx[:, :, 6:, :].any() and not dx[:, :, :, 6:].any()


@pytest.mark.parametrize("size, stride", [(2, None), ((3, 2), None), (2, 1)])
def test_max_pool_sends_no_gradient_to_a_number_in_a_window_holding_nan(size, stride, device):
    torch = pytest.importorskip("torch")
    x = RNG.normal(size=(1, 1, 6, 6))
    x[0, 0, 0, 0] = x[0, 0, 1, 3] = np.nan
    step = size if stride is None else stride
    pool = lambda t: torch.nn.functional.max_pool2d(t, size, step)  # noqa: E731
    R_value = np.ones(tuple(pool(torch.tensor(x)).shape))
    ref, (dx_ref,) = _torch_grads(pool, [x], R_value)
    X, R = gf.Input(), gf.Input()
    node = gf.MaxPool2D(X, size, stride=stride)
    Project(node, R)
    gf.forward_and_backward(gf.topological_sort({X: x, R: R_value}, device=device,
                                                dtype="float64"))
    value, dx = gf.to_numpy(node.value), gf.to_numpy(X.gradients[X])
    assert np.isnan(ref.detach().numpy()).any()
    np.testing.assert_array_equal(np.isnan(value), np.isnan(ref.detach().numpy()))
    # A finite entry gets nothing from a window holding NaN (torch sends that gradient to the
    # NaN; gpuflow's portable route sends none), so its gradient is torch's.
    finite = ~np.isnan(x)
    np.testing.assert_allclose(dx[finite], dx_ref.numpy()[finite])


def test_conv2d_padding_is_zero_in_kept_buffers(device, monkeypatch):
    torch = pytest.importorskip("torch")
    _poison_new_buffers(device, monkeypatch)
    x, w = RNG.normal(size=(2, 3, 5, 4)), RNG.normal(size=(4, 3, 3, 2))
    X, Wn = gf.Input(), gf.Input()
    node = gf.Conv2D(X, Wn, stride=(1, 2), padding=(2, 1))
    R_value = RNG.normal(size=(2, 4, 7, 3))
    out, grads = _torch_grads(lambda a, b: torch.nn.functional.conv2d(a, b, None, (1, 2), (2, 1)),
                              [x, w], R_value)
    R = gf.Input()
    Project(node, R)
    graph = gf.topological_sort({X: x, Wn: w, R: R_value}, device=device, dtype="float64")
    for _ in range(2):  # the second step reuses every kept buffer
        gf.forward_and_backward(graph)
        _close(device, node.value, out, "Conv2D value")
        _close(device, X.gradients[X], grads[0], "Conv2D dx")
        _close(device, Wn.gradients[Wn], grads[1], "Conv2D dW")


def test_conv_net_trains_through_miniflow_and_graph(device):
    """A conv-pool-flatten-linear net trains through topological_sort + forward_and_backward +
    sgd_update, and through Graph: the loss falls."""
    x = RNG.normal(size=(6, 1, 6, 6))
    labels = np.array([0, 1, 2, 0, 1, 2])
    for api in ("miniflow", "graph"):
        X, y = gf.Input(name="X"), gf.Input(name="y")
        h, p1 = gf.conv2d(X, 1, 3, 3, padding=1, name="c1", rng=1, activation="relu")
        h = gf.Flatten(gf.MaxPool2D(h, 2))
        logits, p2 = gf.dense(h, 27, 3, name="out", rng=2)
        loss = gf.SoftmaxCrossEntropy(y, logits)
        params = list({**p1, **p2}.values())
        losses = []
        if api == "miniflow":
            graph = gf.topological_sort({X: x, y: labels}, device=device, dtype="float64")
            for _ in range(10):
                gf.forward_and_backward(graph)
                losses.append(float(host(device, loss.value)))
                gf.sgd_update(params, 0.1)
        else:
            graph = gf.Graph(loss, device=device, dtype="float64", inputs=[X, y])
            for _ in range(10):
                losses.append(graph.item(graph.step(x, labels)))
                gf.sgd_update(params, 0.1)
        assert losses[-1] < 0.7 * losses[0], (api, losses)


# -- bad input: a GraphError naming the node, the shapes and the fix -----------------------------
def _run_conv(x, w, **options):
    X, W = gf.Input(name="x"), gf.Input(name="W")
    node = gf.Conv2D(X, W, name="conv", **options)
    gf.forward_pass(node, gf.topological_sort({X: x, W: w}, device="cpu"))


@pytest.mark.parametrize("x_shape, w_shape, options, pattern", [
    ((2, 3, 8, 8), (4, 1, 3, 3), {}, r"Conv2D 'conv': x has shape \(2, 3, 8, 8\) \(3 channels\) "
                                     r"but W has shape \(4, 1, 3, 3\)(.|\n)*help: make "
                                     r"in_channels 3"),
    ((1, 1, 4, 4), (2, 1, 7, 7), {"padding": 1}, r"Conv2D 'conv': kernel 7x7 is larger than "
                                                   r"the padded input 6x6(.|\n)*help:"),
    ((8, 64), (2, 1, 3, 3), {}, r"Conv2D 'conv': x has shape \(8, 64\) \(2-D\); expected 4-D "
                                r"(.|\n)*help: reshape"),
])
def test_conv2d_bad_shapes_are_named(x_shape, w_shape, options, pattern):
    with pytest.raises(gf.GraphError, match=pattern):
        _run_conv(np.zeros(x_shape), np.zeros(w_shape), **options)


@pytest.mark.parametrize("options, pattern", [
    ({"stride": 0}, r"Conv2D 'conv': stride 0 must be an int >= 1(.|\n)*help: pass e.g. "
                    r"stride=1"),
    ({"padding": -1}, r"Conv2D 'conv': padding -1 must be an int >= 0(.|\n)*help:"),
    ({"stride": (1, 2, 3)}, r"stride \(1, 2, 3\) must be"),
    ({"padding": 1.5}, r"padding 1.5 must be an int >= 0"),
])
def test_conv2d_bad_options_are_refused_when_built(options, pattern):
    with pytest.raises(gf.GraphError, match=pattern):
        gf.Conv2D(gf.Input(), gf.Input(), name="conv", **options)


def test_pool_window_larger_than_input_is_named():
    X = gf.Input(name="x")
    node = gf.MaxPool2D(X, 3, name="pool")
    with pytest.raises(gf.GraphError, match=r"MaxPool2D 'pool': window 3x3 is larger than the "
                                            r"input 2x2 \(x \(1, 4, 2, 2\)\)(.|\n)*help:"):
        gf.forward_pass(node, gf.topological_sort({X: np.zeros((1, 4, 2, 2))}, device="cpu"))


def test_conv2d_layer_weights_are_he_and_laid_out_as_torch():
    X = gf.Input()
    _, params = gf.conv2d(X, 3, 8, (5, 3), name="c", rng=0)
    W, b = params["c.W"], params["c.b"]
    assert W.value.shape == (8, 3, 5, 3) and b.value.shape == (8,)
    assert not np.any(b.value)
    std = np.sqrt(2.0 / (3 * 5 * 3))
    assert abs(W.value.std() / std - 1) < 0.2, W.value.std()
    _, again = gf.conv2d(X, 3, 8, (5, 3), name="c", rng=0)
    np.testing.assert_array_equal(again["c.W"].value, W.value)
    _, no_bias = gf.conv2d(X, 3, 8, 3, name="d", bias=False)
    assert list(no_bias) == ["d.W"]


@pytest.mark.parametrize("kh, kw, sh, sw", [(3, 2, 1, 1), (2, 2, 2, 2), (3, 3, 2, 1), (2, 1, 3, 2)])
def test_device_col2im_equals_the_portable_one(kh, kw, sh, sw, device):
    """Where a device adds the columns back in place (ops.col2im), it gives what the portable,
    write-free col2im gives."""
    from gpuflow.nodes.conv import col2im
    if device.ops.col2im is None:
        pytest.skip(f"{device.name} has no ops.col2im: the portable one is all it runs")
    ho, wo = 3, 4
    hp, wp = sh * (ho - 1) + kh + 1, sw * (wo - 1) + kw
    parts_host = [RNG.normal(size=(2, 3, ho, wo)) for _ in range(kh * kw)]
    parts = [device.put(p) for p in parts_host]
    portable = col2im(device.xp, parts, kh, kw, sh, sw, hp, wp, device.native)
    out = device.new_buffer((2, 3, hp, wp), parts[0].dtype)
    fast = device.ops.col2im(parts, kh, kw, sh, sw, out=out)
    np.testing.assert_allclose(host(device, fast), host(device, portable), rtol=1e-15,
                               atol=1e-15)


def _cnn_run(device, steps=3):
    """Every image and normalisation node in one net (conv with stride and padding, both
    poolings, BatchNorm, Dropout, LayerNorm, Softmax, a weighted Add of two losses), trained
    a few steps with Adam, then evaluated: losses, weights, evaluation outputs."""
    from gpuflow.optim import Adam
    rng = np.random.default_rng(5)
    x, labels = rng.normal(size=(4, 2, 7, 6)), rng.integers(0, 3, 4)
    X, y, t = gf.Input(name="X"), gf.Input(name="y"), gf.Input(name="t")
    # No conv bias before BatchNorm: its gradient is zero up to rounding, which Adam would
    # turn into steps of rounding noise.
    h, p1 = gf.conv2d(X, 2, 3, (3, 2), stride=(2, 1), padding=1, name="c1", rng=1, bias=False)
    h, p2 = gf.batchnorm(h, 3, name="bn")
    h = gf.MaxPool2D(gf.ReLU(h), 2, stride=1)
    h = gf.AvgPool2D(h, (2, 1))
    h = gf.Dropout(gf.Flatten(h), 0.3, seed=4)
    h, p3 = gf.layernorm(h, 18, name="ln")
    logits, p4 = gf.dense(h, 18, 3, name="out", rng=2)
    loss = gf.Add(gf.SoftmaxCrossEntropy(y, logits), gf.MSE(t, gf.Softmax(logits)),
                  weights=(1.0, 0.5))
    graph = gf.Graph(loss, device=device, dtype="float64", inputs=[X, y, t], outputs=[logits])
    opt = Adam(graph, lr=1e-2)
    target = np.eye(3)[labels]
    losses = []
    for _ in range(steps):
        losses.append(graph.item(graph.step(x, labels, target)))
        opt.step()
    evaluation = device.to_host(graph.run(logits, x))
    return losses, [device.to_host(p.value) for p in graph.parameters], evaluation


def test_cnn_on_immutable_arrays_matches_the_cpu():
    """On a device whose arrays cannot change (JAX's semantics: tests/test_immutable.py), the
    portable routes train a CNN to the CPU's numbers: nothing relies on writing in place."""
    from test_immutable import FROZEN
    losses, weights, evaluation = _cnn_run(FROZEN)
    want_losses, want_weights, want_evaluation = _cnn_run(gf.get_device("cpu"))
    np.testing.assert_allclose(losses, want_losses, rtol=1e-12)
    assert losses[-1] < losses[0]
    for got, want in zip(weights, want_weights):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(evaluation, want_evaluation, rtol=1e-10, atol=1e-12)
