"""Learning-rate schedules against torch.optim.lr_scheduler, gradient clipping against
torch.nn.utils on every device, their argument checks, state round trips, and no host read."""

from __future__ import annotations

import numpy as np
import pytest

import gpuflow as gf
from conftest import Project, host
from gpuflow.optim import (SGD, Adam, CosineAnnealingLR, ExponentialLR, LinearLR, StepLR,
                           clip_grad_norm, clip_grad_value)

# (ours, torch's name, arguments): each stepped 50 epochs.
SCHEDULES = [
    (StepLR, "StepLR", dict(step_size=7)),
    (StepLR, "StepLR", dict(step_size=3, gamma=0.5)),
    (ExponentialLR, "ExponentialLR", dict(gamma=0.93)),
    (CosineAnnealingLR, "CosineAnnealingLR", dict(T_max=20)),   # past T_max: climbs back
    (CosineAnnealingLR, "CosineAnnealingLR", dict(T_max=50, eta_min=1e-4)),
    (CosineAnnealingLR, "CosineAnnealingLR", dict(T_max=7, eta_min=0.01)),
    (LinearLR, "LinearLR", dict(start_factor=0.1, total_iters=5)),
    (LinearLR, "LinearLR", dict(start_factor=0.25, end_factor=0.5, total_iters=30)),
    (LinearLR, "LinearLR", dict()),
]


def _parameter(device="cpu", shape=(3, 2), dtype="float64", **options):
    """A Parameter bound to `device` (through a throwaway graph), and the graph."""
    W = gf.Parameter(shape, name="W", rng=0)
    graph = gf.Graph(Project(W, gf.Input(name="R")), device=device, dtype=dtype, **options)
    return W, graph


@pytest.mark.parametrize("ours, name, options", SCHEDULES,
                         ids=[f"{n}-{i}" for i, (_, n, _) in enumerate(SCHEDULES)])
def test_schedule_matches_torch_over_50_epochs(ours, name, options):
    torch = pytest.importorskip("torch")
    W, _ = _parameter()
    opt = SGD([W], lr=0.1)
    schedule = ours(opt, **options)
    tw = torch.zeros(2, requires_grad=True)
    topt = torch.optim.SGD([tw], lr=0.1)
    theirs = getattr(torch.optim.lr_scheduler, name)(topt, **options)
    ours_lr, theirs_lr = [opt.lr], [topt.param_groups[0]["lr"]]
    for _ in range(50):
        topt.step()  # torch warns when the schedule steps before the optimizer
        theirs.step()
        schedule.step()
        ours_lr.append(opt.lr)
        theirs_lr.append(topt.param_groups[0]["lr"])
    np.testing.assert_allclose(ours_lr, theirs_lr, rtol=1e-13, atol=1e-17)
    assert schedule.get_last_lr() == [opt.lr]
    assert len(set(ours_lr)) > 1, "the schedule never changed the rate"


def test_schedule_drives_training_and_a_rate_of_zero_is_allowed():
    """The end of a cosine is lr 0: the optimizer runs (and changes nothing), as PyTorch's."""
    W, graph = _parameter()
    opt = SGD(graph, lr=0.5)
    schedule = CosineAnnealingLR(opt, T_max=2)
    R = np.ones((3, 2))
    before = host(graph.device, W.value).copy()
    for _ in range(2):
        graph.step(R)
        opt.step()
        schedule.step()
    assert opt.lr == 0.0
    moved = host(graph.device, W.value).copy()
    assert not np.array_equal(moved, before)
    graph.step(R)
    opt.step()
    np.testing.assert_array_equal(host(graph.device, W.value), moved)


@pytest.mark.parametrize("ours, name, options", SCHEDULES[::2],
                         ids=[n for _, n, _ in SCHEDULES[::2]])
def test_state_dict_resumes_the_same_rates(ours, name, options):
    W, _ = _parameter()
    opt = Adam([W], lr=0.01)
    schedule = ours(opt, **options)
    for _ in range(9):
        schedule.step()
    state = schedule.state_dict()
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in state.values())
    expected = [schedule.step() for _ in range(20)]

    W2, _ = _parameter()
    opt2 = Adam([W2], lr=0.01)  # the rate a fresh run starts with
    resumed = ours(opt2, **options)
    resumed.load_state_dict({k: np.float64(v) if k == "last_lr" else v
                             for k, v in state.items()})  # as read back from a file
    assert opt2.lr == state["last_lr"] and resumed.last_epoch == 9
    assert [resumed.step() for _ in range(20)] == expected


def test_load_state_dict_refuses_another_kind_and_changes_nothing():
    W, _ = _parameter()
    opt = SGD([W], lr=0.1)
    schedule = StepLR(opt, 5)
    other = ExponentialLR(SGD([W], lr=0.1), 0.9).state_dict()
    with pytest.raises(gf.CheckpointError, match=r"missing \['step_size'\]"):
        schedule.load_state_dict(other)
    bad = dict(schedule.state_dict(), last_lr=float("nan"))
    with pytest.raises(gf.CheckpointError, match="last_lr is nan"):
        schedule.load_state_dict(bad)
    assert schedule.last_epoch == 0 and opt.lr == 0.1 and schedule.step_size == 5


@pytest.mark.parametrize("make, message", [
    (lambda o: StepLR(o, 0), "step_size must be an integer >= 1, got 0"),
    (lambda o: StepLR(o, 2.5), "step_size must be an integer"),
    (lambda o: StepLR(o, 3, gamma=-1), "gamma must be a finite number > 0"),
    (lambda o: ExponentialLR(o, float("nan")), "gamma must be a finite number"),
    (lambda o: ExponentialLR(o, "0.9"), "ExponentialLR: gamma must be a number, got '0.9'"),
    (lambda o: CosineAnnealingLR(o, 0), "T_max must be an integer >= 1"),
    (lambda o: CosineAnnealingLR(o, 10, eta_min=1.0), "eta_min .* is above the optimizer's lr"),
    (lambda o: LinearLR(o, start_factor=0), "start_factor must be a finite number > 0"),
    (lambda o: LinearLR(o, end_factor=1.5), "end_factor must be a finite number >= 0 and <= 1"),
    (lambda o: LinearLR(o, total_iters=True), "total_iters must be an integer"),
    (lambda o: StepLR(object(), 3), "expected a gpuflow optimizer"),
])
def test_schedule_arguments_are_checked(make, message):
    W, _ = _parameter()
    opt = SGD([W], lr=0.1)
    with pytest.raises(ValueError, match=message) as info:
        make(opt)
    assert "help:" in str(info.value)
    assert opt.lr == 0.1


# -- clipping ------------------------------------------------------------------------------------
def _two_parameters(device, scale):
    """Two Parameters under one loss, with gradients R1 * scale and R2 * scale after a step."""
    rng = np.random.default_rng(3)
    A = gf.Parameter((4, 3), name="A", rng=1)
    B = gf.Parameter((5,), name="B", rng=2)
    RA, RB = gf.Input(name="RA"), gf.Input(name="RB")
    loss = gf.MSE(Project(A, RA), Project(B, RB))  # (sa - sb)^2: both get gradients
    graph = gf.Graph(loss, device=device, dtype="float64")
    ra, rb = rng.normal(size=(4, 3)) * scale, rng.normal(size=5) * scale
    graph.step(ra, rb)
    grads = [host(device, p.gradients[p]).copy() for p in (A, B)]
    return graph, (A, B), grads


@pytest.mark.parametrize("max_norm, scale", [(0.5, 1.0), (1e3, 1.0), (1.0, 1e-3)])
def test_clip_grad_norm_matches_torch(device, max_norm, scale):
    torch = pytest.importorskip("torch")
    graph, params, grads = _two_parameters(device, scale)
    tensors = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
    for t, g in zip(tensors, grads):
        t.grad = torch.tensor(g)
    expected_norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    norm = clip_grad_norm(graph, max_norm)
    assert graph.device.owns(norm), f"the norm is {type(norm).__name__}, not on the device"
    np.testing.assert_allclose(graph.item(norm), float(expected_norm), rtol=1e-12)
    for p, t in zip(params, tensors):
        np.testing.assert_allclose(host(device, p.gradients[p]), t.grad.numpy(), rtol=1e-12,
                                   err_msg=f"{p.label} on {device.name}")


@pytest.mark.parametrize("clip_value", [0.05, 1e6])
def test_clip_grad_value_matches_torch(device, clip_value):
    torch = pytest.importorskip("torch")
    graph, params, grads = _two_parameters(device, 1.0)
    tensors = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True) for g in grads]
    for t, g in zip(tensors, grads):
        t.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_value_(tensors, clip_value)
    clip_grad_value(graph.parameters, clip_value)
    clipped_any = False
    for p, t, g in zip(params, tensors, grads):
        got = host(device, p.gradients[p])
        np.testing.assert_array_equal(got, t.grad.numpy(), err_msg=f"{p.label} {device.name}")
        clipped_any |= not np.array_equal(got, g)
    assert clipped_any == (max(np.abs(g).max() for g in grads) > clip_value)


def test_clipping_never_writes_into_a_gradient_two_parameters_share(device):
    """Add(A, B) hands both parameters the same upstream array: scaling it in place twice
    would clip twice (and change what the loss node holds)."""

    class Add(gf.Node):
        def __init__(self, a, b):
            gf.Node.__init__(self, [a, b])

        def forward(self):
            self.value = self.inbound_nodes[0].value + self.inbound_nodes[1].value

        def backward(self):
            g = self.upstream_gradient()
            for n in self.inbound_nodes:
                self.gradients[n] = g

    A = gf.Parameter((3,), name="A", rng=1)
    B = gf.Parameter((3,), name="B", rng=2)
    graph = gf.Graph(Project(Add(A, B), gf.Input(name="R")), device=device, dtype="float64")
    graph.step(np.array([3.0, 4.0, 0.0]))
    assert A.gradients[A] is B.gradients[B]
    norm = graph.item(clip_grad_norm(graph, 1.0))
    assert norm == pytest.approx(np.sqrt(50.0), rel=1e-12)
    expected = np.array([3.0, 4.0, 0.0]) / (np.sqrt(50.0) + 1e-6)
    for p in (A, B):
        np.testing.assert_allclose(host(device, p.gradients[p]), expected, rtol=1e-12)


def test_clipped_gradients_drive_the_optimizer(device):
    graph, (A, B), grads = _two_parameters(device, 1.0)
    before = host(device, A.value).copy()
    norm = graph.item(clip_grad_norm(graph, 0.1))
    SGD(graph, lr=1.0).step()
    step = before - host(device, A.value)
    np.testing.assert_allclose(step, grads[0] * 0.1 / (norm + 1e-6), rtol=1e-10)


def test_clip_grad_norm_in_float16_sums_squares_without_overflow():
    """float16 squares overflow from 256 on: the norm is accumulated in float32."""
    W, graph = _parameter(dtype="float16", shape=(4,), loss_scale=1)
    graph.step(np.ones(4))
    W.gradients[W] = graph.device.put(np.full(4, 300.0), graph.dtype)  # a float16 gradient
    norm = clip_grad_norm(graph, 1.0)
    assert float(norm) == pytest.approx(600.0, rel=1e-3)
    assert np.isfinite(host(graph.device, W.gradients[W])).all()


def test_clipping_reads_nothing_back_to_the_host(monkeypatch):
    """No synchronisation inside a step with clipping: with every way of reading a torch tensor
    on the host refused, step + clip + optimizer step still run (strict mode refuses the
    counted transfers on GPUs; this catches host reads on the CPU too)."""
    torch = pytest.importorskip("torch")
    graph, params, _ = _two_parameters(gf.get_device("torch:cpu"), 1.0)
    graph.strict = True
    opt = Adam(graph, lr=0.01)

    def refused(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    for _ in range(2):
        graph.step(*[np.ones(p.value.shape) for p in params])
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__"):
                m.setattr(torch.Tensor, name, refused)
            m.setattr(gf.Device, "to_host", refused)
            m.setattr(gf.Device, "synchronize", refused)
            norm = clip_grad_norm(graph, 0.5)
            clip_grad_value(graph, 0.1)
            opt.step()
        assert isinstance(norm, torch.Tensor) and norm.ndim == 0


def test_schedules_take_numbers_as_the_optimizers_do():
    """One number check (errors.check_int / check_hyperparameter) for optimizers, schedules and
    clipping: NumPy scalars are numbers there too, stored as Python ints and floats."""
    W, graph = _parameter()
    opt = SGD([W], lr=np.float32(0.5))
    schedule = StepLR(opt, np.int64(2), gamma=np.float32(0.5))
    assert type(schedule.step_size) is int and type(schedule.gamma) is float
    linear = LinearLR(SGD([W], lr=0.1), start_factor=np.float32(0.5), total_iters=np.int32(4))
    assert (linear.start_factor, linear.total_iters) == (0.5, 4)
    graph, params, grads = _two_parameters(gf.get_device("cpu"), 10.0)
    clip_grad_value(graph, np.float32(0.5))
    for p, g in zip(params, grads):
        np.testing.assert_array_equal(host(graph.device, p.gradients[p]), np.clip(g, -0.5, 0.5))


@pytest.mark.parametrize("call, error, message", [
    (lambda g: clip_grad_norm(g, 0.0), ValueError, "max_norm must be a finite number > 0"),
    (lambda g: clip_grad_norm(g, float("inf")), ValueError, "max_norm must be a finite"),
    (lambda g: clip_grad_norm(g, "1"), ValueError, "max_norm must be a number"),
    (lambda g: clip_grad_value(g, -1.0), ValueError, "clip_value must be a finite number > 0"),
    (lambda g: clip_grad_norm(3, 1.0), ValueError, "expected a Graph or a list of parameters"),
    (lambda g: clip_grad_norm([1.0], 1.0), ValueError, "not a gpuflow node"),
    (lambda g: clip_grad_norm([], 1.0), ValueError, "no parameters to clip"),
    (lambda g: clip_grad_norm(g, 1.0), gf.GraphError, "'W' has no gradient yet"),
])
def test_clipping_arguments_are_checked(call, error, message):
    W, graph = _parameter()
    with pytest.raises(error, match=message) as info:
        call(graph)
    assert "help:" in str(info.value)


def test_strict_step_with_clipping_makes_no_transfer(device):
    """Graph(strict=True): step, clip and update count no transfer or synchronisation after
    warm-up (on a GPU, strict mode raises on one; on CPUs the counters must stay still too)."""
    graph, params, _ = _two_parameters(device, 1.0)
    graph = gf.Graph(graph.loss, device=device, dtype="float64", strict=True)
    opt = Adam(graph, lr=0.01)
    batch = [np.ones(p.value.shape) for p in params]
    graph.step(*batch)
    clip_grad_norm(graph, 0.5)
    opt.step()
    gf.LEDGER.reset()
    for _ in range(3):
        graph.step(*batch)
        with gf.LEDGER.enforcing(), device.forbid_sync():
            clip_grad_norm(graph, 0.5)
            clip_grad_value(graph, 0.1)
            opt.step()
    counts = gf.LEDGER.snapshot()
    assert counts["d2h_calls"] == 0 and counts["syncs"] == 0, counts


@pytest.mark.parametrize("clip", [lambda g: clip_grad_norm(g, 1e-3),
                                  lambda g: clip_grad_value(g, 1e-3)], ids=["norm", "value"])
def test_clipping_a_graph_skips_its_frozen_parameters(device, clip):
    # Regression: a parameter frozen before the first step has no gradient, and clipping the
    # graph raised "has no gradient yet"; one frozen later kept its last gradient, which still
    # counted in the global norm (torch skips parameters whose .grad is None).
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, params = gf.mlp(X, [4, 3, 2], seed=0)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=device, dtype="float64")
    x, labels = np.random.default_rng(0).normal(size=(5, 4)), np.array([0, 1, 0, 1, 1])
    frozen = params["layer1.W"]
    frozen.trainable = False
    graph.step(x, labels)
    clip(graph)  # no error
    frozen.trainable = True
    graph.step(x, labels)
    frozen.trainable = False
    graph.step(x, labels)
    live = [p for p in graph.parameters if p is not frozen]
    expected = np.sqrt(sum((host(device, p.gradients[p]) ** 2).sum() for p in live))
    np.testing.assert_allclose(graph.item(clip_grad_norm(graph, 1e9)), expected, rtol=1e-12)


@pytest.mark.parametrize("options", [dict(warmup=5, T_max=30), dict(warmup=1, T_max=4),
                                     dict(warmup=10, T_max=25, start_factor=0.01,
                                          eta_min=0.003)])
def test_warmup_cosine_is_torchs_sequential_linear_then_cosine(options):
    """WarmupCosineLR gives the rates of torch's SequentialLR([LinearLR, CosineAnnealingLR],
    milestones=[warmup]) (which its docstring shows), past T_max too; its state resumes it."""
    torch = pytest.importorskip("torch")
    from gpuflow.optim import WarmupCosineLR
    sched = torch.optim.lr_scheduler
    W, _ = _parameter()
    opt = SGD([W], lr=0.1)
    schedule = WarmupCosineLR(opt, **options)
    warmup, total = options["warmup"], options["T_max"]
    start = options.get("start_factor", 1 / (warmup + 1))
    topt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    theirs = sched.SequentialLR(topt, [
        sched.LinearLR(topt, start, 1.0, total_iters=warmup),
        sched.CosineAnnealingLR(topt, total - warmup, eta_min=options.get("eta_min", 0.0))],
        milestones=[warmup])
    ours_lr, theirs_lr = [opt.lr], [topt.param_groups[0]["lr"]]
    for _ in range(total + 5):
        topt.step()
        theirs.step()
        ours_lr.append(schedule.step())
        theirs_lr.append(topt.param_groups[0]["lr"])
    np.testing.assert_allclose(ours_lr, theirs_lr, rtol=1e-12, atol=1e-17)
    assert ours_lr[total] == pytest.approx(options.get("eta_min", 0.0), abs=1e-17)
    again = WarmupCosineLR(SGD([W], lr=0.1), **options)
    again.load_state_dict(schedule.state_dict())
    assert again.step() == WarmupCosineLR.step(schedule)


def test_warmup_cosine_refuses_a_total_within_the_warmup():
    from gpuflow.optim import WarmupCosineLR
    W, _ = _parameter()
    with pytest.raises(ValueError, match="T_max must be an integer >= 6"):
        WarmupCosineLR(SGD([W], lr=0.1), warmup=5, T_max=5)
    with pytest.raises(ValueError, match="warmup must be an integer >= 1"):
        WarmupCosineLR(SGD([W], lr=0.1), warmup=0, T_max=5)


def test_a_resumed_warmup_cosine_run_follows_a_new_total_of_steps():
    """`gpuflow train --model gpt --resume CKPT --steps 3000` of a 1000-step run: the warm-up
    (a tenth of the steps) and T_max follow the new total, so the rate at the saved position is
    a fresh 3000-step run's there (the warm-up stayed 100 before: review finding)."""
    from gpuflow.cli.runs import follow_epochs, make_schedule
    W, _ = _parameter()
    opt = SGD([W], lr=0.003)
    schedule = make_schedule("warmup-cosine", opt, 1000)
    for _ in range(50):
        schedule.step()
    resumed, said = follow_epochs("warmup-cosine", schedule, opt, 3000, unit="steps")
    fresh_opt = SGD([W], lr=0.003)
    fresh = make_schedule("warmup-cosine", fresh_opt, 3000)
    for _ in range(50):
        fresh.step()
    assert (resumed.warmup, resumed.T_max) == (300, 3000) and "warmup 100" in said
    assert resumed.start_factor == fresh.start_factor
    assert opt.lr == pytest.approx(fresh_opt.lr, rel=1e-12)
    for _ in range(400):
        assert resumed.step() == pytest.approx(fresh.step(), rel=1e-12)
