"""The `gpuflow` command: train, devices, bench dispatch, and one-line errors for user mistakes.

Most tests call `main([...])` in-process and read stdout/stderr with capsys; two go through
`python -m gpuflow` in a subprocess. The --save/--resume tests need gpuflow.checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import gpuflow as gf
from gpuflow import LEDGER, Graph, Input, SoftmaxCrossEntropy, get_device, mlp
from gpuflow.cli import TrainOptions, build_parser, held_out_accuracy, main, train

from conftest import keep_save

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--hidden", "16"]   # keeps in-process runs to a fraction of a second
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _one_error_line(err: str, prog: str = "gpuflow train") -> str:
    """The single stderr line of a failed command, checked to be worded as every gpuflow
    command words its mistakes: '<prog>: error: <message> ... help: <fix>'."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert " help: " in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def _gpuflow_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file: magic (0, 0, 0x08 = uint8, ndim), big-endian dims, bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    path.write_bytes(header + array.tobytes())


def write_tiny_mnist(folder: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> Path:
    """A synthetic MNIST-layout folder: class k is a bright 4x4 square at a k-dependent spot."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            r, c = 2 + 2 * int(k), 4 + 2 * int(k)
            images[i, r:r + 4, c:c + 4] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return folder


# -- train ---------------------------------------------------------------------------------------
def test_train_two_epochs_quiet(capsys):
    assert main(["train", "--epochs", "2", "--quiet", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "final test accuracy: " in out
    assert "device: " in out and "time: " in out
    assert "epoch   1/2" not in out  # --quiet keeps only the summary


def test_train_prints_one_line_per_epoch(capsys):
    assert main(["train", "--epochs", "3", "--device", "cpu", *SMALL]) == 0
    out = capsys.readouterr().out
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 3
    assert all("train loss" in line and "test accuracy" in line for line in epoch_lines)
    assert "device: cpu (NumPy" in out


def test_default_run_reaches_95_percent():
    """`gpuflow train` with no arguments: >= 0.95 held-out accuracy in well under a minute."""
    result = train()
    print(f"default run: accuracy {result['accuracy']:.4f} in {result['seconds']:.2f} s "
          f"on {result['device']}")
    assert result["accuracy"] >= 0.95
    assert result["seconds"] < 30.0
    assert len(result["losses"]) == len(result["accuracies"]) == TrainOptions().epochs
    assert result["losses"][-1] < result["losses"][0]


def test_train_on_strict_second_device_float64(capsys):
    argv = ["train", "--device", "array_api_strict:device1", "--dtype", "float64",
            "--epochs", "2", "--quiet", *SMALL]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "device: array_api_strict:device1" in out


def test_same_weights_and_losses_on_cpu_and_strict():
    """Seeded weights and batch order are device-independent, so float64 runs agree closely."""
    opts = dict(epochs=2, dtype="float64", hidden=(16,), quiet=True)
    cpu = train({**opts, "device": "cpu"})
    strict = train({**opts, "device": "array_api_strict:device1"})
    np.testing.assert_allclose(cpu["losses"], strict["losses"], rtol=1e-10)
    assert cpu["accuracies"] == strict["accuracies"]


def test_optimizers_and_hidden_layers(capsys):
    for name, lr in (("sgd", "0.1"), ("momentum", "0.05"), ("nesterov", "0.05"),
                     ("adamw", "0.001")):
        argv = ["train", "--device", "cpu", "--epochs", "1", "--quiet", "--optimizer", name,
                "--lr", lr, "--hidden", "32", "16"]
        assert main(argv) == 0, name
    assert capsys.readouterr().out.count("final test accuracy") == 4


def test_train_on_mnist_idx_folder(tmp_path, capsys):
    folder = write_tiny_mnist(tmp_path / "mnist")
    argv = ["train", "--data", str(folder), "--device", "cpu", "--epochs", "2",
            "--batch-size", "16", *SMALL]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "784-16-10 MLP" in out and "(60 train, 20 test)" in out


def test_accuracy_is_counted_on_the_device():
    """held_out_accuracy reads one scalar back, not the logits."""
    device = get_device("array_api_strict:device1")
    X, y = Input(name="X"), Input(name="y")
    logits, _ = mlp(X, [8, 5, 3], seed=1)
    graph = Graph(SoftmaxCrossEntropy(y, logits), device=device, dtype="float64",
                  inputs=[X, y], outputs=[logits])
    rng = np.random.default_rng(0)
    X_dev = device.put(rng.standard_normal((50, 8)), graph.dtype)
    y_dev = device.put(rng.integers(0, 3, size=50))
    LEDGER.reset()
    acc = held_out_accuracy(graph, logits, X_dev, y_dev, chunk=16)  # 4 chunks, one read
    assert LEDGER.d2h_calls == 1 and LEDGER.d2h_bytes <= 8
    assert LEDGER.h2d_calls == 0
    scores = device.to_host(graph.run(logits, X_dev))
    expected = np.mean(np.argmax(scores, axis=1) == device.to_host(y_dev))
    assert acc == pytest.approx(expected)


# -- checkpoints ---------------------------------------------------------------------------------
def test_save_then_resume_equals_uninterrupted_run(tmp_path):
    """Two epochs, save, resume to four: the same parameters, bit for bit, as four at once."""
    opts = dict(device="cpu", dtype="float64", hidden=(16,), quiet=True)
    whole = train({**opts, "epochs": 4})
    ckpt = tmp_path / "run.ckpt"
    first = train({**opts, "epochs": 2, "save": str(ckpt)})
    assert ckpt.is_file() and first["epoch"] == 2
    resumed = train({**opts, "epochs": 4, "resume": str(ckpt)})
    assert resumed["start_epoch"] == 2
    assert resumed["parameters"].keys() == whole["parameters"].keys()
    for name, value in whole["parameters"].items():
        assert np.array_equal(resumed["parameters"][name], value), name
    assert resumed["losses"] == whole["losses"]          # history carried in the checkpoint
    assert resumed["accuracies"] == whole["accuracies"]


def test_resume_from_the_command_line(tmp_path, capsys):
    ckpt = str(tmp_path / "cli.ckpt")
    base = ["train", "--device", "cpu", "--dtype", "float64", "--optimizer", "momentum",
            "--lr", "0.05", *SMALL]
    assert main([*base, "--epochs", "1", "--quiet", "--save", ckpt]) == 0
    assert main([*base, "--epochs", "3", "--resume", ckpt, "--save", ckpt]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {ckpt} at epoch 1" in out
    assert "epoch   2/3" in out and "epoch   3/3" in out and "epoch   1/3" not in out
    assert main([*base, "--epochs", "3", "--resume", ckpt]) == 0  # nothing left to do
    assert "nothing to train" in capsys.readouterr().out


# -- --schedule and --clip ----------------------------------------------------------------------
SCHEDULED = dict(device="cpu", dtype="float64", hidden=(16,), quiet=True, optimizer="momentum",
                 lr=0.05)


@pytest.mark.parametrize("name, settings", [("step", dict(step_size=2, gamma=0.1)),
                                            ("cosine", dict(T_max=6)),
                                            ("exponential", dict(gamma=0.9))])
def test_schedule_ends_at_the_rate_torch_gives(name, settings):
    """Six epochs, stepped once per epoch: the optimizer ends with the rate PyTorch's scheduler
    (with the defaults --help states) gives after six steps; without --schedule it stays."""
    torch = pytest.importorskip("torch")
    kinds = {"step": "StepLR", "cosine": "CosineAnnealingLR", "exponential": "ExponentialLR"}
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    sched = getattr(torch.optim.lr_scheduler, kinds[name])(opt, **settings)
    for _ in range(6):
        opt.step()
        sched.step()
    expected = sched.get_last_lr()[0]
    scheduled = train({**SCHEDULED, "epochs": 6, "schedule": name})
    constant = train({**SCHEDULED, "epochs": 6})
    assert scheduled["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert constant["lr"] == 0.05
    assert any(not np.array_equal(scheduled["parameters"][k], v)
               for k, v in constant["parameters"].items())


def test_clip_bounds_each_step_and_a_loose_clip_changes_nothing():
    """Plain SGD moves the weights by at most lr * MAX_NORM per step under --clip; a MAX_NORM
    far above the gradient's norm scales by exactly 1 (the same run, bit for bit)."""
    from gpuflow.cli import build_model
    opts = {**SCHEDULED, "optimizer": "sgd", "lr": 0.1, "epochs": 1}
    checked = TrainOptions(**opts)
    checked.check()  # fills in the defaults (dropout) as train does
    X_in, y_in, logits, loss, _ = build_model(checked, (64,), 10)
    graph = Graph(loss, device="cpu", dtype="float64", inputs=[X_in, y_in])
    start = {k: np.asarray(p.value) for k, p in graph.named_parameters().items()}
    plain = train(opts)
    tight = train({**opts, "clip": 1e-6})
    loose = train({**opts, "clip": 1e6})
    steps = -(-1437 // 64)  # batches in one epoch of the bundled digits' training split

    def moved(run):
        return np.sqrt(sum(np.sum((run["parameters"][k] - v) ** 2) for k, v in start.items()))

    assert moved(tight) <= steps * 0.1 * 1e-6 * (1 + 1e-9)
    assert moved(plain) > 1000 * moved(tight)
    for k, v in plain["parameters"].items():
        assert np.array_equal(loose["parameters"][k], v), k


def test_resume_with_a_schedule_and_clip_equals_uninterrupted_run(tmp_path, monkeypatch):
    """A 4-epoch cosine run whose epoch-2 checkpoint is kept, resumed to 4: bit-identical
    parameters, history and final rate (the schedule's state travels in the checkpoint)."""
    ckpt, kept = tmp_path / "run.ckpt", tmp_path / "epoch2.ckpt"
    keep_save(monkeypatch, "epoch", 2, kept)
    opts = {**SCHEDULED, "epochs": 4, "schedule": "cosine", "clip": 0.5}
    whole = train({**opts, "save": str(ckpt)})
    monkeypatch.undo()
    resumed = train({**opts, "resume": str(kept)})
    assert resumed["start_epoch"] == 2 and resumed["lr"] == whole["lr"]
    for name, value in whole["parameters"].items():
        assert np.array_equal(resumed["parameters"][name], value), name
    assert resumed["losses"] == whole["losses"]
    plain = train({**opts, "schedule": None})
    assert any(not np.array_equal(plain["parameters"][k], v)  # the schedule did something
               for k, v in whole["parameters"].items())


def test_resume_takes_the_runs_settings_from_the_checkpoint(tmp_path, capsys, monkeypatch):
    """Issue 18 item 10: `--resume` alone continues the run as it was saved (its model,
    optimizer, rate, cosine schedule, --clip, total epochs): bit-identical to the run done at
    once, saying in one line what it took. Forgetting --clip trained without clipping, and
    the missing --schedule was refused."""
    ckpt, first = str(tmp_path / "run.safetensors"), str(tmp_path / "epoch1.safetensors")
    keep_save(monkeypatch, "epoch", 1, first)  # as a run killed after epoch 1 leaves
    run = ["--dtype", "float64", "--hidden", "16", "--optimizer", "momentum", "--lr", "0.05",
           "--schedule", "cosine", "--clip", "0.2", "--epochs", "3", "--seed", "3"]
    assert main(["train", "--device", "cpu", *run, "--quiet", "--save", ckpt]) == 0
    monkeypatch.undo()
    whole = capsys.readouterr().out
    assert main(["train", "--device", "cpu", "--resume", first]) == 0
    out = capsys.readouterr().out
    taken = [line for line in out.splitlines() if line.startswith("from the checkpoint: ")]
    assert len(taken) == 1, out
    for flag in ("--hidden 16", "--optimizer momentum", "--lr 0.05", "--schedule cosine",
                 "--clip 0.2", "--epochs 3", "--seed 3", "--dtype float64"):
        assert flag in taken[0], taken[0]
    assert "epoch   2/3" in out and "epoch   3/3" in out and "epoch   1/3" not in out
    final = [line for line in whole.splitlines() if line.startswith("final test accuracy")]
    assert final[0] in out.splitlines()
    resumed = train({"device": "cpu", "resume": first, "quiet": True})
    uninterrupted = train(dict(device="cpu", dtype="float64", hidden=(16,), optimizer="momentum",
                               lr=0.05, schedule="cosine", clip=0.2, epochs=3, seed=3, quiet=True))
    for name, value in uninterrupted["parameters"].items():
        assert np.array_equal(resumed["parameters"][name], value), name
    assert resumed["lr"] == uninterrupted["lr"] and resumed["losses"] == uninterrupted["losses"]


def test_resume_with_more_epochs_stretches_a_cosine_schedule_from_its_position(tmp_path,
                                                                               capsys):
    """--epochs on resume is the new total and the schedule follows it (T_max 2 -> 4 at epoch
    2): the rate at epoch 3 is cosine's for T_max 4, not the old T_max's climb back up."""
    ckpt = str(tmp_path / "run.safetensors")
    opts = {**SCHEDULED, "schedule": "cosine"}
    train({**opts, "epochs": 2, "save": ckpt})
    assert main(["train", "--device", "cpu", "--resume", ckpt, "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "the cosine schedule now spans 3 epochs (T_max 2 -> 3), at epoch 2 with lr 0.0125" \
        in out, out
    # the old T_max 2 climbed back: 0.025 at epoch 3, 0.05 at epoch 4
    assert train({"device": "cpu", "resume": ckpt, "epochs": 3, "quiet": True})["lr"] == \
        pytest.approx(0.0, abs=1e-15)                              # epoch 3 of T_max 3
    resumed = train({"device": "cpu", "resume": ckpt, "epochs": 5, "quiet": True})
    straight = train({**opts, "epochs": 5})  # the run planned for 5 from the start
    assert resumed["lr"] == pytest.approx(straight["lr"], abs=1e-15) == 0.0
    four = train({**opts, "epochs": 4})
    assert four["lr"] == pytest.approx(0.0, abs=1e-15)


def test_resume_refuses_only_a_real_contradiction(tmp_path, capsys):
    ckpt = str(tmp_path / "run.safetensors")
    train({**SCHEDULED, "epochs": 1, "schedule": "step", "save": ckpt})
    base = ["train", "--device", "cpu", "--quiet", "--resume", ckpt]
    assert main([*base, "--model", "cnn", "--optimizer", "adam"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--model cnn (the checkpoint's run: --model mlp)" in line, line
    assert "--optimizer adam (the checkpoint's run: --optimizer momentum)" in line, line
    assert "help: drop those options to continue the run" in line, line
    assert main([*base, "--lr", "0.5"]) == 2   # under a schedule, which sets the rate
    line = _one_error_line(capsys.readouterr().err)
    assert "--lr 0.5 (the checkpoint's run: --lr 0.05, under its --schedule step" in line
    assert main([*base, "--schedule", "cosine"]) == 2
    assert "--schedule cosine (the checkpoint's run: --schedule step)" in _one_error_line(
        capsys.readouterr().err)
    # what may change on resume: the total epochs, --clip, --batch-size, --dtype
    assert main([*base, "--epochs", "2", "--clip", "1", "--batch-size", "32"]) == 0


def test_resume_of_another_model_is_a_summary_and_a_list_on_separate_lines(tmp_path, capsys):
    """Issue 18 item 11: a checkpoint of another model (here a CNN saved by a script, so it
    carries no run settings) was one ~1,500-character line with the items run together."""
    from gpuflow import checkpoint
    from gpuflow.cli import build_model
    from gpuflow.optim import Adam
    opts = TrainOptions(model="cnn", hidden=(32,))
    opts.check()
    X_in, y_in, logits, loss, _ = build_model(opts, (1, 8, 8), 10)
    graph = Graph(loss, device="cpu", dtype="float32", inputs=[X_in, y_in])
    path = tmp_path / "cnn.safetensors"
    checkpoint.save(path, graph, Adam(graph), epoch=1)
    assert main(["train", "--device", "cpu", "--quiet", "--resume", str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.rstrip("\n").splitlines()
    assert lines[0].startswith("gpuflow train: error: ") and "Traceback" not in err, err
    assert "the checkpoint is of another model, written by --model cnn --hidden 32" in lines[0]
    assert "this run builds a 64-128-10 MLP (--model mlp --hidden 128)" in lines[0], lines[0]
    assert "help: pass --model cnn --hidden 32" in lines[0], lines[0]
    items = lines[1:]
    assert 2 <= len(items) <= 9 and all(line.startswith("  ") for line in items), err
    assert any("'layer1.W' (shape (64, 128)) is missing" in line for line in items), err
    assert max(len(line) for line in lines) < 400, err


def test_device_fastest_is_taken_and_leaves_no_trace(capsys):
    """Issue 18 item 12: --device fastest was refused ("unknown device spec") though Graph
    takes it. The timing steps change nothing: the run equals one on the chosen device."""
    opts = dict(dtype="float64", hidden=(16,), dropout=0.2, epochs=1, quiet=True)
    chosen = train({**opts, "device": "fastest:cpu"})
    assert "device 'fastest' chose cpu" in capsys.readouterr().err
    plain = train({**opts, "device": "cpu"})
    for name, value in plain["parameters"].items():
        assert np.array_equal(chosen["parameters"][name], value), name
    assert chosen["losses"] == plain["losses"]
    candidates = "fastest:cpu,torch:cpu" if _has("torch") else "fastest:cpu"
    assert main(["train", "--device", candidates, *SMALL, "--epochs", "1", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "device 'fastest' chose" in captured.err and "final test accuracy" in captured.out


def test_first_step_that_compiles_is_announced(capsys, monkeypatch):
    """Issue 18 item 15: on a device whose first step compiles (jax: seconds of XLA) the bar
    sat at 0% without a word; the device says whether it compiles, the CLI says so once."""
    argv = ["train", "--device", "cpu", *SMALL, "--epochs", "1"]
    assert main(argv) == 0
    assert "compiling" not in capsys.readouterr().out
    monkeypatch.setattr(get_device("cpu"), "compiles_first_step", True)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "compiling the step for cpu (first step only)..." in out, out
    assert out.index("compiling the step") < out.index("epoch   1/1")
    if _has("jax"):  # the backend says it (no step run here: XLA takes seconds)
        assert get_device("jax:cpu").compiles_first_step is True
    if _has("torch"):
        assert get_device("torch:cpu").compiles_first_step is False


def test_dict_options_check_schedule_and_clip():
    with pytest.raises(ValueError, match="--schedule must be one of step, cosine, exponential"):
        train({"schedule": "linear"})
    with pytest.raises(ValueError, match="--clip must be a finite number > 0"):
        train({"clip": float("inf")})


# -- user mistakes: one line, exit 2 -------------------------------------------------------------
BAD_ARGUMENTS = {
    "unknown option": (["train", "--bogus"], "unrecognized arguments: --bogus"),
    "unknown command": (["frobnicate"], "invalid choice"),
    "no command": ([], "required"),
    "negative epochs": (["train", "--epochs", "-1"], "--epochs"),
    "zero epochs": (["train", "--epochs", "0"], "--epochs"),
    "epochs not a number": (["train", "--epochs", "ten"], "--epochs"),
    "zero lr": (["train", "--lr", "0"], "--lr"),
    "negative lr": (["train", "--lr", "-0.5"], "--lr"),
    "nan lr": (["train", "--lr", "nan"], "--lr"),
    "zero batch": (["train", "--batch-size", "0"], "--batch-size"),
    "zero hidden": (["train", "--hidden", "64", "0"], "--hidden"),
    "bad dtype": (["train", "--dtype", "int8"], "--dtype"),
    "bad optimizer": (["train", "--optimizer", "rmsprop"], "--optimizer"),
    "unknown device": (["train", "--device", "tpu"], "'tpu'"),
    "bad schedule": (["train", "--schedule", "linear"], "--schedule"),
    "zero clip": (["train", "--clip", "0"], "--clip"),
    "negative clip": (["train", "--clip", "-1"], "--clip"),
    "nan clip": (["train", "--clip", "nan"], "--clip"),
    "clip not a number": (["train", "--clip", "big"], "--clip"),
    "zero threads": (["train", "--threads", "0"], "--threads"),
}


@pytest.mark.parametrize("argv, expected", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_give_one_line_and_exit_2(argv, expected, capsys):
    assert main(argv) == 2
    prog = "gpuflow train" if argv[:1] == ["train"] else "gpuflow"
    line = _one_error_line(capsys.readouterr().err, prog)
    assert expected in line


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_check_finite_stops_an_absurd_learning_rate_with_one_line(capsys, optimizer):
    argv = ["train", "--device", "cpu", "--epochs", "2", *SMALL, "--optimizer", optimizer,
            "--lr", "1e30", "--check-finite", "--quiet"]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "non-finite number (NaN or Inf) first appeared in Linear 'layer" in line, line
    assert re.search(r"at step \d+\. help: lower the learning rate", line), line


def test_check_finite_is_off_by_default_and_a_graph_option():
    assert TrainOptions().check_finite is False
    ns = build_parser().parse_args(["train", "--check-finite"])
    assert TrainOptions.from_any(ns).check_finite is True


@pytest.mark.skipif(_has("cupy"), reason="CuPy is installed: 'cuda' may be a real device here")
def test_cuda_without_a_gpu(capsys):
    assert main(["train", "--device", "cuda", "--epochs", "1"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "'cuda'" in line and "help:" in line
    # issue 18 item 13: the command's flag, not the library's argument
    assert "--device cpu" in line and "device='cpu'" not in line, line


def test_missing_data_path(tmp_path, capsys):
    missing = tmp_path / "no-such-mnist"
    assert main(["train", "--device", "cpu", "--data", str(missing)]) == 2
    assert str(missing) in _one_error_line(capsys.readouterr().err)


def test_resume_missing_file(tmp_path, capsys):
    missing = tmp_path / "missing.ckpt"
    assert main(["train", "--device", "cpu", "--resume", str(missing)]) == 2
    assert str(missing) in _one_error_line(capsys.readouterr().err)


def test_resume_corrupt_file(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"this is not a checkpoint\n" * 10)
    assert main(["train", "--device", "cpu", "--resume", str(bad)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "missing from this install" not in line  # the file was rejected, not the module


def test_save_into_missing_folder(tmp_path, capsys):
    target = tmp_path / "nope" / "run.ckpt"
    assert main(["train", "--device", "cpu", "--epochs", "1", "--save", str(target)]) == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err)


# -- plot ----------------------------------------------------------------------------------------
def test_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (gpuflow[plot])")
    png = tmp_path / "curves.png"
    assert main(["train", "--device", "cpu", "--epochs", "2", "--quiet", *SMALL,
                 "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_plot_without_matplotlib_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    png = tmp_path / "curves.png"
    assert main(["train", "--device", "cpu", "--epochs", "1", "--plot", str(png)]) == 2
    captured = capsys.readouterr()
    assert "matplotlib" in _one_error_line(captured.err)
    assert "final test accuracy" not in captured.out and not png.exists()


# -- devices and bench ---------------------------------------------------------------------------
def test_devices_lists_every_backend(capsys):
    assert main(["devices"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines()[1:]:
        fields = line.split(maxsplit=3)
        if len(fields) >= 3 and fields[2] in ("yes", "no"):
            rows[fields[1]] = (fields[0], fields[2])
    assert rows["cpu"] == ("numpy", "yes")
    assert rows["array_api_strict:device1"] == ("array_api_strict", "yes")
    assert rows["torch:cpu"][1] == ("yes" if _has("torch") else "no")
    cupy_rows = [avail for backend, avail in rows.values() if backend == "cupy"]
    assert cupy_rows, "no cupy row"
    if not _has("cupy"):
        assert cupy_rows == ["no"]


def test_bench_is_dispatched_with_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("gpuflow.bench")
    fake.main = lambda argv: seen.append(list(argv)) or 3
    monkeypatch.setitem(sys.modules, "gpuflow.bench", fake)
    assert main(["bench", "--steps", "5", "--device", "cpu"]) == 3
    assert seen == [["--steps", "5", "--device", "cpu"]]


# -- python -m gpuflow ---------------------------------------------------------------------------
def test_python_m_gpuflow_train():
    proc = subprocess.run([sys.executable, "-m", "gpuflow", "train", "--epochs", "1", "--quiet"],
                          cwd=REPO, env=_gpuflow_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "final test accuracy" in proc.stdout and "time: " in proc.stdout


def test_python_m_gpuflow_error_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "gpuflow", "train", "--device", "tpu"],
                          cwd=REPO, env=_gpuflow_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    _one_error_line(proc.stderr)


# -- targets are checked before training (--save, --plot) ---------------------------------------
def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in: read-only permission bits, or, for root
    (who ignores them), /proc; skipped if neither refuses a write here."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/proc")):
        try:
            (candidate / "probe").write_bytes(b"")
        except OSError:
            return candidate
        (candidate / "probe").unlink()
    pytest.skip("no folder here refuses writes (not Linux, and root ignores permission bits)")


@pytest.mark.parametrize("option", ["--save", "--plot"])
@pytest.mark.parametrize("where", ["a folder", "an unwritable folder"])
def test_unwritable_save_or_plot_target_fails_before_training(tmp_path, capsys, option, where):
    if option == "--plot":
        pytest.importorskip("matplotlib", reason="--plot needs matplotlib (gpuflow[plot])")
    target = tmp_path if where == "a folder" else _unwritable_folder(tmp_path) / "out.file"
    argv = ["train", "--device", "cpu", "--epochs", "1", *SMALL, option, str(target)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert f"{option} {target}: " in line
    assert "epoch " not in captured.out and "final test accuracy" not in captured.out


def test_writable_check_leaves_nothing_behind(tmp_path):
    opts = TrainOptions(save=str(tmp_path / "run.safetensors"))
    opts.check()
    assert list(tmp_path.iterdir()) == []


# -- every command's mistakes: one line, worded alike -------------------------------------------
@pytest.mark.parametrize("argv, prog, expected", [
    (["train", "--device", "nope"], "gpuflow train", "unknown device spec 'nope'"),
    (["bench", "--device", "nope"], "gpuflow bench", "unknown device spec 'nope'"),
    (["bench", "--bogus"], "gpuflow bench", "unrecognized arguments: --bogus"),
    (["bench", "--quick", "--threads", "-1"], "gpuflow bench", "--threads must be >= 0"),
    (["devices", "--bogus"], "gpuflow devices", "unrecognized arguments: --bogus"),
    (["train", "--epochs", "0"], "gpuflow train", "--epochs must be an integer >= 1"),
])
def test_every_command_reports_a_mistake_as_one_line_worded_alike(argv, prog, expected,
                                                                   capsys):
    assert main(argv) == 2
    assert expected in _one_error_line(capsys.readouterr().err, prog)


# -- argparse: no abbreviations, suggestions, help ----------------------------------------------
@pytest.mark.parametrize("argv, suggestion", [
    (["train", "--epoch", "3"], "--epochs"),
    (["train", "--epoch=3"], "--epochs"),
    (["train", "--batchsize", "8"], "--batch-size"),
    (["train", "--check_finite"], "--check-finite"),
])
def test_abbreviations_are_refused_and_the_closest_option_suggested(argv, suggestion, capsys):
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"did you mean {suggestion}?" in line
    assert "see 'gpuflow train --help'" in line   # the subcommand's help, not gpuflow's


def test_no_parser_takes_abbreviations():
    parser = build_parser()
    assert not parser.allow_abbrev
    assert all(not sub.allow_abbrev for sub in parser.commands.values())
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--epoch", "3"])


def test_train_help_says_it_trains_a_cnn_too(capsys):
    """Issue 18 item 13: the help said 'Train an MLP classifier'."""
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "MLP classifier" not in text + top and "--model cnn a LeNet-style CNN" in text
    assert "an MLP or a CNN" in " ".join(top.split())


def test_train_help_shows_every_default_once(capsys):
    assert main(["train", "--help"]) == 0
    entries: dict[str, str] = {}   # option -> its help text, unwrapped
    for line in capsys.readouterr().out.splitlines():
        if re.match(r"  -", line):
            option = line.split()[0].rstrip(",")
            entries[option] = line
        elif entries and line.startswith("   "):
            entries[option] += line
    entries = {k: " ".join(v.split()) for k, v in entries.items()}
    for option, default in (("--dtype", "float32"), ("--batch-size", "64"),
                            ("--optimizer", "adam"), ("--seed", "0"), ("--epochs", "25")):
        assert entries[option].count("(default: ") == 1, entries[option]
        assert entries[option].endswith(f"(default: {default})"), entries[option]
    assert entries["--data"].count("default") == 1, entries["--data"]
    assert not any("(default: None)" in v or "(default: False)" in v for v in entries.values())


def test_threads_split_a_cnn_run_to_the_same_result_and_are_given_back(monkeypatch):
    from gpuflow.backends import numpy_threads as nt
    runs = []
    real = nt.WORKERS.run
    monkeypatch.setattr(nt.WORKERS, "run", lambda slabs: (runs.append(1), real(slabs)))
    before = gf.get_num_threads()  # GPUFLOW_NUM_THREADS may have set it
    options = {"model": "cnn", "epochs": 1, "quiet": True, "device": "cpu"}
    one = train({**options, "threads": 1})
    assert not runs
    two = train({**options, "threads": 2})
    assert runs, "--threads 2 split nothing"
    assert gf.get_num_threads() == before  # the run's setting is given back
    assert abs(two["accuracy"] - one["accuracy"]) <= 1 / 360  # one image at most
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-4)


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # float16 overflows
def test_float16_cnn_with_its_default_dropout_trains_on_cpu(capsys):
    # Regression (issue 18.1): the CNN's Dropout (0.25 by default) asked NumPy for float16
    # random numbers and the run died with a TypeError traceback.
    argv = ["train", "--model", "cnn", "--dtype", "float16", "--epochs", "1", "--quiet",
            "--device", "cpu"]
    assert main(argv) == 0
    assert "final test accuracy: " in capsys.readouterr().out


def test_dict_options_with_an_unknown_key_are_refused():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['test_fraction'\]"):
        train({"test_fraction": 0.3, "epochs": 1})


@pytest.mark.skipif(get_device("auto").is_gpu, reason="this machine has a CUDA GPU")
def test_auto_without_a_gpu_says_so_once_without_the_import_error(capsys):
    assert main(["train", "--epochs", "1", *SMALL]) == 0
    captured = capsys.readouterr()
    both = captured.out + captured.err
    assert "ModuleNotFoundError" not in both and "cannot be imported" not in both
    assert both.count("no CUDA GPU found") == 1
    assert "device: cpu" in captured.out


def test_messages_name_nodes_without_a_doubled_quote():
    """No "Linear 'layer1''s value" (a label ends in a quote) and no "build a Adam"."""
    package = Path(__file__).resolve().parents[1] / "gpuflow"
    for path in package.rglob("*.py"):
        source = path.read_text()
        assert not re.search(r"label\}'s", source), f"{path.name}: {{...label}}'s"
        assert "help: build a {" not in source, path.name


# -- gpuflow export ------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_export_writes_the_model_of_a_train_checkpoint(tmp_path, capsys, model):
    """`gpuflow export CHECKPOINT --onnx PATH --python FOLDER` rebuilds the model from the run's
    settings saved with the checkpoint (the CNN on 28x28 images: run.sample_shape) and writes
    its evaluation pass; both give gpuflow's logits."""
    from gpuflow import checkpoint
    from gpuflow.cli import build_model
    ckpt = str(tmp_path / "run.safetensors")
    data = write_tiny_mnist(tmp_path / "mnist") if model == "cnn" else None
    opts = {"model": model, "hidden": (8,), "dropout": 0.1, "seed": 3}
    train({**opts, "device": "cpu", "epochs": 1, "quiet": True, "save": ckpt,
           "data": str(data) if data else None})
    onnx_path, folder = tmp_path / "model.onnx", tmp_path / "standalone"
    has_onnx = _has("onnx")
    args = ["export", ckpt, "--python", str(folder)] + (["--onnx", str(onnx_path)] if has_onnx
                                                        else [])
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"wrote {folder / 'model.py'}" in out, out
    # gpuflow's own evaluation of the checkpoint, built here from the options
    shape = (1, 28, 28) if model == "cnn" else (64,)
    X, y, logits, loss, _ = build_model(TrainOptions(**opts), shape, 10)
    graph = Graph(loss, device="cpu", inputs=[X, y], outputs=[logits])
    checkpoint.load(ckpt, graph)
    x = np.random.default_rng(0).random((5, *shape), dtype=np.float32)
    expected = gf.to_numpy(graph.run(logits, x))
    namespace: dict = {}
    exec(compile((folder / "model.py").read_text(), "model.py", "exec"), namespace)
    got = namespace["predict"](x, namespace["load"](str(folder / "weights.safetensors"), np))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    if has_onnx and _has("onnxruntime"):
        import onnxruntime
        session = onnxruntime.InferenceSession(str(onnx_path),
                                               providers=["CPUExecutionProvider"])
        got = session.run(None, {"X": x})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_export_needs_the_run_settings_in_the_checkpoint(tmp_path, capsys):
    """A checkpoint without the run's settings (an older gpuflow, or checkpoint.save) is one
    line saying so, and nothing is written; one from before run.sample_shape (an MLP) is
    rebuilt from its parameters' shapes."""
    from gpuflow import checkpoint
    from gpuflow.cli import build_model
    from gpuflow.cli.runs import run_state
    opts = TrainOptions(hidden=(6,))
    opts.check()
    X, y, logits, loss, _ = build_model(opts, (64,), 10)
    graph = Graph(loss, device="cpu", inputs=[X, y], outputs=[logits])
    bare, older = str(tmp_path / "bare.safetensors"), str(tmp_path / "older.safetensors")
    checkpoint.save(bare, graph)
    checkpoint.save(older, graph, state=run_state(opts))
    folder = tmp_path / "out"
    assert main(["export", bare, "--python", str(folder)]) == 2
    line = _one_error_line(capsys.readouterr().err, prog="gpuflow export")
    assert "does not say which model it holds" in line, line
    assert not folder.exists()
    assert main(["export", older, "--python", str(folder)]) == 0
    assert (folder / "model.py").is_file() and (folder / "weights.safetensors").is_file()
    assert main(["export", older]) == 2
    assert "pass --onnx PATH, --python FOLDER" in _one_error_line(capsys.readouterr().err,
                                                                  prog="gpuflow export")
