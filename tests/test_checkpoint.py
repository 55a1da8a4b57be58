"""Checkpoints: resume equals an uninterrupted run, cross-device and cross-dtype loads, atomic
writes (also under SIGKILL), and errors that name the file and leave the model untouched."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import signal
import time

import numpy as np
import pytest
import safetensors

import gpuflow as gf
from conftest import run_epochs
from gpuflow import checkpoint
from gpuflow.checkpoint import io as checkpoint_io
from gpuflow.checkpoint import CHECKPOINT_FORMAT, load, save
from gpuflow.data import Batches, load_digits
from gpuflow.errors import CheckpointError
from gpuflow.layers import mlp
from gpuflow.optim import SGD, Adam, AdamW

N_STEPS, M_STEPS = 7, 5
OPTIMIZERS = {
    "adam": lambda graph: Adam(graph, lr=1e-2),
    "sgd-momentum": lambda graph: SGD(graph, lr=0.1, momentum=0.9),
}


def build(device="cpu", *, seed=0, dtype="float64", sizes=(64, 32, 10), name="layer"):
    """The digits classifier: mlp logits, softmax cross-entropy, a Graph on `device`."""
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = mlp(X, list(sizes), seed=seed, name=name)
    loss = gf.SoftmaxCrossEntropy(y, logits, name="loss")
    return gf.Graph(loss, device=device, dtype=dtype, inputs=[X, y])


@functools.lru_cache(maxsize=None)
def digits(n=160):
    X, y = load_digits()
    return X[:n], y[:n]


def make_batches(seed=3):
    """160 samples in batches of 32: 5 per epoch, so 7 + 5 steps cross two epoch ends."""
    X, y = digits()
    return Batches(X, y, 32, seed=seed)


def stream(batches, index):
    """(batch index, batch) from batch `index` of the current epoch on, epoch after epoch."""
    while True:
        for i, batch in enumerate(batches):
            if i >= index:
                yield i, batch
        index = 0


def train(graph, optimizer, batches, n, index=0, ema=None):
    """n steps (with `ema.update()` after each optimizer step if given); returns the losses and
    the index of the next batch in the current epoch."""
    losses, i = [], index - 1
    it = stream(batches, index)
    for _ in range(n):
        i, (xb, yb) = next(it)
        losses.append(graph.item(graph.step(xb, yb)))
        optimizer.step()
        if ema is not None:
            ema.update()
    return losses, i + 1


def host_params(graph):
    return {name: np.array(graph.device.to_host(p.value), copy=True)
            for name, p in graph.named_parameters().items()}


def host_optim(optimizer):
    return {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else v)
            for k, v in optimizer.state_dict().items()}


def assert_same(actual, expected, *, exact, what):
    assert actual.keys() == expected.keys(), f"{what}: keys {sorted(actual)} != {sorted(expected)}"
    for key in expected:
        a, e = np.asarray(actual[key]), np.asarray(expected[key])
        if exact:
            assert np.array_equal(a, e), (
                f"{what} {key}: max |diff| {np.max(np.abs(a - e))}; first values {a.ravel()[:3]} "
                f"vs {e.ravel()[:3]}")
        else:
            np.testing.assert_allclose(a, e, rtol=1e-12, atol=0, err_msg=f"{what} {key}")


# -- resume ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_resume_equals_uninterrupted(device, tmp_path, opt_name):
    exact = device.name == "cpu"
    make_opt = OPTIMIZERS[opt_name]

    graph = build(device)
    opt = make_opt(graph)
    full_losses, _ = train(graph, opt, make_batches(), N_STEPS + M_STEPS)
    expected_params, expected_optim = host_params(graph), host_optim(opt)

    graph = build(device)
    opt = make_opt(graph)
    batches = make_batches()
    first_losses, index = train(graph, opt, batches, N_STEPS)
    state = {f"batches.{k}": v for k, v in batches.state_dict().items()}
    state["batches.index"] = index
    path = tmp_path / "run.safetensors"
    save(path, graph, opt, step=N_STEPS, epoch=batches.epoch, state=state)

    # a fresh process would build everything anew: other initial weights, other batch seed
    graph = build(device, seed=1)
    opt = make_opt(graph)
    batches = make_batches(seed=99)
    fresh = host_params(graph)
    info = load(path, graph, opt)
    assert info["step"] == N_STEPS and info["epoch"] == 1, info
    assert opt.t == N_STEPS
    batches.load_state_dict({"epoch": info["state"]["batches.epoch"],
                             "seed": info["state"]["batches.seed"]})
    assert (batches.epoch, batches.seed) == (1, 3)
    last_losses, _ = train(graph, opt, batches, M_STEPS, index=info["state"]["batches.index"])

    assert not np.array_equal(fresh["layer1.W"], expected_params["layer1.W"])
    assert_same(host_params(graph), expected_params, exact=exact, what="parameter")
    assert_same(host_optim(opt), expected_optim, exact=exact, what="optimizer state")
    resumed = np.array(first_losses + last_losses)
    if exact:
        assert resumed.tolist() == full_losses, (resumed.tolist(), full_losses)
    else:
        np.testing.assert_allclose(resumed, full_losses, rtol=1e-12, atol=0)


def host_ema(ema):
    return {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else v)
            for k, v in ema.state_dict().items()}


def test_resume_restores_the_ema_bit_for_bit(device, tmp_path):
    """save(..., ema=) / load(..., ema=): the averages and the update count come back bit for
    bit, and the resumed run's averages equal an uninterrupted run's."""
    from gpuflow.optim import EMA
    exact = device.name == "cpu"
    graph = build(device)
    opt, ema = Adam(graph, lr=1e-2), EMA(graph, decay=0.8)
    train(graph, opt, make_batches(), N_STEPS + M_STEPS, ema=ema)
    expected = host_ema(ema)

    graph = build(device)
    opt = Adam(graph, lr=1e-2)
    ema = EMA(graph, decay=0.8)
    _, index = train(graph, opt, make_batches(), N_STEPS, ema=ema)
    saved = host_ema(ema)
    path = tmp_path / "run.safetensors"
    save(path, graph, opt, ema=ema, state={"index": index})
    with safetensors.safe_open(path, framework="numpy") as f:
        assert {k for k in f.keys() if k.startswith("ema/")} == {
            f"ema/{n}" for n in graph.named_parameters()}
    with ema.swapped(), pytest.raises(CheckpointError, match="swapped"):
        save(tmp_path / "other.safetensors", graph, opt, ema=ema)

    graph = build(device, seed=1)
    opt = Adam(graph, lr=1e-2)
    ema = EMA(graph, decay=0.8)
    load(path, graph, opt, ema=ema)
    assert ema.n_averaged == N_STEPS
    assert_same(host_ema(ema), saved, exact=True, what="EMA state after load")
    assert all(device.owns(a) for a in ema.average.values())
    batches = make_batches()
    for _ in range(N_STEPS // 5):  # the epochs the first run went through
        list(batches)
    train(graph, opt, batches, M_STEPS, index=index, ema=ema)
    assert_same(host_ema(ema), expected, exact=exact, what="EMA state")

    # a checkpoint without an EMA refuses one, and changes nothing
    plain = tmp_path / "plain.safetensors"
    save(plain, graph, opt)
    before = host_params(graph)
    with pytest.raises(CheckpointError, match="holds no EMA"):
        load(plain, graph, opt, ema=ema)
    assert_same(host_params(graph), before, exact=True, what="parameter")
    load(path, graph, opt)  # and one with an EMA loads without it


def test_resume_without_optimizer_state_differs(tmp_path):
    """The resume test above can fail: a fresh Adam (t = 0, no moments) gives other weights."""
    graph = build()
    opt = Adam(graph, lr=1e-2)
    train(graph, opt, make_batches(), N_STEPS + M_STEPS)
    expected = host_params(graph)

    graph = build()
    opt = Adam(graph, lr=1e-2)
    batches = make_batches()
    _, index = train(graph, opt, batches, N_STEPS)
    save(tmp_path / "c.safetensors", graph, opt)
    graph = build(seed=1)
    opt = Adam(graph, lr=1e-2)
    load(tmp_path / "c.safetensors", graph)  # parameters only
    batches.epoch = 1
    train(graph, opt, batches, M_STEPS, index=index)
    assert not np.array_equal(host_params(graph)["layer1.W"], expected["layer1.W"])


# -- devices and dtypes ---------------------------------------------------------------------------
def trained(device="cpu", *, dtype="float64", steps=3, make_opt=OPTIMIZERS["adam"]):
    graph = build(device, dtype=dtype)
    opt = make_opt(graph)
    train(graph, opt, make_batches(), steps)
    return graph, opt


def assert_all_on(graph, opt, device):
    for name, p in graph.named_parameters().items():
        assert device.owns(p.value), f"{name} is {type(p.value).__name__}, not on {device.name}"
        assert p.value.dtype == graph.dtype, f"{name} has dtype {p.value.dtype}"
    for p in opt.params:
        assert opt.state[p], f"no optimizer state for {p.name}"
        for key, buf in opt.state[p].items():
            assert device.owns(buf), f"optimizer {p.name}/{key} not on {device.name}"
            assert buf.dtype == graph.dtype, f"optimizer {p.name}/{key} has dtype {buf.dtype}"


def test_load_onto_each_device_and_back(device, tmp_path):
    src, src_opt = trained("cpu")
    save(tmp_path / "cpu.safetensors", src, src_opt, step=3)
    graph = build(device, seed=1)
    opt = Adam(graph, lr=1e-2)
    load(tmp_path / "cpu.safetensors", graph, opt)
    assert_all_on(graph, opt, device)
    assert_same(host_params(graph), host_params(src), exact=True, what="parameter")
    assert_same(host_optim(opt), host_optim(src_opt), exact=True, what="optimizer state")

    save(str(tmp_path / "dev.safetensors"), graph, opt, step=3)
    back = build("cpu", seed=2)
    back_opt = Adam(back, lr=1e-2)
    info = load(str(tmp_path / "dev.safetensors"), back, back_opt)
    assert info["meta"]["device"] == device.name
    assert_same(host_params(back), host_params(src), exact=True, what="parameter")
    assert_same(host_optim(back_opt), host_optim(src_opt), exact=True, what="optimizer state")


def test_chain_cpu_strict_device1_torch_cpu(tmp_path):
    pytest.importorskip("array_api_strict")
    src, src_opt = trained("cpu", make_opt=OPTIMIZERS["sgd-momentum"])
    expected, expected_optim = host_params(src), host_optim(src_opt)
    specs = ["array_api_strict:device1", "torch:cpu", "cpu"]
    if not any(d.startswith("torch") for d in gf.available_devices()):
        specs.remove("torch:cpu")
    path = tmp_path / "hop0.safetensors"
    save(path, src, src_opt)
    for hop, spec in enumerate(specs, start=1):
        device = gf.get_device(spec)
        graph = build(device, seed=hop)
        opt = SGD(graph, lr=0.1, momentum=0.9)
        load(path, graph, opt)
        assert_all_on(graph, opt, device)
        assert_same(host_params(graph), expected, exact=True, what=f"{spec} parameter")
        assert_same(host_optim(opt), expected_optim, exact=True, what=f"{spec} optimizer")
        path = tmp_path / f"hop{hop}.safetensors"
        save(path, graph, opt)


def test_float64_checkpoint_loads_as_float32(device, tmp_path):
    src, src_opt = trained("cpu", dtype="float64")
    save(tmp_path / "f64.safetensors", src, src_opt)
    graph = build(device, seed=1, dtype="float32")
    opt = Adam(graph, lr=1e-2)
    info = load(tmp_path / "f64.safetensors", graph, opt)
    assert info["meta"]["dtype"] == "float64"
    assert_all_on(graph, opt, device)
    got = host_params(graph)
    for name, value in host_params(src).items():
        assert got[name].dtype == np.float32, f"{name}: {got[name].dtype}"
        assert np.array_equal(got[name], value.astype(np.float32)), name
    for key, value in host_optim(src_opt).items():
        if key != "t":
            assert np.array_equal(host_optim(opt)[key], value.astype(np.float32)), key


def test_float32_checkpoint_loads_as_float64(tmp_path):
    src, src_opt = trained("cpu", dtype="float32")
    save(tmp_path / "f32.safetensors", src, src_opt)
    graph = build("cpu", seed=1, dtype="float64")
    load(tmp_path / "f32.safetensors", graph)
    for name, value in host_params(src).items():
        got = host_params(graph)[name]
        assert got.dtype == np.float64 and np.array_equal(got, value.astype(np.float64)), name


# -- file layout and extra state ------------------------------------------------------------------
def test_file_layout_and_metadata(tmp_path):
    """An ordinary safetensors file: any safetensors reader sees the tensors and metadata."""
    graph, opt = trained("cpu")
    path = tmp_path / "c.safetensors"
    save(path, graph, opt, step=3, epoch=0, state={"note": "x", "a": np.arange(2)})
    with safetensors.safe_open(path, framework="numpy") as f:
        files = set(f.keys())
        metadata = f.metadata()
        w = f.get_tensor("param/layer1.W")
    meta = json.loads(metadata["gpuflow"])
    names = list(graph.named_parameters())
    assert files == ({"state/a"} | {f"param/{n}" for n in names}
                     | {f"optim/{n}/{b}" for n in names for b in ("m", "v")})
    assert np.array_equal(w, host_params(graph)["layer1.W"])
    assert metadata["format"] == meta["format"] == "gpuflow-checkpoint"
    assert metadata["format_version"] == str(CHECKPOINT_FORMAT) == "2"
    assert meta["format_version"] == CHECKPOINT_FORMAT == checkpoint.CHECKPOINT_FORMAT
    assert metadata["gpuflow_version"] == meta["gpuflow_version"] == gf.__version__
    arch = json.loads(metadata["architecture"])
    assert [(n["name"], n["type"]) for n in arch if n["type"] == "Linear"] == [
        ("layer1", "Linear"), ("layer2", "Linear")]
    assert {"name": "layer2", "type": "Linear",
            "inputs": ["layer1.relu", "layer2.W", "layer2.b"]} in arch
    assert meta["dtype"] == "float64"
    assert [p["name"] for p in meta["parameters"]] == names
    assert meta["parameters"][0]["shape"] == [64, 32]
    assert meta["optimizer"]["class"] == "Adam" and meta["optimizer"]["t"] == 3
    assert meta["optimizer"]["hyper"] == {"lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8,
                                          "weight_decay": 0.0}
    assert (meta["step"], meta["epoch"]) == (3, 0)
    info = load(path, build(seed=1))
    assert info["meta"]["architecture"] == metadata["architecture"]
    assert {k: v for k, v in info["meta"].items() if k != "architecture"} == meta


_SAVE_THREE_TIMES = """
import sys
import numpy as np
import gpuflow as gf
from gpuflow.checkpoint import export_weights, save
from gpuflow.data import load_digits
from gpuflow.optim import Adam, StepLR

X, y = gf.Input(name="X"), gf.Input(name="y")
logits, _ = gf.layers.lenet(X, (1, 8, 8), 10, hidden=16, channels=(4,), dropout=0.25,
                            batch_norm=True, seed=3)
graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device="cpu", dtype="float32",
                 inputs=[X, y])
opt = Adam(graph, lr=1e-2)
schedule = StepLR(opt, step_size=1)
images, labels = load_digits()
for _ in range(2):
    graph.step(images[:32].reshape(-1, 1, 8, 8), labels[:32])
    opt.step()
schedule.step()
state = {"seen": 64, "names": np.array(["a", "bc"]), "order": [3, 1, 2], "rate": 0.5}
out = sys.argv[1]
for i in range(3):  # three saves in one process too
    save(f"{out}/c{i}.safetensors", graph, opt, schedule=schedule, step=2, epoch=1, state=state)
    export_weights(graph, f"{out}/t{i}.safetensors")
    export_weights(graph, f"{out}/g{i}.safetensors", layout="gpuflow")
"""


def test_the_same_state_saves_the_same_bytes(tmp_path):
    """Issue 18 item 24: the same state gives the same file, byte for byte, across processes
    (PYTHONHASHSEED 0 and 1) and saves (safetensors' metadata map came out in a random order
    each time): checkpoints and exported weights of both layouts, which users can hash."""
    import subprocess
    import sys
    script = tmp_path / "save.py"
    script.write_text(_SAVE_THREE_TIMES)
    repo = str(pathlib.Path(__file__).resolve().parents[1])
    for seed in ("0", "1"):
        out = tmp_path / seed
        out.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed,
               "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
        run = subprocess.run([sys.executable, str(script), str(out)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
    for kind in ("c", "t", "g"):
        files = [tmp_path / seed / f"{kind}{i}.safetensors" for seed in "01" for i in range(3)]
        first = files[0].read_bytes()
        assert all(f.read_bytes() == first for f in files), f"{kind}: the bytes differ"
    with safetensors.safe_open(files[0], framework="numpy") as f:  # still a safetensors file
        assert f.metadata()["format"] == "gpuflow-weights"


def test_pytorch_reads_the_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file
    graph, opt = trained("cpu")
    save(tmp_path / "c.safetensors", graph, opt)
    tensors = load_file(tmp_path / "c.safetensors")
    for name, value in host_params(graph).items():
        assert torch.equal(tensors[f"param/{name}"], torch.from_numpy(value)), name


def test_extra_state_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    rng.random(3)
    rng_state = rng.bit_generator.state
    state = {
        "int": 7, "negative": -5, "big": 2**100 + 1, "zero": 0, "flag": True, "off": False,
        "float": 0.1, "third": 1 / 3, "tiny": 5e-324, "neg_zero": -0.0, "inf": float("inf"),
        "nan": float("nan"),
        "str": "héllo ✓", "empty": "", "np_int": np.int64(9), "np_float": np.float32(0.5),
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "u64": np.array([2**64 - 1, 0], dtype=np.uint64),
        "scalar0d": np.array(3.25), "bools": np.array([True, False]),
        "names": np.array(["a", "béta"]), "none_yet": np.zeros((0, 4)),
        "rng/state": rng_state["state"]["state"], "rng/inc": rng_state["state"]["inc"],
        "rng/bit_generator": rng_state["bit_generator"], "c64": np.array([1 + 2j, -0.5j], "c8"),
        "c128": np.array([[1e300 + 1j]]), "bytes": np.array([b"ab", b"\xff"]),
        "list": [1, 2.5, True, 2**70], "empty_list": [], "f16": np.array([0.1], np.float16),
    }
    save(pathlib.Path(tmp_path) / "s.safetensors", build(), state=state, step=11, epoch=2)
    info = load(pathlib.Path(tmp_path) / "s.safetensors", build(seed=1))
    got = info["state"]
    assert (info["step"], info["epoch"]) == (11, 2)
    assert got.keys() == state.keys()
    for key, want in state.items():
        value = got[key]
        if isinstance(want, np.ndarray):
            assert isinstance(value, np.ndarray), key
            assert value.dtype == want.dtype and value.shape == want.shape, (key, value)
            assert np.array_equal(value, want), key
        elif isinstance(want, list):
            assert value == want and [type(v) for v in value] == [type(v) for v in want], key
        elif isinstance(want, float) and np.isnan(want):
            assert isinstance(value, float) and np.isnan(value)
        else:
            expected_type = type(want.item()) if isinstance(want, np.generic) else type(want)
            assert type(value) is expected_type, (key, type(value))
            assert value == want, key
    assert str(got["neg_zero"]) == "-0.0"
    again = np.random.Generator(getattr(np.random, got["rng/bit_generator"])())
    again.bit_generator.state = {"bit_generator": got["rng/bit_generator"],
                                 "state": {"state": got["rng/state"], "inc": got["rng/inc"]},
                                 "has_uint32": 0, "uinteger": 0}
    assert np.array_equal(again.random(4), rng.random(4))


@pytest.mark.parametrize("value, kind", [
    ({"nested": 1}, "dict"), ([[1], [2]], "list"), (["a"], "list"), (None, "NoneType"),
    (np.array([object()], dtype=object), "dtype object")])
def test_state_values_that_need_pickle_are_refused(tmp_path, value, kind):
    with pytest.raises(CheckpointError, match=f"state\\['bad'\\] is .*{kind}.*without pickling"):
        save(tmp_path / "c.safetensors", build(), state={"bad": value})
    assert os.listdir(tmp_path) == []


def test_dtypes_safetensors_cannot_hold_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="'state/bad' has dtype float128, which a "
                                              "safetensors file cannot hold"):
        save(tmp_path / "c.safetensors", build(), state={"bad": np.ones(2, np.longdouble)})
    assert os.listdir(tmp_path) == []


def test_bad_step_and_path_types(tmp_path):
    with pytest.raises(CheckpointError, match="step must be an int, got 1.5"):
        save(tmp_path / "c.safetensors", build(), step=1.5)
    with pytest.raises(CheckpointError, match="str or os.PathLike, got int"):
        save(3, build())
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*no_such_dir"):
        save(tmp_path / "no_such_dir" / "c.safetensors", build())


# -- atomic writes --------------------------------------------------------------------------------
def saved_pair(tmp_path):
    """A graph with a checkpoint of its current values at path, then changed values."""
    graph, opt = trained("cpu")
    path = tmp_path / "c.safetensors"
    save(path, graph, opt, step=3)
    old = host_params(graph)
    train(graph, opt, make_batches(), 2)
    return graph, opt, path, old


def assert_holds(path, expected):
    graph = build(seed=1)
    load(path, graph)
    assert_same(host_params(graph), expected, exact=True, what=f"{path.name} parameter")


def test_failed_replace_keeps_previous_checkpoint(tmp_path, monkeypatch):
    graph, opt, path, old = saved_pair(tmp_path)

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*No space left.*"
                                              "previous file there .* is untouched"):
        save(path, graph, opt, step=5)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["c.safetensors"]
    assert_holds(path, old)
    save(path, graph, opt, step=5)  # and a later save works
    assert os.listdir(tmp_path) == ["c.safetensors"]
    assert_holds(path, host_params(graph))


@pytest.mark.parametrize("error", [RuntimeError("writer broke"), KeyboardInterrupt()])
def test_writer_dying_midway_keeps_previous_checkpoint(tmp_path, monkeypatch, error):
    graph, opt, path, old = saved_pair(tmp_path)
    real_write = checkpoint_io.write_all

    def half_then_fail(f, data):
        real_write(f, data[: len(data) // 2])
        raise error

    monkeypatch.setattr(checkpoint_io, "write_all", half_then_fail)
    with pytest.raises(type(error)):
        save(path, graph, opt, step=5)
    assert os.listdir(tmp_path) == ["c.safetensors"]
    assert_holds(path, old)


def test_failed_fsync_keeps_previous_checkpoint(tmp_path, monkeypatch):
    graph, opt, path, old = saved_pair(tmp_path)

    def fail(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(CheckpointError, match="Input/output error"):
        save(path, graph, opt)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["c.safetensors"]
    assert_holds(path, old)


def test_saved_file_has_ordinary_permissions(tmp_path):
    save(tmp_path / "c.safetensors", build())
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(tmp_path / "c.safetensors").st_mode & 0o777 == 0o666 & ~umask


KILLS = 50


def saver_graph(seed=1):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = mlp(X, [64, 128, 10], seed=seed)
    return gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device="cpu", dtype="float64",
                    inputs=[X, y])


def _save_forever(path, gen, out_fd):
    """The child: save generation after generation, each one all `gen`, reporting each."""
    graph = saver_graph(seed=0)
    big = np.empty(100_000)
    while True:
        gen += 1
        for p in graph.parameters:
            p.value = np.full(p.shape, float(gen))
        big[:] = gen
        save(path, graph, step=gen, state={"gen": gen, "big": big})
        os.write(out_fd, f"{gen}\n".encode())


def assert_consistent_generation(path, graph):
    """The file is one whole checkpoint: step, extra state and every value from one save."""
    info = load(path, graph)
    gen = info["step"]
    assert info["state"]["gen"] == gen
    assert np.all(info["state"]["big"] == gen), f"big array mixes generations (step {gen})"
    for name, value in host_params(graph).items():
        assert np.all(value == gen), f"{name} is not all {gen}: {np.unique(value)[:5]}"
    return gen


@pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"),
                    reason="needs fork and SIGKILL (POSIX)")
def test_sigkill_during_save_leaves_old_or_new_checkpoint(tmp_path):
    """50 savers killed with SIGKILL at random points of a save loop: the file left is always
    one whole earlier-or-later checkpoint, never a mix, and never gone. The savers are forked
    from this process (a fresh interpreter per kill would cost 0.4 s of imports each)."""
    ckdir = tmp_path / "ck"
    ckdir.mkdir()
    path = ckdir / "c.safetensors"
    graph = saver_graph()
    rng = np.random.default_rng(0)
    gen, started = 0, time.monotonic()
    for kill in range(KILLS):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            try:
                os.close(read_fd)
                _save_forever(str(path), gen, write_fd)
            finally:
                os._exit(1)
        os.close(write_fd)
        try:
            with os.fdopen(read_fd, "rb", buffering=0) as pipe:
                first = pipe.readline()  # one whole save done: the loop is running
                assert first, f"saver {kill} died before its first save"
                time.sleep(rng.uniform(0.0, 0.03))
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        new_gen = assert_consistent_generation(path, graph)
        assert new_gen >= int(first) > gen, (kill, gen, first, new_gen)
        gen = new_gen
    # a SIGKILL cannot clean up; what it leaves is only hidden temp files, never at `path`
    names = os.listdir(ckdir)
    print(f"{KILLS} kills, {len(names) - 1} interrupted mid-write (temp files left), "
          f"last gen {gen}")
    assert all(n == "c.safetensors" or (n.startswith(".c.safetensors.") and
                                        n.endswith(".tmp")) for n in names), names
    assert time.monotonic() - started < 30, "the kill loop is too slow for CI"


# -- errors: nothing changes ----------------------------------------------------------------------


# -- node state and schedules -----------------------------------------------------------------
class Centre(gf.Node):
    """A fake stateful node (as BatchNorm's running statistics): outputs x minus a running mean
    of the batches it has seen, which it updates at every forward; the gradient passes."""

    def __init__(self, x, n, *, name=None):
        super().__init__([x], name=name)
        self.n, self.mean, self.count = n, None, 0

    def forward(self):
        x = self.inbound_nodes[0].value
        if self.mean is None:
            self.mean = self.device.put(np.zeros(self.n), x.dtype, what="mean")
        self.value = x - self.mean
        self.mean = self.mean + 0.25 * (self.xp.mean(x, axis=0) - self.mean)
        self.count += 1

    def backward(self):
        self.gradients = {self.inbound_nodes[0]: self.upstream_gradient()}

    def state_dict(self):
        return {} if self.mean is None else {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state):
        self.mean, self.count = state["mean"], state["count"]


def build_centred(device="cpu", *, seed=0, name="centre"):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    hidden, _ = mlp(X, [64, 16], seed=seed, name="enc")
    centred = Centre(hidden, 16, name=name)
    logits, _ = mlp(centred, [16, 10], seed=seed + 1, name="head")
    loss = gf.SoftmaxCrossEntropy(y, logits, name="loss")
    graph = gf.Graph(loss, device=device, dtype="float64", inputs=[X, y])
    return graph, centred


class Halving:
    """A fake schedule: halves the optimizer's rate at every step (once per epoch)."""

    def __init__(self, optimizer):
        self.optimizer, self.last_epoch = optimizer, 0

    def step(self):
        self.last_epoch += 1
        self.optimizer.lr = self.optimizer.lr / 2

    def state_dict(self):
        return {"last_epoch": self.last_epoch, "lr": self.optimizer.lr}

    def load_state_dict(self, state):
        self.last_epoch, self.optimizer.lr = state["last_epoch"], state["lr"]


def test_node_and_schedule_state_resume_exactly(tmp_path):
    graph, centre = build_centred()
    opt = SGD(graph, lr=0.1, momentum=0.9)
    expected = run_epochs(graph, opt, Halving(opt), make_batches(), 4)
    expected_mean = host_params(graph), np.array(centre.mean)

    graph, centre = build_centred()
    opt = SGD(graph, lr=0.1, momentum=0.9)
    schedule, batches = Halving(opt), make_batches()
    first = run_epochs(graph, opt, schedule, batches, 2)
    save(tmp_path / "c.safetensors", graph, opt, schedule=schedule, epoch=2,
         state={"seed": batches.seed})
    with safetensors.safe_open(tmp_path / "c.safetensors", framework="numpy") as f:
        assert np.array_equal(f.get_tensor("node/centre/mean"), centre.mean)
        assert int(f.get_tensor("node/centre/count")) == 10

    graph, centre = build_centred(seed=5)
    opt = SGD(graph, lr=0.1, momentum=0.9)
    schedule = Halving(opt)
    graph.step(*digits(32))  # the fresh node has state of its own, which the load replaces
    info = load(tmp_path / "c.safetensors", graph, opt, schedule=schedule)
    assert (schedule.last_epoch, opt.lr, centre.count) == (2, 0.025, 10)
    assert type(centre.count) is int and isinstance(centre.mean, np.ndarray)
    batches = make_batches(seed=info["state"]["seed"])
    batches.epoch = info["epoch"]
    rest = run_epochs(graph, opt, schedule, batches, 2)
    assert first + rest == expected
    assert np.array_equal(centre.mean, expected_mean[1])
    assert_same(host_params(graph), expected_mean[0], exact=True, what="parameter")


def test_node_state_matters(tmp_path):
    """The test above can fail: without the node's state the resumed losses differ."""
    graph, centre = build_centred()
    graph.step(*digits(32))
    save(tmp_path / "c.safetensors", graph)
    other, other_centre = build_centred()
    other.step(*digits(32))
    other.step(*digits(32))
    assert not np.array_equal(other_centre.mean, centre.mean)
    load(tmp_path / "c.safetensors", other)
    assert np.array_equal(other_centre.mean, centre.mean)


def test_node_state_round_trip_on_each_device(device, tmp_path):
    src, src_centre = build_centred()
    src.step(*digits(32))
    save(tmp_path / "c.safetensors", src)
    graph, centre = build_centred(device, seed=3)
    graph.step(*digits(32))
    graph.step(*digits(32))
    load(tmp_path / "c.safetensors", graph)
    assert device.owns(centre.mean) and centre.count == 1
    assert np.array_equal(np.asarray(device.to_host(centre.mean)), src_centre.mean)
    save(tmp_path / "d.safetensors", graph)
    back, back_centre = build_centred(seed=4)
    back.step(*digits(32))
    load(tmp_path / "d.safetensors", back)
    assert np.array_equal(back_centre.mean, src_centre.mean)


def test_node_state_that_does_not_fit_is_refused(tmp_path):
    src, _ = build_centred()
    src.step(*digits(32))
    save(tmp_path / "c.safetensors", src)
    graph, centre = build_centred(name="other")
    graph.step(*digits(32))
    before = np.array(centre.mean)
    with pytest.raises(CheckpointError) as info:
        load(tmp_path / "c.safetensors", graph)
    message = str(info.value)
    assert "Centre 'other' ('other': ['count', 'mean']) is missing from the checkpoint" in message
    assert "node state 'centre' is in the checkpoint but not in this model" in message
    assert np.array_equal(centre.mean, before) and centre.count == 1
    plain = build()  # no stateful node: the checkpoint's node state is refused too
    with pytest.raises(CheckpointError, match="node state 'centre' is in the checkpoint"):
        load(tmp_path / "c.safetensors", plain)


@pytest.mark.parametrize("saved, given, message", [
    (None, Halving, "holds no schedule state, but load was given Halving"),
    (Halving, type("StepLR", (Halving,), {}), "a Halving schedule, but load was given StepLR"),
])
def test_other_schedule_is_refused(tmp_path, saved, given, message):
    graph, opt = trained("cpu")
    save(tmp_path / "c.safetensors", graph, opt, schedule=saved(opt) if saved else None)
    schedule = given(opt)
    lr, before = opt.lr, snapshot(graph, opt)
    with pytest.raises(CheckpointError, match=message):
        load(tmp_path / "c.safetensors", graph, opt, schedule=schedule)
    assert opt.lr == lr and schedule.last_epoch == 0
    assert_unchanged(graph, opt, before)


def build_bn(device="cpu", seed=0):
    """Linear, BatchNorm (running statistics: node state), ReLU, Linear."""
    X, y = gf.Input(name="X"), gf.Input(name="y")
    h, _ = gf.layers.dense(X, 64, 16, name="fc1", rng=seed)
    h, _ = gf.layers.batchnorm(h, 16, name="bn")
    logits, _ = gf.layers.dense(gf.ReLU(h), 16, 10, name="fc2", rng=seed + 1)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=device, dtype="float64",
                     inputs=[X, y])
    return graph, h


def test_batchnorm_and_steplr_resume_exactly(tmp_path):
    from gpuflow.optim import StepLR
    graph, bn = build_bn()
    opt = Adam(graph, lr=1e-2)
    expected = run_epochs(graph, opt, StepLR(opt, 1, gamma=0.5), make_batches(), 4)
    expected_stats = {k: np.array(v) for k, v in bn.state_dict().items()}

    graph, bn = build_bn()
    opt = Adam(graph, lr=1e-2)
    schedule, batches = StepLR(opt, 1, gamma=0.5), make_batches()
    first = run_epochs(graph, opt, schedule, batches, 2)
    save(tmp_path / "bn.safetensors", graph, opt, schedule=schedule, epoch=2)

    graph, bn = build_bn(seed=7)  # a fresh process: nothing run yet, statistics on the host
    opt = Adam(graph, lr=1e-2)
    schedule = StepLR(opt, 1, gamma=0.5)
    load(tmp_path / "bn.safetensors", graph, opt, schedule=schedule)
    assert opt.lr == 1e-2 / 4 and schedule.last_epoch == 2
    batches = make_batches()
    batches.epoch = 2
    assert first + run_epochs(graph, opt, schedule, batches, 2) == expected
    for key, value in bn.state_dict().items():
        assert np.array_equal(value, expected_stats[key]), key


# -- file names and formats -------------------------------------------------------------------
def test_a_name_ending_in_npz_is_refused_with_the_fix(tmp_path):
    with pytest.raises(CheckpointError) as info:
        save(tmp_path / "run.npz", build())
    assert "writes safetensors checkpoints, not .npz" in str(info.value)
    assert str(info.value).endswith(f"help: save to {str(tmp_path / 'run.safetensors')!r}.")
    assert os.listdir(tmp_path) == []


def test_load_goes_by_content_not_name(tmp_path):
    """A safetensors checkpoint called .npz and an old .npz called .safetensors both load."""
    from legacy_npz import legacy_save
    graph, opt = trained("cpu")
    save(tmp_path / "new.ckpt", graph, opt, step=3)
    (tmp_path / "new.ckpt").rename(tmp_path / "new.npz")
    legacy_save(tmp_path / "old.safetensors", graph, opt, step=4)
    for name, step in [("new.npz", 3), ("old.safetensors", 4)]:
        other = build(seed=1)
        assert load(tmp_path / name, other, Adam(other))["step"] == step
        assert_same(host_params(other), host_params(graph), exact=True, what=name)


# -- errors: nothing changes ----------------------------------------------------------------------
def snapshot(graph, opt):
    return {"objects": {n: p.value for n, p in graph.named_parameters().items()},
            "values": host_params(graph), "state_obj": opt.state, "t": opt.t,
            "buffers": {(p.name, k): b for p in opt.params for k, b in opt.state[p].items()},
            "optim": host_optim(opt)}


def assert_unchanged(graph, opt, before):
    after = snapshot(graph, opt)
    for name, obj in before["objects"].items():
        assert after["objects"][name] is obj, f"{name} was reassigned by a failed load"
    assert_same(after["values"], before["values"], exact=True, what="parameter")
    assert opt.state is before["state_obj"] and opt.t == before["t"]
    assert after["buffers"].keys() == before["buffers"].keys()
    for key, obj in before["buffers"].items():
        assert after["buffers"][key] is obj, f"optimizer buffer {key} was replaced"
    assert_same(after["optim"], before["optim"], exact=True, what="optimizer state")


@pytest.mark.parametrize("saved, given, message", [
    (Adam, SGD, "optimizer state of class Adam, but load was given SGD"),
    (Adam, AdamW, "optimizer state of class Adam, but load was given AdamW"),
    (SGD, Adam, "optimizer state of class SGD, but load was given Adam"),
    (None, Adam, "holds no optimizer state, but load was given Adam"),
])
def test_other_optimizer_class_is_refused(tmp_path, saved, given, message):
    src, src_opt = trained("cpu", make_opt=(lambda g: saved(g, lr=0.1)) if saved else
                           OPTIMIZERS["adam"])
    save(tmp_path / "c.safetensors", src, src_opt if saved else None)
    graph, opt = trained("cpu", steps=2, make_opt=lambda g: given(g, lr=0.1))
    before = snapshot(graph, opt)
    with pytest.raises(CheckpointError, match=message):
        load(tmp_path / "c.safetensors", graph, opt)
    assert_unchanged(graph, opt, before)


def test_optimizer_none_loads_parameters_only(tmp_path):
    src, src_opt = trained("cpu")
    save(tmp_path / "c.safetensors", src, src_opt)
    graph, opt = trained("cpu", steps=1, make_opt=OPTIMIZERS["sgd-momentum"])
    before = snapshot(graph, opt)
    load(tmp_path / "c.safetensors", graph)
    assert_same(host_params(graph), host_params(src), exact=True, what="parameter")
    assert opt.t == before["t"] and opt.state is before["state_obj"]


@pytest.mark.parametrize("fail_at", [1, 3, 4, 5, 12])
def test_failure_while_moving_to_device_changes_nothing(tmp_path, monkeypatch, fail_at):
    """Puts 1-4 are the parameters, 5-12 Adam's buffers: whichever fails, nothing is assigned."""
    src, src_opt = trained("cpu")
    save(tmp_path / "c.safetensors", src, src_opt)
    graph, opt = trained("cpu", steps=2)
    before = snapshot(graph, opt)
    device, calls = graph.device, []
    real_put = device.put

    def put(value, dtype=None, *, what="array"):
        calls.append(what)
        if len(calls) == fail_at:
            raise gf.DeviceError(f"out of memory putting {what}")
        return real_put(value, dtype, what=what)

    monkeypatch.setattr(device, "put", put)
    with pytest.raises(gf.DeviceError, match="out of memory"):
        load(tmp_path / "c.safetensors", graph, opt)
    assert_unchanged(graph, opt, before)
    monkeypatch.undo()
    load(tmp_path / "c.safetensors", graph, opt)
    assert_same(host_params(graph), host_params(src), exact=True, what="parameter")


# -- mixed precision ------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the scale backs off
def test_mixed_precision_resumes_exactly(tmp_path):
    """A float16 graph trains float32 master weights under a loss scale: the checkpoint holds
    the masters (param/<name>, float32) and the scaler's state, so a resumed run is the same."""
    def make(seed=0):
        graph = build(dtype="float16", seed=seed)
        graph.amp.scaler.growth_interval = 3  # the scale moves within the test
        return graph, Adam(graph, lr=1e-2)

    graph, opt = make()
    full, _ = train(graph, opt, make_batches(), N_STEPS + M_STEPS)
    expected = {p.name: np.array(graph.amp.master[p]) for p in graph.parameters}
    expected_scale = graph.amp.scaler.state_dict()

    graph, opt = make()
    batches = make_batches()
    first, index = train(graph, opt, batches, N_STEPS)
    save(tmp_path / "amp.safetensors", graph, opt, epoch=batches.epoch,
         state={"index": index})
    scale = graph.amp.scaler.state_dict()
    with safetensors.safe_open(tmp_path / "amp.safetensors", framework="numpy") as f:
        w = f.get_tensor("param/layer1.W")
    assert w.dtype == np.float32 and np.array_equal(w, graph.amp.master[graph.parameters[0]])

    graph, opt = make(seed=1)
    info = load(tmp_path / "amp.safetensors", graph, opt)
    assert graph.amp.scaler.state_dict() == scale and scale["scale"] != 2.0 ** 16
    assert graph.parameters[0].value.dtype == np.float16
    batches = make_batches()
    batches.epoch = info["epoch"]
    rest, _ = train(graph, opt, batches, M_STEPS, index=info["state"]["index"])
    assert first + rest == full
    assert graph.amp.scaler.state_dict() == expected_scale
    for p in graph.parameters:
        assert np.array_equal(graph.amp.master[p], expected[p.name]), p.name

    plain = build(dtype="float32", seed=2)  # into a float32 graph: the masters, exactly
    load(tmp_path / "amp.safetensors", plain)
    assert np.array_equal(plain.parameters[0].value, w)
