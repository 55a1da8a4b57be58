"""Optimizers: the same updates as torch.optim on the same gradients (float64, several steps),
state on the graph's device, updated in place."""

from __future__ import annotations

import numpy as np
import pytest

import gpuflow as gf
from conftest import Project
from gpuflow.optim import SGD, Adam, AdamW, make_optimizer

CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.5, weight_decay=0.1)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.02, betas=(0.85, 0.95), weight_decay=0.1)),
]
OURS = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW}


def _bound_parameter(device, w0):
    """A Parameter bound to `device` in float64 (through a throwaway loss)."""
    W = gf.Parameter(w0.shape, name="W")
    W.value = w0.copy()
    gf.Graph(Project(W, gf.Input(name="R")), device=device, dtype="float64")
    return W


@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{i}" for i, (n, _) in
                                                      enumerate(CASES)])
def test_updates_match_torch_optim(device, name, options):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    w0 = rng.normal(size=(4, 3))
    grads = [rng.normal(size=(4, 3)) for _ in range(6)]
    W = _bound_parameter(device, w0)
    ours = OURS[name]([W], **options)
    tw = torch.tensor(w0.copy(), requires_grad=True)
    theirs = getattr(torch.optim, name)([tw], **options)
    for step, g in enumerate(grads):
        W.gradients[W] = device.put(g)
        ours.step()
        tw.grad = torch.tensor(g)
        theirs.step()
        np.testing.assert_allclose(device.to_host(W.value), tw.detach().numpy(), rtol=1e-12,
                                   atol=1e-14, err_msg=f"{name} {options} step {step}")


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_state_lives_on_the_device_and_updates_in_place(device, name):
    W = _bound_parameter(device, np.ones((3, 2)))
    opt = make_optimizer(name, [W], 0.1)
    value = W.value
    for _ in range(3):
        W.gradients[W] = device.put(np.full((3, 2), 0.5))
        opt.step()
    if device.mutable_arrays:
        assert W.value is value, "the parameter was replaced, not updated in place"
    assert not np.allclose(device.to_host(W.value), 1.0)
    for buf in opt.state[W].values():
        assert device.owns(buf), f"{name} state is not on {device.name}"
    assert opt.t == 3


def test_make_optimizer_refuses_unknown_names():
    W = _bound_parameter(gf.get_device("cpu"), np.ones((2, 2)))
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        make_optimizer("lbfgs", [W], 0.1)
    with pytest.raises(ValueError, match="Nesterov momentum needs momentum > 0"):
        SGD([W], 0.1, nesterov=True)


# -- weight averaging (EMA) -------------------------------------------------------------------
def _ema_net(device, dtype="float64", seed=0):
    """A 6-16-3 MLP with softmax cross-entropy: X, y, graph, and the torch twin's weights."""
    from gpuflow.layers import mlp
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = mlp(X, [6, 16, 3], activation="relu", seed=seed)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=device, dtype=dtype,
                     inputs=[X, y], outputs=[logits])
    return X, y, logits, graph


def _ema_batches(n=50, seed=5):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(8, 6)), rng.integers(0, 3, size=8)) for _ in range(n)]


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_ema_equals_torch_averaged_model(device, decay):
    """50 steps of SGD with momentum, `ema.update()` after each: the averages equal torch's
    AveragedModel(multi_avg_fn=get_ema_multi_avg_fn(decay)) fed the same parameters after
    each step, whose first update copies (n_averaged == 0)."""
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from gpuflow.optim import EMA
    X, y, logits, graph = _ema_net(device)
    opt = SGD(graph, lr=0.2, momentum=0.9)
    ema = EMA(graph, decay=decay)
    params = graph.named_parameters()
    model = torch.nn.ParameterDict({name.replace(".", "_"): torch.nn.Parameter(
        torch.tensor(np.asarray(device.to_host(p.value)))) for name, p in params.items()})
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    for step, (xb, yb) in enumerate(_ema_batches()):
        graph.step(xb, yb)
        opt.step()
        ema.update()
        with torch.no_grad():
            for name, p in params.items():
                model[name.replace(".", "_")].copy_(torch.tensor(np.asarray(
                    device.to_host(p.value))))
        averaged.update_parameters(model)
        assert ema.n_averaged == int(averaged.n_averaged) == step + 1
        if step in (0, 1, 49):
            for name, p in params.items():
                assert device.owns(ema.average[name])
                theirs = averaged.module[name.replace(".", "_")].detach().numpy()
                np.testing.assert_allclose(device.to_host(ema.average[name]), theirs,
                                           rtol=1e-12, atol=1e-15,
                                           err_msg=f"decay {decay} step {step} {name}")
    # the averages moved away from the weights (decay 0.9: far; 0.999: the first weights)
    W = params["layer1.W"]
    assert not np.allclose(device.to_host(ema.average["layer1.W"]), device.to_host(W.value))


def test_ema_swapped_evaluates_the_averages_and_restores_the_weights(device):
    from gpuflow.optim import EMA
    X, y, logits, graph = _ema_net(device)
    opt = Adam(graph, lr=0.05)
    ema = EMA(graph, decay=0.5)
    batches = _ema_batches(6)
    for xb, yb in batches:
        graph.step(xb, yb)
        opt.step()
        ema.update()
    xb = batches[0][0]
    before = {n: p.value for n, p in graph.named_parameters().items()}
    own = np.asarray(device.to_host(graph.run(logits, xb)))
    with ema.swapped():
        averaged = np.asarray(device.to_host(graph.run(logits, xb)))
        for name, p in graph.named_parameters().items():
            np.testing.assert_array_equal(device.to_host(p.value),
                                          device.to_host(ema.average[name]))
        with pytest.raises(gf.GraphError, match="swapped"):
            ema.update()
    assert all(p.value is before[n] for n, p in graph.named_parameters().items())
    np.testing.assert_array_equal(np.asarray(device.to_host(graph.run(logits, xb))), own)
    assert not np.allclose(averaged, own)
    # evaluating with the averages is evaluating a graph whose weights are the averages
    X2, y2, logits2, graph2 = _ema_net(device)
    for (name, p2), avg in zip(graph2.named_parameters().items(), ema.average.values()):
        p2.value = device.to_host(avg)
    np.testing.assert_allclose(np.asarray(device.to_host(graph2.run(logits2, xb))), averaged,
                               rtol=1e-12, atol=1e-14)
    with pytest.raises(gf.GraphError, match="not swapped in"):
        ema.swap_out()


def test_ema_averages_float32_masters_under_mixed_precision():
    """float16 graph: the averages are float32, taken from the optimizer's float32 masters."""
    from gpuflow.optim import EMA
    X, y, logits, graph = _ema_net("cpu", dtype="float16")
    opt = SGD(graph, lr=0.1)
    ema = EMA(graph, decay=0.9)
    for xb, yb in _ema_batches(5):
        graph.step(xb, yb)
        opt.step()
        ema.update()
        masters = {n: graph.amp.master_of(p).copy() for n, p in graph.named_parameters().items()}
    for name, avg in ema.average.items():
        assert avg.dtype == np.float32, name
    # the last update moved every average by 0.1 of its distance to the master it saw
    previous = {n: a.copy() for n, a in ema.average.items()}
    ema.update()
    for name, avg in ema.average.items():
        expected = previous[name] + np.float32(0.1) * (masters[name] - previous[name])
        np.testing.assert_allclose(avg, expected, rtol=1e-6)
    with ema.swapped():
        W = graph.named_parameters()["layer1.W"]
        assert W.value.dtype == np.float16
    assert graph.named_parameters()["layer1.W"].value.dtype == np.float16


def test_ema_refuses_bad_arguments():
    from gpuflow.optim import EMA
    *_, graph = _ema_net("cpu")
    for decay in (1.0, -0.1, "0.9", float("nan")):
        with pytest.raises(ValueError, match="EMA: decay"):
            EMA(graph, decay=decay)
    with pytest.raises(gf.GraphError, match="needs a gpuflow Graph"):
        EMA(graph.parameters, decay=0.9)
