"""What is JAX's own in the fifth backend: specs, float64 on, immutable arrays, its rng, training
equal to NumPy's with every optimizer, checkpoints between JAX and NumPy, and the CLI.

Every device-parametrized test of the suite runs on 'jax:cpu' too (tests/conftest.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import gpuflow as gf
from gpuflow.checkpoint import load, save
from gpuflow.compiled import compile_step
from gpuflow.data import Batches, load_digits
from gpuflow.layers import lenet, mlp
from gpuflow.optim import make_optimizer
from conftest import REPO, child_env

jax = pytest.importorskip("jax", reason="JAX is not installed (pip install 'gpuflow[jax]')")


def _jax_gpus() -> int:
    try:
        return len(jax.devices("gpu"))
    except RuntimeError:
        return 0


@pytest.fixture
def jdev() -> gf.Device:
    return gf.get_device("jax:cpu")


def test_specs_are_canonical(jdev):
    assert jdev.name == "jax:cpu"
    assert gf.get_device("jax:cpu:0") is jdev
    assert gf.get_device(" JAX:CPU ") is jdev
    if jax.default_backend() == "cpu":
        assert gf.get_device("jax") is jdev
    assert "jax:cpu" in gf.available_devices()


@pytest.mark.skipif(_jax_gpus() > 0, reason="JAX sees a GPU here")
@pytest.mark.parametrize("spec", ["jax:gpu", "jax:gpu:1", "jax:cuda"])
def test_gpu_without_one_says_what_jax_found(spec):
    with pytest.raises(gf.DeviceError) as info:
        gf.get_device(spec)
    msg = str(info.value)
    assert repr(spec) in msg and "JAX" in msg and "help:" in msg and "'jax:cpu'" in msg, msg


@pytest.mark.parametrize("spec", ["jax:tpu9", "jax:cpu:1", "jax:gpu:x"])
def test_bad_specs(spec):
    if spec == "jax:gpu:x" and _jax_gpus() == 0:
        pytest.skip("without a GPU, JAX's 'no GPU' is reported first")
    with pytest.raises(gf.DeviceError, match=r"(?s)unknown device spec.*help:"):
        gf.get_device(spec)


def test_float64_is_on_and_kept(jdev):
    assert jax.config.jax_enable_x64, "making a JAX device must turn on jax_enable_x64"
    x = jdev.put(np.linspace(0, 1, 7))
    assert x.dtype == np.float64 and jdev.owns(x)
    third = jdev.to_host(jdev.xp.asarray(1.0, device=jdev.native) / 3)
    assert third == np.float64(1) / 3, "float64 arithmetic on JAX lost precision"
    assert "float64 on" in jdev.describe()


def test_capabilities(jdev):
    assert not jdev.mutable_arrays and not jdev.ops.writes_out
    assert jdev.is_host and not jdev.is_gpu and jdev.collectives is None
    assert jdev.index == 0


def test_put_copies_the_host_array(jdev):
    host = np.ones(4)
    on = jdev.put(host)
    host[0] = 5.0
    assert jdev.to_host(on)[0] == 1.0, "put must copy: the caller may reuse its host batch"


def test_a_jax_array_fed_to_numpy_is_shared(jdev):
    """A jax:cpu array is in a 'cpu' graph's memory: taken through DLPack (issue 14)."""
    X = gf.Input(name="X")
    out = gf.Sigmoid(X)
    graph = gf.Graph(out, device="cpu", dtype="float64", inputs=[X])
    x = jdev.put(np.ones((2, 3)), "float64")
    np.testing.assert_allclose(graph.run(out, x), 1 / (1 + np.exp(-np.ones((2, 3)))))
    assert isinstance(X.value, np.ndarray) and X.value.ctypes.data == x.unsafe_buffer_pointer()


def test_a_jax_array_fed_to_another_device_is_refused(jdev):
    pytest.importorskip("array_api_strict")
    X = gf.Input(name="X")
    out = gf.Sigmoid(X)
    graph = gf.Graph(out, device="array_api_strict:device1", inputs=[X])
    with pytest.raises(gf.DeviceError, match=r"jax:cpu.*array_api_strict:device1\.\n.*help:"):
        graph.run(out, jdev.put(np.ones((2, 3))))


def test_rng_uniform(jdev):
    gen = jdev.rng(7)
    a, b = gen.uniform((1000,), "float32"), gen.uniform((1000,), "float32")
    assert jdev.owns(a) and a.dtype == np.float32 and a.shape == (1000,)
    ha, hb = jdev.to_host(a), jdev.to_host(b)
    assert ha.min() >= 0 and ha.max() < 1 and 0.4 < ha.mean() < 0.6
    assert not np.array_equal(ha, hb), "each call must split the key"
    again = jdev.to_host(jdev.rng(7).uniform((1000,), "float32"))
    assert np.array_equal(ha, again), "the same seed must give the same numbers"
    assert jdev.rng(7).uniform((2, 3), "float64").dtype == np.float64


# -- training equals NumPy's --------------------------------------------------------------------
def _digits(n=96):
    X, y = load_digits()
    return X[:n], y[:n]


def _train(spec, optimizer, steps=6, **options):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = mlp(X, [64, 16, 10], seed=0, name="layer")
    loss = gf.SoftmaxCrossEntropy(y, logits, name="loss")
    graph = gf.Graph(loss, device=spec, dtype="float64", inputs=[X, y])
    opt = make_optimizer(optimizer, graph, 0.05, **options)
    losses = []
    for step, (xb, yb) in enumerate(Batches(*_digits(), 32, seed=1)):
        if step == steps:
            break
        losses.append(graph.item(graph.step(xb, yb)))
        opt.step()
    params = {n: graph.device.to_host(p.value) for n, p in graph.named_parameters().items()}
    return losses, params, graph, opt


@pytest.mark.parametrize("optimizer, options", [
    ("sgd", {}), ("momentum", {}), ("nesterov", {}), ("sgd", {"weight_decay": 0.01}),
    ("adam", {}), ("adam", {"weight_decay": 0.01}), ("adamw", {})])
def test_training_equals_numpy(jdev, optimizer, options):
    cpu_losses, cpu_params, _, _ = _train("cpu", optimizer, **options)
    jax_losses, jax_params, _, _ = _train("jax:cpu", optimizer, **options)
    np.testing.assert_allclose(jax_losses, cpu_losses, rtol=1e-9)
    _, initial, _, _ = _train("cpu", optimizer, steps=0, **options)
    assert all(not np.allclose(cpu_params[n], initial[n]) for n in initial), "nothing trained"
    for name, value in cpu_params.items():
        np.testing.assert_allclose(jax_params[name], value, rtol=1e-9, atol=1e-12,
                                   err_msg=f"{optimizer} {options}: {name}")


def test_checkpoint_saved_on_jax_loads_on_numpy_and_back(jdev, tmp_path):
    losses, params, graph, opt = _train("jax:cpu", "adam")
    save(tmp_path / "jax.safetensors", graph, opt, step=6)
    _, _, cpu_graph, cpu_opt = _train("cpu", "adam", steps=1)
    assert load(tmp_path / "jax.safetensors", cpu_graph, cpu_opt)["meta"]["device"] == "jax:cpu"
    for name, p in cpu_graph.named_parameters().items():
        np.testing.assert_array_equal(p.value, params[name])
    save(tmp_path / "cpu.safetensors", cpu_graph, cpu_opt, step=6)
    _, _, back, back_opt = _train("jax:cpu", "adam", steps=1)
    load(tmp_path / "cpu.safetensors", back, back_opt)
    for name, p in back.named_parameters().items():
        assert jdev.owns(p.value)
        np.testing.assert_array_equal(jdev.to_host(p.value), params[name])
    for p in back.parameters:
        for key, buf in back_opt.state[p].items():
            assert jdev.owns(buf), f"{p.name}/{key} not on jax:cpu"
            np.testing.assert_array_equal(jdev.to_host(buf), cpu_opt.state[
                cpu_graph.named_parameters()[p.name]][key])


def test_cli_trains_on_jax():
    done = subprocess.run(
        [sys.executable, "-m", "gpuflow.cli", "train", "--device", "jax:cpu", "--epochs", "2",
         "--hidden", "16", "--quiet"],
        capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "device: jax:cpu" in done.stdout, done.stdout


def test_cli_losses_equal_numpy_in_float64():
    from gpuflow.cli import train
    opts = dict(epochs=1, dtype="float64", hidden=(16,), quiet=True)
    cpu = train({**opts, "device": "cpu"})
    on_jax = train({**opts, "device": "jax:cpu"})
    np.testing.assert_allclose(on_jax["losses"], cpu["losses"], rtol=1e-9)
    assert on_jax["accuracies"] == cpu["accuracies"]


def test_devices_command_lists_jax():
    done = subprocess.run([sys.executable, "-m", "gpuflow.cli", "devices"], capture_output=True,
                          text=True, env=child_env(), cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "jax:cpu" in done.stdout, done.stdout


# -- the compiled step (gpuflow.compiled.compile_step: one jax.jit function) ---------------------
@pytest.mark.parametrize("optimizer", ["sgd", "nesterov", "adam", "adamw"])
def test_compiled_step_equals_eager(jdev, optimizer):
    _, _, eager, eager_opt = _train("jax:cpu", optimizer, steps=0)
    _, _, graph, opt = _train("jax:cpu", optimizer, steps=0)
    step = compile_step(graph, opt)
    assert type(step).__name__ == "CompiledStep"
    for xb, yb in list(Batches(*_digits(), 32, seed=1))[:3]:
        want = eager.item(eager.step(xb, yb))
        eager_opt.step()
        got = graph.item(step(xb, yb))
        assert got == pytest.approx(want, rel=1e-9)
    assert opt.t == eager_opt.t == 3 and graph.steps == 3
    for (name, p), q in zip(graph.named_parameters().items(), eager.parameters):
        np.testing.assert_allclose(jdev.to_host(p.value), jdev.to_host(q.value), rtol=1e-9,
                                   err_msg=name)
        np.testing.assert_allclose(jdev.to_host(p.gradients[p]), jdev.to_host(q.gradients[q]),
                                   rtol=1e-9, err_msg=f"{name} gradient")
    # Nothing traced stayed behind: the eager step and run still work on the same graph.
    xb, yb = _digits(32)
    graph.step(xb, yb)
    opt.step()
    assert np.isfinite(graph.item(graph.run(None, xb, yb)))


def test_compile_step_is_the_eager_step_without_a_compiler():
    _, _, graph, opt = _train("cpu", "adam", steps=0)
    _, _, eager, eager_opt = _train("cpu", "adam", steps=0)
    assert graph.device.jit(lambda x: x) is None
    step = compile_step(graph, opt)
    xb, yb = _digits(32)
    for _ in range(2):
        assert graph.item(step(xb, yb)) == eager.item(eager.step(xb, yb))
        eager_opt.step()
    assert opt.t == 2


def _cnn(optimizer="momentum", dtype="float64"):
    """A tiny CNN with BatchNorm and Dropout (issue 18): 4 channels on 8x8 digits."""
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = lenet(X, (1, 8, 8), 10, channels=(4,), hidden=8, dropout=0.25,
                      batch_norm=True, seed=3)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device="jax:cpu", dtype=dtype,
                     inputs=[X, y])
    return graph, make_optimizer(optimizer, graph, 0.05)


def _state(graph):
    """Every parameter, BatchNorm's running statistics and Dropout's counter, on the host."""
    out = {n: graph.device.to_host(p.value) for n, p in graph.named_parameters().items()}
    for node in graph.nodes:
        for key, value in getattr(node, "state_dict", dict)().items():
            out[f"{node.name}/{key}"] = np.asarray(graph.device.to_host(value)
                                                    if hasattr(value, "shape") else value)
    return out


@pytest.mark.parametrize("clip", [None, 0.05])
def test_compiled_step_carries_batchnorm_dropout_and_clipping(jdev, clip):
    # Regression (issue 18): compile_step refused BatchNorm and Dropout (so no CNN), and had
    # no clipping. Their state goes through the compiled step, which equals the eager steps.
    eager, eager_opt = _cnn()
    graph, opt = _cnn()
    step = compile_step(graph, opt, **({} if clip is None else {"clip_norm": clip}))
    assert type(step).__name__ == "CompiledStep"
    X, y = _digits(64)
    X = X.reshape(-1, 1, 8, 8)
    for i in range(4):
        xb, yb = X[16 * i:16 * i + 16], y[16 * i:16 * i + 16]
        want = eager.item(eager.step(xb, yb))
        if clip is not None:
            norm = eager.item(gf.optim.clip_grad_norm(eager, clip))
            assert norm > clip, "the clip must act for this test to test it"
        eager_opt.step()
        assert graph.item(step(xb, yb)) == pytest.approx(want, rel=1e-12)
    assert opt.t == eager_opt.t == 4 and graph.steps == 4
    got, want = _state(graph), _state(eager)
    assert got.keys() == want.keys() and "cnn.bn1/running_var" in got
    assert got["cnn.dropout/steps"] == 4
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-12, atol=1e-15, err_msg=key)
    # Evaluation uses the running statistics the compiled steps moved.
    assert graph.item(graph.run(None, xb, yb)) == pytest.approx(
        eager.item(eager.run(None, xb, yb)), rel=1e-12)
    # Nothing traced stayed behind: eager steps go on from the compiled ones.
    assert np.isfinite(graph.item(graph.step(xb, yb)))
    opt.step()


def test_compiled_step_leaves_frozen_parameters(jdev):
    # Regression: the compiled step updated a parameter frozen after it was compiled, from
    # the gradient it had before freezing (the backward computes none for it).
    _, _, eager, eager_opt = _train("jax:cpu", "momentum", steps=0)
    _, _, graph, opt = _train("jax:cpu", "momentum", steps=0)
    step = compile_step(graph, opt)
    xb, yb = _digits(32)
    for frozen in (False, True, False):
        for g in (graph, eager):
            g.named_parameters()["layer1.W"].trainable = not frozen
        want = eager.item(eager.step(xb, yb))
        eager_opt.step()
        assert graph.item(step(xb, yb)) == pytest.approx(want, rel=1e-9)
    for (name, p), q in zip(graph.named_parameters().items(), eager.parameters):
        np.testing.assert_allclose(jdev.to_host(p.value), jdev.to_host(q.value), rtol=1e-9,
                                   err_msg=name)


def test_compiled_clip_of_an_optimizer_over_some_parameters_clips_the_graphs_norm(jdev):
    # clip_norm is clip_grad_norm(graph, c): the norm of every gradient the graph computes,
    # also where the optimizer updates only some parameters (fine-tuning the last layer).
    runs = []
    for compiled in (False, True):
        _, _, graph, _ = _train("jax:cpu", "sgd", steps=0)
        opt = make_optimizer("sgd", [graph.named_parameters()["layer2.W"]], 0.05)
        step = compile_step(graph, opt, clip_norm=0.01)
        for xb, yb in list(Batches(*_digits(), 32, seed=1))[:3]:
            if compiled:
                step(xb, yb)
            else:
                graph.step(xb, yb)
                assert graph.item(gf.optim.clip_grad_norm(graph, 0.01)) > 0.01
                opt.step()
        runs.append({n: jdev.to_host(p.value) for n, p in graph.named_parameters().items()})
    for name, value in runs[0].items():
        np.testing.assert_allclose(runs[1][name], value, rtol=1e-9, atol=1e-15, err_msg=name)


def test_compile_step_refuses_other_node_state(jdev):
    class Counter(gf.Node):  # a node with state of its own, which compile_step cannot carry
        def __init__(self, x):
            gf.Node.__init__(self, [x])
            self.count = 0

        def forward(self):
            self.count += 1
            self.value = self.inbound_nodes[0].value

        def backward(self):
            self.gradients[self.inbound_nodes[0]] = self.upstream_gradient()

        def state_dict(self):
            return {"count": self.count}

    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = mlp(Counter(X), [64, 10], seed=0, name="layer")
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=jdev, dtype="float64",
                     inputs=[X, y])
    with pytest.raises(gf.GraphError, match=r"Counter.*keeps state.*\n.*help:"):
        compile_step(graph, make_optimizer("sgd", graph, 0.1))


def test_compiled_step_refuses_random_numbers_from_a_fixed_seed(jdev):
    class Noise(gf.Node):  # draws from a seed of its own: constant in a compiled step
        def forward(self):
            x = self.inbound_nodes[0].value
            self.value = x + self.device.rng(5).uniform(x.shape, x.dtype)

        def backward(self):
            self.gradients[self.inbound_nodes[0]] = self.upstream_gradient()

    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = mlp(Noise([X]), [64, 10], seed=0, name="layer")
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=jdev, dtype="float64",
                     inputs=[X, y])
    opt = make_optimizer("sgd", graph, 0.1)
    step = compile_step(graph, opt)
    xb, yb = _digits(32)
    step(xb, yb)  # the first step is eager
    with pytest.raises(gf.GraphError, match=r"same at every step.*\n.*help:"):
        step(xb, yb)
    assert np.isfinite(graph.item(graph.step(xb, yb)))  # nothing traced stayed behind


def _float16(loss_scale="dynamic"):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = mlp(X, [64, 16, 10], seed=0, name="layer")
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device="jax:cpu", dtype="float16",
                     inputs=[X, y], loss_scale=loss_scale)
    return graph, gf.optim.SGD(graph, 0.05)


def test_compiled_step_unscales_mixed_precision_gradients(jdev):
    # Regression (issue 18): compile_step ignored mixed precision: the gradients kept the loss
    # scale (8568 where eager gives 0.145) and a float16 graph was NaN after 3 SGD steps.
    eager, eager_opt = _float16()
    graph, opt = _float16()
    step = compile_step(graph, opt)
    xb, yb = _digits(32)
    for _ in range(4):
        want = eager.item(eager.step(xb, yb))
        eager_opt.step()
        assert graph.item(step(xb, yb)) == pytest.approx(want, rel=1e-2)
    assert opt.t == eager_opt.t == 4
    for p, q in zip(graph.parameters, eager.parameters):
        got, want = jdev.to_host(p.gradients[p]), jdev.to_host(q.gradients[q])
        assert got.dtype == np.float32  # unscaled into float32, as eager
        np.testing.assert_allclose(got, want, rtol=0.05, atol=2e-3, err_msg=p.label)
        np.testing.assert_allclose(jdev.to_host(p.value).astype(np.float32),
                                   jdev.to_host(q.value).astype(np.float32), rtol=1e-2,
                                   atol=1e-3, err_msg=p.label)
        np.testing.assert_allclose(jdev.to_host(graph.amp.master[p]),
                                   jdev.to_host(eager.amp.master[q]), rtol=1e-2, atol=1e-4)
    assert graph.amp.scaler.state_dict() == eager.amp.scaler.state_dict()


def test_compiled_step_skips_overflowing_steps_as_eager(jdev):
    eager, eager_opt = _float16()
    graph, opt = _float16()
    step = compile_step(graph, opt)
    xb, yb = _digits(32)
    step(xb, yb)  # the first step is eager
    eager.step(xb, yb)
    eager_opt.step()
    for g in (graph, eager):  # the scaled backward overflows float16: skipped, scale halved
        g.amp.scaler.scale = 2.0 ** 40
    before = {p: jdev.to_host(p.value) for p in graph.parameters}
    master = {p: jdev.to_host(graph.amp.master[p]) for p in graph.parameters}
    for _ in range(3):
        eager.step(xb, yb)
        eager_opt.step()
        step(xb, yb)
    assert graph.amp.scaler.state_dict() == eager.amp.scaler.state_dict() == {
        "scale": 2.0 ** 37, "good_steps": 0, "skipped": 3}
    assert opt.t == eager_opt.t == 1
    for p in graph.parameters:
        np.testing.assert_array_equal(jdev.to_host(p.value), before[p])
        np.testing.assert_array_equal(jdev.to_host(graph.amp.master[p]), master[p])


def test_compiled_step_refuses_a_static_scale_overflow(jdev):
    graph, opt = _float16(loss_scale=1.0)
    step = compile_step(graph, opt)
    xb, yb = _digits(32)
    step(xb, yb)
    graph.amp.scaler.scale = 2.0 ** 40
    values = [jdev.to_host(p.value) for p in graph.parameters]
    with pytest.raises(gf.GraphError, match=r"static loss scale.*\n.*help:"):
        step(xb, yb)
    for p, value in zip(graph.parameters, values):
        np.testing.assert_array_equal(jdev.to_host(p.value), value)
