"""The old `.npz` checkpoints (format 1) still load, read-only, on every device: a file written
by gpuflow 0.1.0 itself (tests/data/gpuflow-0.1.0.npz, made with gpuflow/checkpoint.py at
abc3198) and files from that writer (legacy_npz.py). Their bad-file tests are in
test_checkpoint_errors.py, their fuzzing in test_fuzz.py."""

from __future__ import annotations

import pathlib

import numpy as np

import gpuflow as gf
from gpuflow.checkpoint import load, save
from gpuflow.optim import SGD, Adam

from legacy_npz import legacy_save
from test_checkpoint import (N_STEPS, M_STEPS, assert_all_on, assert_same, build, host_optim,
                             host_params, make_batches, train)

FIXTURE = pathlib.Path(__file__).parent / "data" / "gpuflow-0.1.0.npz"


def fixture_model(device="cpu", seed=0):
    """The model the fixture was saved from: mlp [4, 3, 2], Adam(lr=0.01), one step on x."""
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = gf.mlp(X, [4, 3, 2], seed=seed)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=device, dtype="float64",
                     inputs=[X, y])
    return graph, Adam(graph, lr=0.01)


def test_a_checkpoint_written_by_gpuflow_0_1_0_loads_on_each_device(device):
    expected, expected_opt = fixture_model()
    expected.step(np.linspace(-1, 1, 8).reshape(2, 4), np.array([0, 1]))
    expected_opt.step()

    graph, opt = fixture_model(device, seed=1)
    info = load(FIXTURE, graph, opt)
    assert (info["step"], info["epoch"], opt.t) == (1, 0, 1)
    assert info["meta"]["format_version"] == 1 and info["meta"]["gpuflow_version"] == "0.1.0"
    assert info["state"]["batches.seed"] == 3 and info["state"]["note"] == "v1"
    assert np.array_equal(info["state"]["history"], np.arange(3.0))
    assert_all_on(graph, opt, device)
    assert_same(host_params(graph), host_params(expected), exact=True, what="parameter")
    assert_same(host_optim(opt), host_optim(expected_opt), exact=True, what="optimizer state")


def test_resume_from_an_old_checkpoint_equals_uninterrupted(tmp_path):
    """Train, save in the old format, resume from it, and save again: now in safetensors."""
    graph = build()
    opt = SGD(graph, lr=0.1, momentum=0.9)
    full, _ = train(graph, opt, make_batches(), N_STEPS + M_STEPS)

    graph = build()
    opt = SGD(graph, lr=0.1, momentum=0.9)
    batches = make_batches()
    first, index = train(graph, opt, batches, N_STEPS)
    legacy_save(tmp_path / "old.npz", graph, opt, step=N_STEPS, epoch=batches.epoch,
                state={"index": index, **batches.state_dict()})

    graph = build(seed=1)
    opt = SGD(graph, lr=0.1, momentum=0.9)
    info = load(tmp_path / "old.npz", graph, opt)
    save(tmp_path / "new.safetensors", graph, opt, step=info["step"], epoch=info["epoch"],
         state=info["state"])
    graph = build(seed=2)
    opt = SGD(graph, lr=0.1, momentum=0.9)
    info = load(tmp_path / "new.safetensors", graph, opt)
    batches = make_batches(seed=info["state"]["seed"])
    batches.epoch = info["state"]["epoch"]
    rest, _ = train(graph, opt, batches, M_STEPS, index=info["state"]["index"])
    assert first + rest == full


def test_old_checkpoint_round_trip_on_each_device(device, tmp_path):
    graph = build()
    opt = Adam(graph, lr=1e-2)
    train(graph, opt, make_batches(), 3)
    legacy_save(tmp_path / "c.npz", graph, opt, step=3, state={"a": np.arange(4)})
    other = build(device, seed=1)
    other_opt = Adam(other, lr=1e-2)
    info = load(tmp_path / "c.npz", other, other_opt)
    assert info["step"] == 3 and np.array_equal(info["state"]["a"], np.arange(4))
    assert_all_on(other, other_opt, device)
    assert_same(host_params(other), host_params(graph), exact=True, what="parameter")
    assert_same(host_optim(other_opt), host_optim(opt), exact=True, what="optimizer state")
