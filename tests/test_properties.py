"""Property tests (hypothesis): random MLP shapes (depth 1-3, widths 1-8, batch 1-6), random
activations and random devices from the available set. Forward is deterministic, backward
matches central differences in float64, values never leave the device, and three training
steps in float64 give the same losses on every device as on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import gpuflow as gf  # noqa: E402
from conftest import assert_on_device, central_difference, host  # noqa: E402
from gpuflow.optim import SGD  # noqa: E402


def _available(specs):
    out = []
    for spec in specs:
        try:
            gf.get_device(spec)
            out.append(spec)
        except gf.DeviceError:
            pass
    return out


DEVICES = _available(["cpu", "array_api_strict", "array_api_strict:device1", "torch:cpu"])
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)

nets = st.fixed_dictionaries({
    "widths": st.lists(st.integers(1, 8), min_size=2, max_size=4),   # input + 1-3 layers
    "activations": st.lists(st.sampled_from([None, "relu", "sigmoid", "tanh"]),
                            min_size=3, max_size=3),
    "batch": st.integers(1, 6),
    "device": st.sampled_from(DEVICES),
    "seed": st.integers(0, 2**16),
    "loss": st.sampled_from(["mse", "softmax"]),
})


def build(net, device=None, dtype="float64"):
    """The net of `net` as a Graph; returns (graph, host batch)."""
    widths, acts = net["widths"], net["activations"]
    X, y = gf.Input(name="X"), gf.Input(name="y")
    out = X
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        out, _ = gf.dense(out, n_in, n_out, name=f"l{i}", rng=net["seed"] + i,
                          activation=acts[i])
    rng = np.random.default_rng(net["seed"])
    xb = rng.normal(size=(net["batch"], widths[0]))
    if net["loss"] == "mse":
        loss = gf.MSE(y, out, name="loss")
        yb = rng.normal(size=(net["batch"], widths[-1]))
    else:
        loss = gf.SoftmaxCrossEntropy(y, out, name="loss")
        yb = rng.integers(0, widths[-1], size=net["batch"])
    graph = gf.Graph(loss, device=device or net["device"], dtype=dtype, inputs=[X, y])
    return graph, (xb, yb)


@SETTINGS
@given(net=nets, pick=st.integers(0, 10**6))
def test_forward_deterministic_backward_matches_differences_on_device(net, pick):
    graph, batch = build(net)
    device = graph.device
    first = float(host(device, graph.run(None, *batch)))
    assert float(host(device, graph.run(None, *batch))) == first, "forward not deterministic"
    assert float(host(device, graph.step(*batch))) == first, "step's forward differs from run"
    for node in graph.nodes:
        assert_on_device(device, node.value, f"{node.label}.value")
        for target, g in node.gradients.items():
            if not isinstance(g, float):
                assert_on_device(device, g, f"{node.label}.gradients[{target.label}]")

    # one random entry of one random parameter against a central difference
    p = graph.parameters[pick % len(graph.parameters)]
    x0 = np.array(host(device, p.value), dtype=np.float64)
    index = np.unravel_index(pick % x0.size, x0.shape)
    analytic = float(host(device, p.gradients[p])[index])
    numeric = central_difference(p, x0, lambda: graph.run(None, *batch), device,
                                 entries=[index])[index]
    assert np.isclose(analytic, numeric, rtol=1e-5, atol=1e-7), (
        f"{p.label}{index} on {device.name}: analytic {analytic}, numeric {numeric}, net {net}")


@SETTINGS
@given(net=nets)
def test_three_float64_steps_give_the_cpu_losses_on_every_device(net):
    losses = {}
    for spec in ("cpu", net["device"]):
        graph, batch = build(net, device=spec)
        opt = SGD(graph, lr=0.1, momentum=0.5)
        run = []
        for _ in range(3):
            run.append(graph.item(graph.step(*batch)))
            opt.step()
        losses[spec] = run
    np.testing.assert_allclose(losses[net["device"]], losses["cpu"], rtol=1e-9, atol=0,
                               err_msg=f"{net['device']} vs cpu, net {net}")
