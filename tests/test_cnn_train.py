"""`gpuflow train --model cnn` and `--dropout`: the CNN trains on the digits (1x8x8) and on
MNIST-layout files (1x28x28), on the CPU and on a second array_api_strict device; bad values
get one line."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_epochs
from gpuflow.cli import main, train
from test_cli import _one_error_line, write_tiny_mnist


def test_cnn_trains_on_the_digits(capsys):
    assert main(["train", "--model", "cnn", "--device", "cpu", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "LeNet-style CNN" in out and "1x8x8 images" in out and "dropout 0.25" in out
    assert len([line for line in out.splitlines() if line.startswith("epoch ")]) == 2
    assert "final test accuracy: " in out


def test_cnn_learns_and_agrees_on_cpu_and_strict_device1():
    """Seeded weights, batch order and (NumPy-stream) dropout masks are the same on 'cpu' and
    array_api_strict: float64 runs agree closely, and the loss falls."""
    opts = dict(model="cnn", epochs=2, dtype="float64", quiet=True)
    cpu = train({**opts, "device": "cpu"})
    strict = train({**opts, "device": "array_api_strict:device1"})
    np.testing.assert_allclose(cpu["losses"], strict["losses"], rtol=1e-9)
    assert cpu["losses"][1] < cpu["losses"][0]
    assert cpu["accuracy"] > 0.5, cpu["accuracies"]  # ten classes: chance is 0.1
    assert any(name.startswith("cnn.bn1") for name in cpu["parameters"])


def test_cnn_on_mnist_layout_files(tmp_path, capsys):
    folder = write_tiny_mnist(tmp_path / "mnist")
    argv = ["train", "--model", "cnn", "--data", str(folder), "--device", "cpu", "--epochs",
            "1", "--batch-size", "16", "--dropout", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1x28x28 images" in out and "dropout 0;" in out


def test_mlp_dropout_is_in_the_graph():
    with_dropout = train(dict(epochs=1, quiet=True, device="cpu", dropout=0.5, hidden=(16,)))
    without = train(dict(epochs=1, quiet=True, device="cpu", hidden=(16,)))
    assert with_dropout["losses"][0] != without["losses"][0]


@pytest.mark.parametrize("argv, expected", [
    (["train", "--model", "resnet"], "--model"),
    (["train", "--dropout", "1"], "--dropout must be in [0, 1)"),
    (["train", "--dropout", "-0.1"], "--dropout must be in [0, 1)"),
])
def test_bad_model_options_give_one_line(argv, expected, capsys):
    assert main(argv) == 2
    assert expected in _one_error_line(capsys.readouterr().err, "gpuflow train")


def test_readme_image_snippet_prints_what_it_shows():
    import contextlib
    import io
    import pathlib
    import re
    readme = pathlib.Path(__file__).resolve().parent.parent / "README.md"
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
              if "gf.conv2d(" in b]
    assert len(blocks) == 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(blocks[0], {})
    shown = re.findall(r"^# (.+)$", blocks[0], re.M)
    assert out.getvalue().split("\n")[0] == shown[-1], (out.getvalue(), shown)


def test_cnn_checkpoint_with_batchnorm_dropout_and_a_schedule_resumes_bit_identically(tmp_path):
    """BatchNorm's running statistics, Dropout's place in its mask sequence, the optimizer and
    the schedule are all restored: the resumed run equals the uninterrupted one exactly."""
    import gpuflow as gf
    from gpuflow import checkpoint
    from gpuflow.layers import lenet
    from gpuflow.optim import Adam, StepLR

    rng = np.random.default_rng(3)
    batches = [(rng.random((8, 1, 8, 8)), rng.integers(0, 4, 8)) for _ in range(2)]

    def build():
        X, y = gf.Input(name="X"), gf.Input(name="y")
        logits, _ = lenet(X, (1, 8, 8), 4, channels=(3, 4), hidden=8, dropout=0.3,
                          batch_norm=True, seed=0)
        graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device="cpu", dtype="float64",
                         inputs=[X, y], outputs=[logits])
        opt = Adam(graph, lr=1e-2)
        return graph, opt, StepLR(opt, step_size=1, gamma=0.5), logits

    graph, opt, schedule, logits = build()
    run_epochs(graph, opt, schedule, batches, 1)
    path = tmp_path / "cnn.safetensors"
    checkpoint.save(str(path), graph, opt, schedule=schedule, epoch=1)
    straight = run_epochs(graph, opt, schedule, batches, 2)
    probe = batches[0][0]
    expected = graph.run(logits, probe).copy()

    graph2, opt2, schedule2, logits2 = build()
    checkpoint.load(str(path), graph2, opt2, schedule=schedule2)
    resumed = run_epochs(graph2, opt2, schedule2, batches, 2)
    assert resumed == straight
    np.testing.assert_array_equal(graph2.run(logits2, probe), expected)
