"""device='fastest' (timed on two CPU devices), graph.compare naming a planted faulty node, and
the capture option accepted and inert where there is no capture."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import gpuflow as gf
from conftest import host
from gpuflow.runtime import placement
from gpuflow.data import load_digits
from gpuflow.optim import Adam

X_ALL, Y_ALL = load_digits()
XB, YB = X_ALL[:32], Y_ALL[:32]


class Shaky(gf.Node):
    """x * 1, except on torch, where its forward (or its backward) doubles: a planted bug."""

    def __init__(self, x, broken="forward", *, name=None):
        gf.Node.__init__(self, [x], name=name)
        self.broken = broken

    def _factor(self, part):
        return 2.0 if self.device.backend == "torch" and self.broken == part else 1.0

    def forward(self):
        self.value = self.inbound_nodes[0].value * self._factor("forward")

    def backward(self):
        self.gradients[self.inbound_nodes[0]] = self.upstream_gradient() * self._factor("backward")


def _net(broken=None, seed=0):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    hidden, _ = gf.dense(X, 64, 16, name="hidden", activation="tanh", rng=seed)
    if broken is not None:
        hidden = Shaky(hidden, broken, name="shaky")
    logits, _ = gf.dense(hidden, 16, 10, name="out", rng=seed + 1)
    return X, y, gf.SoftmaxCrossEntropy(y, logits, name="loss")


def _graph(device, broken=None, **options):
    X, y, loss = _net(broken)
    return gf.Graph(loss, device=device, inputs=[X, y], **options)


# -- fastest ----------------------------------------------------------------------------------
def test_fastest_times_each_device_picks_the_fastest_and_says_by_how_much(capsys):
    pytest.importorskip("torch")
    graph = _graph("fastest:cpu,torch:cpu")
    opt = Adam(graph, lr=1e-2)  # made before the device is chosen
    first = graph.item(graph.step(XB, YB))
    report = graph.fastest
    assert set(report.seconds) == {"cpu", "torch:cpu"} and not report.failed
    assert report.chosen == min(report.seconds, key=report.seconds.get)
    assert graph.device.name == report.chosen
    err = capsys.readouterr().err
    assert f"device 'fastest' chose {report.chosen}" in err and "x faster than" in err, err
    assert "(32, 64), (32,)" in err
    # timing changed no weight: the first loss is the one a plain graph on that device gets
    plain = _graph(report.chosen)
    assert first == pytest.approx(plain.item(plain.step(XB, YB)), rel=1e-6)
    for _ in range(3):  # trains on as usual, state on the chosen device
        graph.step(XB, YB)
        opt.step()
    for p in graph.parameters:
        assert graph.device.owns(p.value)
        assert all(graph.device.owns(b) for b in opt.state[p].values())


def test_fastest_times_warmed_whole_steps_in_alternating_rounds(monkeypatch, capsys):
    # A fake clock that moves only inside the optimizer's update: 5 s for the first update on
    # each device (a compilation), then 1 ms on cpu and 3 ms on array_api_strict. Any time
    # measured at all is the optimizer's update, measured inside the timed steps.
    from gpuflow import timing
    now, updates = [0.0], []
    monkeypatch.setattr(timing, "clock", lambda: now[0], raising=False)

    class Clocked(gf.optim.SGD):
        def step(self):
            name = self.params[0].device.name
            now[0] += 5.0 if name not in updates else {"cpu": 1e-3}.get(name, 3e-3)
            updates.append(name)
            super().step()

    graph = _graph("fastest:cpu,array_api_strict")
    opt = Clocked(graph, lr=1e-2)
    graph.step(XB, YB)
    assert set(updates) == {"cpu", "array_api_strict"}  # the update ran on both, in timing
    report = graph.fastest
    # compile steps not counted: every timed round is a steady step
    assert report.samples["cpu"] == [pytest.approx(1e-3)] * placement.ROUNDS
    assert report.seconds["array_api_strict"] == pytest.approx(3e-3)
    assert report.chosen == "cpu" and graph.device.name == "cpu"
    assert report.ratio == pytest.approx(3.0) and report.sure
    assert all(n >= placement.STEADY_WINDOW + 1 for n in report.warmup_steps.values())
    # the devices alternate: after the warm-up, the updates switch device round after round
    timed = updates[updates.index("array_api_strict"):]
    switches = sum(a != b for a, b in zip(timed, timed[1:]))
    assert switches >= placement.ROUNDS, updates
    err = capsys.readouterr().err
    assert "graph.step + Clocked.step" in err and "median of 5 alternating rounds" in err, err
    assert "3.00x faster than array_api_strict" in err and "a sure choice" in err, err
    # and the timing left the weights, optimizer state and step count as they were
    assert opt.t == 0 and graph.steps == 1
    plain = _graph("cpu")
    for p, q in zip(graph.parameters, plain.parameters):
        np.testing.assert_array_equal(host(graph.device, p.value), host(plain.device, q.value))


def test_fastest_report_says_when_the_runner_up_is_within_the_noise():
    report = placement.FastestReport(
        {"cpu": 1.0e-3, "torch:cpu": 1.1e-3}, "cpu", {}, ((32, 64), (32,)),
        {"cpu": [0.9e-3, 1.0e-3, 1.3e-3], "torch:cpu": [1.0e-3, 1.1e-3, 1.2e-3]})
    assert not report.sure and report.ratio == pytest.approx(1.1)
    assert report.spread["cpu"] == pytest.approx(1.3 / 0.9)
    text = str(report)
    assert "NOT a sure choice: torch:cpu is within the noise" in text, text
    assert "rounds within 1.44x" in text and "graph.step only" in text, text


def test_fastest_reports_a_device_that_cannot_run_the_graph(capsys):
    graph = _graph("fastest:cpu,array_api_strict", dtype="float16")
    graph.step(XB, YB)
    assert graph.fastest.chosen == "cpu"
    assert "array_api_strict" in graph.fastest.failed
    assert "could not run on array_api_strict" in capsys.readouterr().err


def test_fastest_candidates_leave_out_the_test_library_unless_named():
    found = placement.fastest_candidates("fastest")
    assert "cpu" in found and not any(s.startswith("array_api_strict") for s in found)
    assert placement.fastest_candidates("fastest: cpu, cpu") == ["cpu"]
    with pytest.raises(gf.DeviceError, match="unknown device spec 'nonsense'"):
        placement.fastest_candidates("fastest:nonsense")


# -- compare -----------------------------------------------------------------------------------
@pytest.mark.parametrize("broken, what", [("forward", "value"),
                                          ("backward", "gradient for Tanh 'hidden.tanh'")])
def test_compare_names_the_planted_faulty_node_with_both_numbers(broken, what):
    pytest.importorskip("torch")
    graph = _graph("cpu", broken)
    graph.step(XB, YB)
    found = graph.compare("torch:cpu", XB, YB)
    assert found.found and found.node == "Shaky 'shaky'", str(found)
    assert found.what.startswith(what)
    assert found.there == pytest.approx(2 * found.here, rel=1e-12), str(found)
    assert "Shaky 'shaky'" in str(found) and "torch:cpu gives" in str(found)


def test_compare_finds_nothing_on_a_sound_graph_and_leaves_it_as_it_was(device):
    runs = []
    for compare in (False, True):
        graph = _graph("cpu", dtype="float32")
        opt = Adam(graph, lr=1e-2)
        graph.step(XB, YB)
        opt.step()
        if compare:
            found = graph.compare(device)  # the last batch fed
            assert not found.found, str(found)
            assert found.compared > 10 and "agree on all" in str(found)
            assert graph.device.name == "cpu" and graph.dtype == np.float32
        losses = []
        for _ in range(3):
            losses.append(graph.item(graph.step(XB, YB)))
            opt.step()
        runs.append(losses + [host(graph.device, p.value) for p in graph.parameters])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_compare_keeps_a_mixed_precision_graphs_masters():
    graph = _graph("cpu", dtype="float16")
    opt = Adam(graph, lr=1e-2)
    for _ in range(3):
        graph.step(XB, YB)
        opt.step()
    masters = {p: host(graph.device, m).copy() for p, m in graph.amp.master.items()}
    assert not graph.compare("cpu").found
    graph.step(XB, YB)
    opt.step()
    assert opt.t == 4 and graph.amp is opt._amp
    for p, m in masters.items():  # updated from the kept masters, not from float16 values
        assert np.abs(host(graph.device, graph.amp.master[p]) - m).max() < 0.1


def test_move_to_carries_the_weights_exactly_and_the_graph_owns_its_insides(device):
    """Graph.move_to is the graph's own: placement calls it; dtype and reuse_buffers have one
    home (the plan), read through the graph."""
    graph = _graph("cpu", dtype="float32")
    opt = Adam(graph, lr=1e-2)
    graph.step(XB, YB)
    opt.step()
    before = [host(graph.device, p.value).copy() for p in graph.parameters]
    graph.move_to(device)
    assert graph.device.name == gf.get_device(device).name and graph.steps == 0
    assert graph.dtype is graph.plan.dtype and graph.plan.device is graph.device
    assert all(n.device is graph.device and n._plan is graph.plan for n in graph.nodes)
    for a, p in zip(before, graph.parameters):
        np.testing.assert_array_equal(a, host(graph.device, p.value))
    with pytest.raises(AttributeError):
        graph.dtype = "float64"
    with pytest.raises(AttributeError):
        graph.reuse_buffers = False
    assert np.isfinite(graph.item(graph.step(XB, YB)))
    graph.move_to("cpu", "float64")
    assert graph.dtype == np.float64 and graph.plan.reuse_buffers is graph.reuse_buffers


@pytest.mark.parametrize("dtype, other", [("float32", "array_api_strict"),
                                          ("float16", "torch:cpu")])
def test_compare_tolerances_follow_the_dtype_compared(dtype, other):
    # two libraries round BatchNorm differently by about 1e-7 in float32 (1e-4 in float16): no
    # difference at that dtype, while a planted doubling is still found
    if other.startswith("torch"):
        pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    xb, yb = rng.normal(size=(8, 1, 8, 8)), rng.integers(0, 10, 8)
    graph, _ = _cnn("cpu")
    graph.step(xb, yb)
    found = graph.compare(other, xb, yb, dtype=dtype)
    assert not found.found, str(found)
    assert graph.compare(other, xb, yb, dtype=dtype, rtol=0, atol=0).found
    planted = _graph("cpu", "forward")
    planted.step(XB, YB)
    pytest.importorskip("torch")
    found = planted.compare("torch:cpu", XB, YB, dtype=dtype)
    assert found.found and found.node == "Shaky 'shaky'", str(found)


def test_compare_tolerances_by_dtype():
    assert placement.tolerances("float64") == (1e-7, 1e-9)
    assert placement.tolerances(np.float32) == placement.TOLERANCES["float32"]
    assert placement.tolerances("float16", atol=0.5) == (1e-2, 0.5)
    assert placement.tolerances("bfloat16")[0] > placement.tolerances("float16")[0]


def test_compare_needs_a_batch():
    graph = _graph("cpu")
    with pytest.raises(gf.GraphError, match="has no value yet.*\n.*graph.compare"):
        graph.compare("cpu")


# -- capture -----------------------------------------------------------------------------------
def test_capture_is_accepted_inert_and_said_once_per_device(monkeypatch, device):
    monkeypatch.setattr(placement, "_SAID", set())
    with pytest.warns(UserWarning, match=f"capture=True.* on {device.name}: .*uncaptured"):
        graph = _graph(device, capture=True)
    assert graph.capture is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _graph(device, capture="auto")
    losses = [g.item(g.step(XB, YB)) for g in (graph, again, _graph(device))]
    assert losses[0] == losses[1] == losses[2]


def test_capture_refuses_other_values():
    with pytest.raises(gf.GraphError, match="capture='yes'.*expected True, False or 'auto'"):
        _graph("cpu", capture="yes")


def _cnn(device):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    conv, _ = gf.conv2d(X, 1, 4, 3, padding=1, name="c1")
    normed, _ = gf.batchnorm(conv, 4, name="bn")
    pooled = gf.Flatten(gf.MaxPool2D(gf.ReLU(normed)))
    logits, _ = gf.dense(pooled, 64, 10, name="out")
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=device, inputs=[X, y])
    bn = next(n for n in graph.nodes if isinstance(n, gf.BatchNorm))
    return graph, bn


def test_fastest_and_compare_leave_batchnorm_statistics_as_they_were():
    rng = np.random.default_rng(0)
    xb, yb = rng.normal(size=(8, 1, 8, 8)), rng.integers(0, 10, 8)
    plain, plain_bn = _cnn("cpu")
    plain.step(xb, yb)
    graph, bn = _cnn("fastest:cpu,array_api_strict")  # five timing steps on each device
    graph.step(xb, yb)
    for key, value in plain_bn.state_dict().items():  # as after one step, not eleven
        np.testing.assert_allclose(host(graph.device, bn.state_dict()[key]),
                                   host(plain.device, value), rtol=1e-6)
    before = {k: host(graph.device, v).copy() for k, v in bn.state_dict().items()}
    assert not graph.compare("array_api_strict").found
    for key, value in before.items():
        np.testing.assert_array_equal(host(graph.device, bn.state_dict()[key]), value)
