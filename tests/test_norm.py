"""Dropout, BatchNorm, LayerNorm, Softmax, Add and training/evaluation mode: central differences
on every device, PyTorch as the oracle (float64), Dropout's statistics, running statistics and
their state, and strict transfer mode for a CNN step with dropout."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gpuflow as gf
from conftest import Project, assert_on_device, central_difference, host
from gpuflow.optim import SGD

RNG = np.random.default_rng(77)


def _gradient_check(build, values, device, *, training=True, before=lambda: None):
    """Central differences for every input of `build(*inputs)` under a random projection, the
    loss computed in `training` mode; `before()` runs ahead of every forward pass."""
    inputs = [gf.Input(name=f"x{i}") for i in range(len(values))]
    node = build(*inputs)
    probe = [gf.Input() for _ in values]
    shape_node = build(*probe)
    graph0 = gf.topological_sort(dict(zip(probe, values)), device="cpu")
    gf.forward_pass(shape_node, graph0, training=training)
    R = gf.Input(name="R")
    loss = Project(node, R)
    feed = dict(zip(inputs, values))
    feed[R] = RNG.normal(size=tuple(shape_node.value.shape))
    graph = gf.topological_sort(feed, device=device, dtype="float64")
    before()
    gf.forward_and_backward(graph, training=training)

    def f():
        before()
        return gf.forward_pass(loss, graph, training=training)

    for inp, x0 in zip(inputs, values):
        analytic = host(device, inp.gradients[inp])
        assert_on_device(device, inp.gradients[inp], f"gradient for {inp.label}")
        numeric = central_difference(inp, x0, f, device)
        bad = ~np.isclose(analytic, numeric, rtol=1e-6, atol=1e-8)
        assert not bad.any(), (
            f"{type(node).__name__} on {device.name}: d loss / d {inp.label} differs at "
            f"{np.argwhere(bad)[:3].tolist()}: analytic {analytic[bad][:3]}, "
            f"numeric {numeric[bad][:3]}")
    return node


@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 3, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_gradients(shape, training, device):
    c = shape[1]
    values = [RNG.normal(size=shape), RNG.normal(size=c), RNG.normal(size=c)]

    def build(x, g, b):
        node = gf.BatchNorm(x, g, b)
        node.load_state_dict({"running_mean": RNG.normal(size=c),
                              "running_var": RNG.uniform(0.5, 2.0, size=c)})
        return node
    _gradient_check(build, values, device, training=training)


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4)])
def test_layernorm_gradients(shape, device):
    d = shape[-1]
    _gradient_check(lambda x, g, b: gf.LayerNorm(x, g, b),
                    [RNG.normal(size=shape), RNG.normal(size=d), RNG.normal(size=d)], device)


def test_softmax_gradients(device):
    _gradient_check(gf.Softmax, [RNG.normal(scale=2.0, size=(3, 5))], device)


def test_dropout_gradients_with_the_mask_held(device):
    holder = {}

    def build(x):
        node = gf.Dropout(x, 0.4, seed=3)
        holder.setdefault("node", node)
        return node

    def same_mask():  # back to the first step's mask for every pass
        holder["node"].load_state_dict({"steps": 0})
    node = _gradient_check(build, [RNG.normal(size=(4, 6))], device, before=same_mask)
    assert node.mask is not None


def test_add_of_weighted_losses_trains_both(device):
    X, y, t = gf.Input(name="X"), gf.Input(name="y"), gf.Input(name="t")
    logits, params = gf.mlp(X, [4, 3], seed=0)
    l1 = gf.SoftmaxCrossEntropy(y, logits)
    l2 = gf.MSE(t, logits)
    total = gf.Add(l1, l2, weights=(1.0, 0.1))
    assert total.is_loss and not gf.Add(logits, logits).is_loss
    x, labels, target = RNG.normal(size=(5, 4)), np.array([0, 1, 2, 1, 0]), RNG.normal(size=(5, 3))
    graph = gf.Graph(total, device=device, dtype="float64", inputs=[X, y, t])
    value = graph.item(graph.step(x, labels, target))
    expected = graph.item(l1.value) + 0.1 * graph.item(l2.value)
    assert math.isclose(value, expected, rel_tol=1e-12)
    W = params["layer1.W"]
    both = host(device, W.gradients[W]).copy()
    for loss, weight in ((l1, 1.0), (l2, 0.1)):  # each alone, through its own graph
        alone = gf.Graph(loss, device=device, dtype="float64", inputs=[n for n in (X, y, t)
                                                                         if n in _under(loss)])
        alone.step(*[v for n, v in ((X, x), (y, labels), (t, target)) if n in _under(loss)])
        both -= weight * host(device, W.gradients[W])
    np.testing.assert_allclose(both, 0.0, atol=1e-12)
    # The MiniFlow surface: Add is the loss the gradient starts from.
    graph = gf.topological_sort({X: x, y: labels, t: target}, device=device, dtype="float64")
    gf.forward_and_backward(graph)
    assert float(host(device, total.value)) == pytest.approx(expected, rel=1e-12)


def _under(node):
    from gpuflow.graph import reachable
    return set(reachable([node], "inbound_nodes"))


def test_add_refuses_mismatched_shapes_and_weights():
    with pytest.raises(gf.GraphError, match=r"weights \(1.0,\) must be 2 numbers"):
        gf.Add(gf.Input(), gf.Input(), weights=(1.0,))
    a, b = gf.Input(name="a"), gf.Input(name="b")
    node = gf.Add(a, b, name="sum")
    with pytest.raises(gf.GraphError, match=r"Add 'sum': the inputs differ in shape \(Input 'a' "
                                            r"\(2, 3\), Input 'b' \(3,\)\)(.|\n)*help:"):
        gf.forward_pass(node, gf.topological_sort({a: np.ones((2, 3)), b: np.ones(3)}))


# -- PyTorch as the oracle ----------------------------------------------------------------------
def _torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5, 2)])
def test_batchnorm_matches_torch_over_five_steps_then_in_evaluation(shape, device):
    torch = _torch()
    c = shape[1]
    module = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(
        c, momentum=0.2, eps=1e-4, dtype=torch.float64)
    gamma, beta = RNG.normal(size=c), RNG.normal(size=c)
    with torch.no_grad():
        module.weight.copy_(torch.tensor(gamma))
        module.bias.copy_(torch.tensor(beta))
    X, G, B, R = gf.Input(), gf.Input(), gf.Input(), gf.Input()
    node = gf.BatchNorm(X, G, B, momentum=0.2, eps=1e-4)
    Project(node, R)
    graph = gf.topological_sort({X: RNG.normal(size=shape), G: gamma, B: beta,
                                 R: RNG.normal(size=shape)}, device=device, dtype="float64")
    for step in range(6):
        training = step < 5
        module.train(training)
        x, r = RNG.normal(loc=2.0, scale=3.0, size=shape), RNG.normal(size=shape)
        X.value, R.value = x, r
        tx = torch.tensor(x, requires_grad=True)
        module.zero_grad()
        out = module(tx)
        (out * torch.tensor(r)).sum().backward()
        gf.forward_and_backward(graph, training=training)
        what = f"step {step} ({'training' if training else 'evaluation'})"
        np.testing.assert_allclose(host(device, node.value), out.detach().numpy(), rtol=1e-9,
                                   atol=1e-12, err_msg=f"value, {what}")
        for ours, theirs, name in ((X.gradients[X], tx.grad, "dx"),
                                   (G.gradients[G], module.weight.grad, "dgamma"),
                                   (B.gradients[B], module.bias.grad, "dbeta")):
            np.testing.assert_allclose(host(device, ours), theirs.numpy(), rtol=1e-9,
                                       atol=1e-12, err_msg=f"{name}, {what}")
        state = node.state_dict()
        np.testing.assert_allclose(host(device, state["running_mean"]),
                                   module.running_mean.numpy(), rtol=1e-12, err_msg=what)
        np.testing.assert_allclose(host(device, state["running_var"]),
                                   module.running_var.numpy(), rtol=1e-12, err_msg=what)


def test_layernorm_and_softmax_match_torch(device):
    torch = _torch()
    x, gamma, beta = RNG.normal(size=(3, 4, 6)), RNG.normal(size=6), RNG.normal(size=6)
    r = RNG.normal(size=x.shape)
    for kind in ("layernorm", "softmax"):
        tensors = [torch.tensor(v, requires_grad=True) for v in (x, gamma, beta)]
        if kind == "layernorm":
            out = torch.nn.functional.layer_norm(tensors[0], (6,), tensors[1], tensors[2],
                                                 eps=1e-5)
        else:
            out = torch.softmax(tensors[0], dim=-1)
        (out * torch.tensor(r)).sum().backward()
        X, G, B, R = gf.Input(), gf.Input(), gf.Input(), gf.Input()
        node = gf.LayerNorm(X, G, B) if kind == "layernorm" else gf.Softmax(X)
        Project(node, R)
        feed = {X: x, R: r, **({G: gamma, B: beta} if kind == "layernorm" else {})}
        gf.forward_and_backward(gf.topological_sort(feed, device=device, dtype="float64"))
        np.testing.assert_allclose(host(device, node.value), out.detach().numpy(), rtol=1e-9,
                                   atol=1e-12, err_msg=kind)
        pairs = [(X, tensors[0])] + ([(G, tensors[1]), (B, tensors[2])]
                                     if kind == "layernorm" else [])
        for inp, t in pairs:
            np.testing.assert_allclose(host(device, inp.gradients[inp]), t.grad.numpy(),
                                       rtol=1e-9, atol=1e-12, err_msg=f"{kind} {inp.label}")


# -- Dropout -------------------------------------------------------------------------------------
def _dropout_graph(device, p, seed, shape=(200, 50)):
    X = gf.Input(name="X")
    node = gf.Dropout(X, p, seed=seed, name="drop")
    graph = gf.topological_sort({X: np.ones(shape)}, device=device, dtype="float64")
    return X, node, graph


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_keep_rate_scaling_and_evaluation(p, device):
    X, node, graph = _dropout_graph(device, p, seed=5)
    gf.forward_and_backward(graph)
    out = host(device, node.value)
    kept = out != 0
    n = out.size
    # The kept count is Binomial(n, 1 - p): within 5 standard deviations.
    sd = math.sqrt(n * p * (1 - p))
    assert abs(kept.sum() - n * (1 - p)) < 5 * sd, (kept.sum(), n * (1 - p), sd)
    np.testing.assert_allclose(out[kept], 1.0 / (1.0 - p), rtol=1e-15)
    assert_on_device(device, node.value, "dropout value")
    # Evaluation: the identity.
    ev = host(device, gf.forward_pass(node, graph))
    np.testing.assert_array_equal(ev, np.ones(ev.shape))


def test_dropout_same_seed_same_masks_and_new_masks_each_step(device):
    masks = {}
    for run in ("a", "b"):
        X, node, graph = _dropout_graph(device, 0.5, seed=11, shape=(6, 7))
        steps = []
        for _ in range(3):
            gf.forward_and_backward(graph)
            steps.append(host(device, node.value).copy())
        masks[run] = steps
    for a, b in zip(masks["a"], masks["b"]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(masks["a"][0], masks["a"][1]), "the mask must change per step"
    X, other, graph = _dropout_graph(device, 0.5, seed=12, shape=(6, 7))
    gf.forward_and_backward(graph)
    assert not np.array_equal(host(device, other.value), masks["a"][0])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dropout_trains_in_float16_and_bfloat16_with_a_float32_graphs_masks(dtype, device):
    # Regression (issue 18.1): on 'cpu' a float16 Dropout asked NumPy's generator for float16
    # numbers and died with "Unsupported dtype float16 for random" in forward().
    masks = {}
    for graph_dtype in (dtype, "float32"):
        X, y = gf.Input(name="X"), gf.Input(name="y")
        logits, _ = gf.mlp(X, [5, 6, 3], seed=0)
        node = gf.Dropout(logits, 0.25, seed=4, name="drop")
        loss = gf.SoftmaxCrossEntropy(y, node, name="loss")
        try:
            graph = gf.Graph(loss, device=device, dtype=graph_dtype, inputs=[X, y])
        except gf.GraphError as exc:
            if f"has no {dtype}" in str(exc):
                pytest.skip(f"{device.name}: {str(exc).splitlines()[0]}")
            raise
        opt = SGD(graph, lr=0.1)
        loss_value = graph.item(graph.step(RNG.normal(size=(40, 5)), np.arange(40) % 3))
        opt.step()
        assert math.isfinite(loss_value)
        assert node.mask.dtype == graph.dtype and node.value.dtype == graph.dtype
        assert_on_device(device, node.mask, "mask")
        masks[graph_dtype] = host(device, node.mask).astype(np.float64)
    low, wide = masks[dtype], masks["float32"]
    np.testing.assert_array_equal(low != 0, wide != 0)  # the same entries dropped
    np.testing.assert_allclose(low, wide, rtol=1e-2)   # kept ones scaled by 1 / (1 - p)
    assert 0 < (low == 0).sum() < low.size


def test_dropout_refuses_p_outside_0_1():
    for p in (-0.1, 1.0, "0.5"):
        with pytest.raises(gf.GraphError, match=r"p=.* must be a number in \[0, 1\)"):
            gf.Dropout(gf.Input(), p)


# -- training and evaluation mode ----------------------------------------------------------------
def test_graph_sets_training_mode_and_run_evaluation(device):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    h, p1 = gf.dense(X, 4, 8, name="h", rng=0, activation="relu")
    h = gf.Dropout(h, 0.5, seed=0)
    logits, p2 = gf.dense(h, 8, 3, name="out", rng=1)
    loss = gf.SoftmaxCrossEntropy(y, logits)
    graph = gf.Graph(loss, device=device, dtype="float64", inputs=[X, y], outputs=[logits])
    x, labels = RNG.normal(size=(5, 4)), np.array([0, 1, 2, 1, 0])
    graph.step(x, labels)
    assert all(n.training for n in graph.nodes)
    first = host(device, graph.run(logits, x))
    assert not any(n.training for n in graph.nodes)
    np.testing.assert_array_equal(first, host(device, graph.run(logits, x)))  # no dropout
    noisy = host(device, graph.run(logits, x, training=True))
    assert not np.array_equal(noisy, first)
    graph.step(x, labels, training=False)
    assert not any(n.training for n in graph.nodes)
    graph.step(x, labels)
    assert all(n.training for n in graph.nodes)


def test_miniflow_functions_set_the_mode(device):
    X = gf.Input()
    node = gf.Dropout(X, 0.5)
    graph = gf.topological_sort({X: np.ones((4, 4))}, device=device, dtype="float64")
    gf.forward_and_backward(graph)
    assert node.training
    gf.forward_pass(node, graph)
    assert not node.training
    gf.forward_pass(node, list(graph), training=True)  # a plain list of nodes too
    assert node.training


# -- BatchNorm's state ---------------------------------------------------------------------------
def test_batchnorm_state_round_trip_and_refusal(device):
    X = gf.Input(name="X")
    node, params = gf.batchnorm(X, 3, name="bn")
    before = node.state_dict()
    np.testing.assert_array_equal(before["running_mean"], np.zeros(3))
    np.testing.assert_array_equal(before["running_var"], np.ones(3))
    graph = gf.Graph(node, device=device, dtype="float64", inputs=[X])
    graph.run(node, RNG.normal(size=(4, 3)), training=True)
    state = {k: host(device, v) for k, v in node.state_dict().items()}
    assert not np.array_equal(state["running_mean"], np.zeros(3))
    X2 = gf.Input(name="X")
    other, _ = gf.batchnorm(X2, 3, name="bn2")
    other.load_state_dict(state)
    g2 = gf.Graph(other, device=device, dtype="float64", inputs=[X2])
    x = RNG.normal(size=(2, 3))
    np.testing.assert_array_equal(host(device, g2.run(other, x)), host(device, graph.run(node, x)))
    with pytest.raises(gf.GraphError, match=r"BatchNorm 'bn2': state .* does not match(.|\n)*"
                                            r"help:"):
        other.load_state_dict({"running_mean": np.zeros(4), "running_var": np.ones(4)})
    np.testing.assert_array_equal(host(device, other.state_dict()["running_mean"]),
                                  state["running_mean"])  # nothing changed


def test_batchnorm_refuses_a_single_value_per_channel_in_training():
    X = gf.Input()
    node, _ = gf.batchnorm(X, 2, name="bn")
    graph = gf.topological_sort({X: np.ones((1, 2))}, dtype="float64")
    with pytest.raises(gf.GraphError, match=r"BatchNorm 'bn': x has shape \(1, 2\), one value "
                                            r"per channel"):
        gf.forward_and_backward(graph)
    gf.forward_pass(node, graph)  # evaluation takes one example


# -- a CNN step: strict transfer mode ------------------------------------------------------------
def _small_cnn(dropout_seed=0):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    h, p1 = gf.conv2d(X, 1, 4, 3, padding=1, name="c1", rng=0)
    h, p2 = gf.batchnorm(h, 4, name="bn1")
    h = gf.MaxPool2D(gf.ReLU(h), 2)
    h = gf.Dropout(gf.Flatten(h), 0.3, seed=dropout_seed)
    logits, p3 = gf.dense(h, 4 * 4 * 4, 3, name="out", rng=1)
    return X, y, logits, gf.SoftmaxCrossEntropy(y, logits), {**p1, **p2, **p3}


def test_strict_mode_holds_for_a_cnn_step_with_dropout_and_batchnorm(device):
    X, y, logits, loss, params = _small_cnn()
    graph = gf.Graph(loss, device=device, dtype="float32", inputs=[X, y], outputs=[logits],
                     strict=True)
    opt = SGD(graph, 0.05)
    x = RNG.normal(size=(8, 1, 8, 8))
    labels = RNG.integers(0, 3, size=8)
    for _ in range(6):  # the first step is warm-up; every later one runs under strict mode
        graph.item(graph.step(x, labels))
        opt.step()
    trained = graph.item(graph.run(None, x, labels))  # evaluation mode: no dropout noise
    for _ in range(6):
        graph.item(graph.step(x, labels))
        opt.step()
    assert graph.item(graph.run(None, x, labels)) < trained


def test_device_rng_is_seeded_uniform_on_the_device(device):
    dtype = device.dtype("float64")
    a = device.rng(7).uniform((300, 4), dtype)
    assert_on_device(device, a, "rng.uniform")
    assert a.dtype == dtype
    host_a = host(device, a)
    assert 0.0 <= host_a.min() and host_a.max() < 1.0
    assert abs(host_a.mean() - 0.5) < 5 * math.sqrt(1 / 12 / host_a.size)
    np.testing.assert_array_equal(host_a, host(device, device.rng(7).uniform((300, 4), dtype)))
    assert not np.array_equal(host_a, host(device, device.rng(8).uniform((300, 4), dtype)))
    f32 = device.rng(7).uniform((5,), device.dtype("float32"))
    assert f32.dtype == device.dtype("float32")
    for name in ("float16", "bfloat16"):  # regression (issue 18.1): NumPy draws neither
        try:
            low = device.dtype(name)
        except gf.GraphError:
            continue  # the device has no such dtype
        u = device.rng(7).uniform((20000,), low)
        assert_on_device(device, u, f"{name} rng.uniform")
        assert u.dtype == low
        host_u = host(device, device.xp.astype(u, device.dtype("float32")))
        assert 0.0 <= host_u.min() and host_u.max() < 1.0 and abs(host_u.mean() - 0.5) < 0.02
    if device.backend == "array_api_strict":  # NumPy's stream, as documented
        cpu = gf.get_device("cpu")
        np.testing.assert_array_equal(host_a, cpu.rng(7).uniform((300, 4), cpu.dtype("float64")))


@pytest.mark.parametrize("make", [
    lambda x, g, b: gf.BatchNorm(x, g, b, momentum="0.1"),
    lambda x, g, b: gf.BatchNorm(x, g, b, eps=None),
    lambda x, g, b: gf.LayerNorm(x, g, b, eps="1e-5"),
], ids=["batchnorm-momentum", "batchnorm-eps", "layernorm-eps"])
def test_normalisation_options_that_are_not_numbers_are_graph_errors(make):
    # Regression: a string or None escaped as a bare TypeError from the comparison.
    with pytest.raises(gf.GraphError, match="help:"):
        make(gf.Input(), gf.Input(), gf.Input())


# -- mixed precision: statistics in float32 ------------------------------------------------------
def _norm_classifier(device, dtype, norm):
    """X (16, 3) -> norm -> Linear -> softmax cross-entropy, in a `dtype` graph."""
    X, y = gf.Input(name="X"), gf.Input(name="y")
    node, _ = norm(X, 3, name="norm")
    logits, _ = gf.mlp(node, [3, 4], seed=0)
    loss = gf.SoftmaxCrossEntropy(y, logits, name="loss")
    try:
        graph = gf.Graph(loss, device=device, dtype=dtype, inputs=[X, y], outputs=[node])
    except gf.GraphError as exc:
        if "has no float16" in str(exc):
            pytest.skip(f"{device.name}: {str(exc).splitlines()[0]}")
        raise
    return graph, node


@pytest.mark.parametrize("norm", [gf.batchnorm, gf.layernorm])
def test_float16_normalisation_of_large_activations_is_finite_with_float32_statistics(
        norm, device):
    """Activations ~600: their variance (~360000) overflows float16 (65504). The statistics are
    computed (and BatchNorm's running ones kept) in float32, as torch's autocast does."""
    rng = np.random.default_rng(5)
    # rounded to float16 first, so both graphs see the same numbers
    batches = [((rng.normal(size=(16, 3)) * 600 + 100).astype(np.float16).astype(np.float64),
                rng.integers(0, 4, size=16)) for _ in range(5)]
    axis = 0 if norm is gf.batchnorm else -1  # what the statistics reduce over
    assert np.median([np.var(xb, axis=axis) for xb, _ in batches]) > 65504  # float16 overflows
    results = {}
    for dtype in ("float16", "float32"):
        graph, node = _norm_classifier(device, dtype, norm)
        opt = SGD(graph, lr=0.1)
        losses = []
        for xb, yb in batches:
            losses.append(graph.item(graph.step(xb, yb)))
            opt.step()
        assert np.isfinite(losses).all(), f"{dtype} losses {losses}"
        value = graph.run(node, batches[0][0])
        assert value.dtype == graph.dtype  # the graph's dtype check still holds
        state = {k: v for k, v in node.state_dict().items()} if norm is gf.batchnorm else {}
        for v in state.values():
            assert_on_device(device, v, "running statistic")
            assert host(device, v).dtype == np.float32
        results[dtype] = (host(device, value).astype(np.float64),
                          {k: host(device, v) for k, v in state.items()}, losses)
    (value16, state16, losses16), (value32, state32, losses32) = results.values()
    assert np.isfinite(value16).all() and np.abs(value16).max() > 0.5  # not just the bias
    np.testing.assert_allclose(value16, value32, atol=0.02)
    np.testing.assert_allclose(losses16, losses32, rtol=0.02)
    for key in state32:
        assert np.isfinite(state16[key]).all()
        np.testing.assert_allclose(state16[key], state32[key], rtol=1e-5)
    if state16:  # loaded (as checkpoints do) into a float16 graph: kept in float32, exactly
        graph, node = _norm_classifier(device, "float16", norm)
        node.load_state_dict(state16)
        x = batches[0][0]  # gamma 1 and beta 0 in this new graph
        value = host(device, graph.run(node, x)).astype(np.float64)
        expected = (x - state16["running_mean"]) / np.sqrt(state16["running_var"] + 1e-5)
        np.testing.assert_allclose(value, expected, atol=0.01)
        for key, v in node.state_dict().items():
            np.testing.assert_array_equal(host(device, v), state16[key])


def test_layernorm_lets_go_of_its_fused_arrays_when_the_graph_moves(device):
    """Regression: LayerNorm keeps (x, mean, rstd) for the backward of a device's fused
    kernel (torch's native_layer_norm); a graph moved to another device left them behind,
    holding activation-sized arrays of the old device."""
    if device.ops.layer_norm is None:
        pytest.skip(f"{device.name}: no fused LayerNorm route")
    x, y = gf.Input(name="x"), gf.Input(name="y")
    gamma = gf.Parameter(np.ones(6), name="gamma")
    beta = gf.Parameter(np.zeros(6), name="beta")
    norm = gf.LayerNorm(x, gamma, beta)
    graph = gf.Graph(gf.MSE(y, norm), device=device, inputs=[x, y])
    rng = np.random.default_rng(0)
    graph.step(rng.normal(size=(4, 6)), rng.normal(size=(4, 6)))
    assert norm._fused is not None
    graph.move_to("cpu")
    assert norm._fused is None
