"""Parameters and layers: seeded initialisers, bit-identical on every device; the MLP builder."""

from __future__ import annotations

import numpy as np
import pytest

import gpuflow as gf
from gpuflow.layers import INITIALIZERS


def _initial_weights(device, dtype, seed=3):
    X = gf.Input(name="X")
    logits, params = gf.mlp(X, [20, 30, 10], seed=seed)
    gf.Graph(logits, device=device, dtype=dtype, inputs=[X])
    return {k: device.to_host(p.value) for k, p in params.items()}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_seed_gives_bit_identical_weights_on_every_device(device, dtype):
    here = _initial_weights(device, dtype)
    cpu = _initial_weights(gf.get_device("cpu"), dtype)
    assert list(here) == ["layer1.W", "layer1.b", "layer2.W", "layer2.b"]
    for k in cpu:
        assert here[k].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(here[k], cpu[k], err_msg=k)
    other = _initial_weights(gf.get_device("cpu"), dtype, seed=4)
    assert not np.array_equal(other["layer1.W"], cpu["layer1.W"])


@pytest.mark.parametrize("init, check", [
    ("zeros", lambda w, fan_in, fan_out: np.all(w == 0)),
    ("normal", lambda w, fan_in, fan_out: abs(w.std() - 0.01) < 0.001),
    ("xavier", lambda w, fan_in, fan_out: np.abs(w).max() <= np.sqrt(6 / (fan_in + fan_out))
     and abs(w.std() - np.sqrt(2 / (fan_in + fan_out))) < 0.003),
    ("he", lambda w, fan_in, fan_out: abs(w.std() - np.sqrt(2 / fan_in)) < 0.003),
])
def test_initialisers_draw_the_documented_distribution(init, check):
    p = gf.Parameter((400, 300), init, name=f"w_{init}", rng=0)
    assert check(p.value, 400, 300), f"{init}: std {p.value.std()}, max {np.abs(p.value).max()}"
    assert set(INITIALIZERS) >= {"zeros", "normal", "xavier", "glorot", "he", "kaiming"}


def test_parameters_built_apart_do_not_start_identical():
    a = gf.Parameter((5, 5), name="encoder.W")
    b = gf.Parameter((5, 5), name="decoder.W")
    again = gf.Parameter((5, 5), name="encoder.W")
    assert not np.array_equal(a.value, b.value)
    np.testing.assert_array_equal(a.value, again.value)


def test_mlp_and_dense_build_named_layers():
    X = gf.Input(name="X")
    out, params = gf.mlp(X, [4, 8, 8, 2], activation="tanh", seed=0)
    assert isinstance(out, gf.Linear) and out.name == "layer3"
    assert [p.value.shape for p in params.values()] == [(4, 8), (8,), (8, 8), (8,), (8, 2), (2,)]
    hidden, p = gf.dense(X, 4, 3, name="h", activation="relu")
    assert isinstance(hidden, gf.ReLU) and set(p) == {"h.W", "h.b"}
    with pytest.raises(gf.GraphError, match="unknown activation 'swish'"):
        gf.dense(X, 4, 3, name="bad", activation="swish")
    with pytest.raises(gf.GraphError, match="sizes"):
        gf.mlp(X, [4])
    with pytest.raises(gf.GraphError, match="unknown initialiser 'orthogonal'"):
        gf.Parameter((2, 2), "orthogonal", name="o")


# -- the sequence layers: torch's parameter names, layouts, initialisation and numbers --------
def _torch_module(kind, *sizes):
    torch = pytest.importorskip("torch")
    if kind == "attention":
        return torch.nn.MultiheadAttention(*sizes, batch_first=True, dtype=torch.float64)
    if kind == "lstm":
        return torch.nn.LSTM(*sizes, batch_first=True, dtype=torch.float64)
    return torch.nn.Embedding(*sizes, dtype=torch.float64)


@pytest.mark.parametrize("kind, sizes, bounds", [
    ("embedding", (7, 5), None),
    ("lstm", (3, 4), {"weight_ih_l0": 0.5, "weight_hh_l0": 0.5, "bias_ih_l0": 0.5,
                      "bias_hh_l0": 0.5}),
    ("attention", (6, 3), {"in_proj_weight": np.sqrt(6 / 24), "in_proj_bias": 0.0,
                           "out_proj.weight": 1 / np.sqrt(6), "out_proj.bias": 0.0}),
])
def test_sequence_layers_have_torchs_names_shapes_and_initialisation(kind, sizes, bounds):
    X = gf.Input(name="x")
    build = {"embedding": gf.embedding, "lstm": gf.lstm, "attention": gf.attention}[kind]
    node, params = build(X, *sizes, name="m", rng=0)
    module = _torch_module(kind, *sizes)
    assert {k: tuple(p.value.shape) for k, p in params.items()} == {
        f"m.{k}": tuple(v.shape) for k, v in module.state_dict().items()}
    again = build(gf.Input(), *sizes, name="m", rng=0)[1]
    other = build(gf.Input(), *sizes, name="m", rng=1)[1]
    for k, p in params.items():
        np.testing.assert_array_equal(again[k].value, p.value, err_msg=k)
    if bounds is None:  # torch.nn.Embedding: N(0, 1)
        w = params["m.weight"].value
        assert abs(w.mean()) < 0.5 and 0.6 < w.std() < 1.4, (w.mean(), w.std())
        assert not np.array_equal(other["m.weight"].value, w)
        return
    for key, bound in bounds.items():
        w = params[f"m.{key}"].value
        assert np.abs(w).max() <= bound, (key, np.abs(w).max(), bound)
        assert (bound == 0.0) == (not w.any()), key  # zeros exactly where torch's are
        if bound:
            assert np.abs(w).max() > 0.6 * bound, key
            assert not np.array_equal(other[f"m.{key}"].value, w), key


def _layer_against_torch(device, kind, sizes, x, **options):
    """gpuflow's layer and the equal torch module from the same weights: forward and the
    gradients of sum(output * R) for x and every parameter, float64."""
    torch = pytest.importorskip("torch")
    from conftest import Project, host
    X, R = gf.Input(name="x"), gf.Input(name="R")
    build = {"lstm": gf.lstm, "attention": gf.attention}[kind]
    node, params = build(X, *sizes, name="m", rng=5, **options)
    up = np.random.default_rng(1).normal(size=x.shape[:2] + (sizes[-1] if kind == "lstm"
                                                               else sizes[0],))
    module = _torch_module(kind, *sizes)
    module.load_state_dict({k[2:]: torch.tensor(p.value) for k, p in params.items()})
    xt = torch.tensor(x, requires_grad=True)
    if kind == "attention":
        T = x.shape[1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1) if options["causal"] else None
        out = module(xt, xt, xt, attn_mask=mask, need_weights=False)[0]
    else:
        out = module(xt)[0]
    (out * torch.tensor(up)).sum().backward()
    Project(node, R)
    graph = gf.topological_sort({X: x, R: up}, device=device, dtype="float64")
    gf.forward_and_backward(graph)
    np.testing.assert_allclose(host(device, node.value), out.detach().numpy(), rtol=1e-9,
                               atol=1e-12, err_msg=f"{kind} forward on {device.name}")
    grads = {f"m.{k}": v.grad.numpy() for k, v in module.named_parameters()}
    grads["x"] = xt.grad.numpy()
    for inp in [X, *params.values()]:
        name = inp.name
        np.testing.assert_allclose(host(device, inp.gradients[inp]), grads[name], rtol=1e-9,
                                   atol=1e-12, err_msg=f"{kind}: d/d {name} on {device.name}")


@pytest.mark.parametrize("causal", [True, False])
def test_attention_equals_torch_multihead_attention(device, causal):
    x = np.random.default_rng(0).normal(size=(2, 4, 6))
    _layer_against_torch(device, "attention", (6, 3), x, causal=causal)


def test_lstm_layer_equals_torch_lstm(device):
    x = np.random.default_rng(0).normal(size=(2, 3, 3))
    _layer_against_torch(device, "lstm", (3, 4), x)


def test_attention_head_count_that_does_not_divide_the_width():
    X = gf.Input(name="x")
    with pytest.raises(gf.GraphError) as info:
        gf.attention(X, 10, 3, name="attn")
    msg = str(info.value)
    for part in ("attention 'attn'", "3 heads do not divide the width dim=10",
                 "help: use a head count that divides 10 (1, 2, 5, 10)", "multiple of 3"):
        assert part in msg, msg
    assert X.outbound_nodes == [], "a refused layer left nodes attached to its input"
    for bad in (0, 2.0):
        with pytest.raises(gf.GraphError, match="heads must be an integer >= 1"):
            gf.attention(X, 10, bad, name="attn")
