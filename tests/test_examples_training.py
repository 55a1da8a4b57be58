"""The training examples run end to end, a few steps each, on the CPU and on a second
array_api_strict device (a multi-device path without a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
DEVICES = ["cpu", "array_api_strict:device1"]


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file: magic (0, 0, 0x08 = uint8, ndim), big-endian dims, bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    path.write_bytes(header + array.tobytes())


def tiny_mnist(folder: Path, n_train: int = 60, n_test: int = 20) -> Path:
    """Synthetic MNIST-layout IDX files: class k is a bright square at a k-dependent spot."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 + 2 * k:6 + 2 * k, 4 + 2 * k:8 + 2 * k] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return folder


def test_idx_header_is_what_mnist_uses(tmp_path):
    folder = tiny_mnist(tmp_path / "m", n_train=10, n_test=10)
    images = (folder / "train-images-idx3-ubyte").read_bytes()
    labels = (folder / "train-labels-idx1-ubyte").read_bytes()
    assert images[:4] == b"\x00\x00\x08\x03" and labels[:4] == b"\x00\x00\x08\x01"
    assert images[4:16] == (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    assert len(images) == 16 + 10 * 28 * 28 and len(labels) == 8 + 10


@pytest.mark.parametrize("device", DEVICES)
def test_digits_classifier(device):
    proc = run_example("digits_classifier.py", "--device", device, "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    assert f"device {device}" in proc.stdout
    assert "epoch   2" in proc.stdout and "final test accuracy" in proc.stdout


@pytest.mark.parametrize("device", DEVICES + ["torch:cpu"])
def test_cnn_digits(device):
    if device.startswith("torch"):
        pytest.importorskip("torch")
    proc = run_example("cnn_digits.py", "--device", device, "--epochs", "1")
    assert proc.returncode == 0, proc.stderr
    assert f"device {device}" in proc.stdout
    assert "epoch   1" in proc.stdout and "final test accuracy" in proc.stdout


@pytest.mark.parametrize("device", DEVICES)
def test_custom_node_trains_and_passes_its_gradient_check(device):
    proc = run_example("custom_node.py", "--device", device, "--steps", "5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "after 5 steps" in proc.stdout
    assert "finite-difference check" in proc.stdout and ": OK" in proc.stdout


@pytest.mark.parametrize("device", DEVICES)
def test_mnist_on_tiny_idx_folder(device, tmp_path):
    folder = tiny_mnist(tmp_path / "mnist")
    proc = run_example("mnist.py", "--data", str(folder), "--device", device, "--epochs", "2",
                       "--batch-size", "16", "--hidden", "32")
    assert proc.returncode == 0, proc.stderr
    assert "60 training and 20 test images of 784 pixels" in proc.stdout
    assert "epoch  2" in proc.stdout


def test_mnist_on_npz(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
             y_train=np.arange(30) % 10, x_test=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
             y_test=np.arange(10))
    proc = run_example("mnist.py", "--data", str(path), "--epochs", "1", "--hidden", "8")
    assert proc.returncode == 0, proc.stderr
    assert "30 training and 10 test images" in proc.stdout


@pytest.mark.parametrize("args", [[], ["--data", "no/such/folder"]], ids=["no-data", "missing"])
def test_mnist_without_data_says_how_to_get_it(args):
    proc = run_example("mnist.py", *args)
    assert proc.returncode == 2
    assert "--data PATH" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_mnist_with_an_empty_folder(tmp_path):
    proc = run_example("mnist.py", "--data", str(tmp_path))
    assert proc.returncode == 2
    assert "train-images-idx3-ubyte" in proc.stderr and "Traceback" not in proc.stderr
