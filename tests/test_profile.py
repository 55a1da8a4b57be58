"""The profiler: `graph.profile(*batch, steps=, optimizer=)` times every node's forward and
backward and the optimizer's update (gpuflow/profiler.py); a normal step times nothing."""

from __future__ import annotations

import time

import numpy as np
import pytest

import gpuflow as gf
from gpuflow.backends import base
from gpuflow.optim import SGD


class Slow(gf.Node):
    """The identity, sleeping 5 ms in forward: the node a profile must put first."""

    def __init__(self, x, *, name=None):
        super().__init__([x], name=name)

    def forward(self):
        time.sleep(0.005)
        self.value = self.inbound_nodes[0].value

    def backward(self):
        x = self.inbound_nodes[0]
        self.gradients[x] = self.upstream_gradient()


def _net(device, slow=True):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    h, _ = gf.mlp(X, [6, 16, 3], activation="relu", seed=0)
    out = Slow(h, name="slow") if slow else h
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, out), device=device, dtype="float32",
                     inputs=[X, y], outputs=[out])
    rng = np.random.default_rng(0)
    return graph, (rng.normal(size=(8, 6)), rng.integers(0, 3, size=8))


def test_profile_names_the_slow_node_first_and_adds_up_to_the_step(device):
    graph, batch = _net(device)
    opt = SGD(graph, lr=0.1)
    report = graph.profile(*batch, steps=5, optimizer=opt)
    first = report.rows[0]
    assert (first.node, first.kind, first.shape) == ("slow", "Slow", (8, 3)), report.table()
    assert first.forward_s >= 0.005 and first.backward_s is not None
    kinds = {r.kind for r in report.rows}
    assert {"Linear", "ReLU", "SoftmaxCrossEntropy", "SGD update"} <= kinds, kinds
    assert 0.9 <= sum(r.share for r in report.rows) <= 1.1, report.table()
    assert report.accounted == pytest.approx(sum(r.share for r in report.rows))
    assert opt.t == 7 and graph.steps == 7  # 2 warm-up + 5 profiled: real steps
    text = str(report)
    assert text.splitlines()[1].split() == ["node", "kind", "output", "shape", "forward",
                                            "backward", "total", "share"]
    assert text.splitlines()[3].startswith("slow ") and "wall per step over 5 steps" in text
    assert "optimizer" in text and "SGD update" in text
    # the wrappers are gone: the nodes run their class's methods again
    assert all("forward" not in n.__dict__ and "backward" not in n.__dict__
               for n in graph.nodes)


def test_profile_without_optimizer_has_no_update_row():
    graph, batch = _net("cpu")
    report = graph.profile(*batch, steps=2, warmup=1)
    assert report.rows[0].node == "slow"
    assert all(r.node != "optimizer" for r in report.rows)
    assert report.to_dict()["rows"][0]["node"] == "slow"


def test_a_normal_step_calls_no_timer(monkeypatch):
    """Timing costs nothing when not used: graph.step + opt.step make no perf_counter call and
    no clock; the same counters do see the profiler's calls."""
    calls = {"perf_counter": 0, "profile_clock": 0}
    real_counter, real_clock = time.perf_counter, base.Device.profile_clock

    def counting_counter():
        calls["perf_counter"] += 1
        return real_counter()

    def counting_clock(self):
        calls["profile_clock"] += 1
        return real_clock(self)

    monkeypatch.setattr(time, "perf_counter", counting_counter)
    monkeypatch.setattr(base.Device, "profile_clock", counting_clock)
    graph, batch = _net("cpu", slow=False)
    opt = SGD(graph, lr=0.1)
    for _ in range(3):
        graph.step(*batch)
        opt.step()
    assert calls == {"perf_counter": 0, "profile_clock": 0}
    graph.profile(*batch, steps=2, optimizer=opt)
    assert calls["profile_clock"] == 1 and calls["perf_counter"] > 2 * len(graph.nodes)
    calls.update(perf_counter=0, profile_clock=0)
    graph.step(*batch)
    opt.step()
    assert calls == {"perf_counter": 0, "profile_clock": 0}


def test_profile_takes_its_wrappers_off_when_a_step_raises():
    graph, batch = _net("cpu")
    with pytest.raises(gf.GraphError):
        graph.profile(batch[0], steps=2)  # one batch for two inputs
    assert all("forward" not in n.__dict__ for n in graph.nodes)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        graph.profile(*batch, steps=0)
