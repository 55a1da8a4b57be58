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
