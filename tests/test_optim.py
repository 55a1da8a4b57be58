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
