"""The scripts in examples/ run as a user runs them, and give the same numbers on every device."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

import pytest

from conftest import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_example(script: str, *args: str) -> str:
    env = child_env()
    done = subprocess.run([sys.executable, os.path.join(REPO, "examples", script), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, f"{script} {' '.join(args)} failed:\n{done.stderr}"
    return done.stdout


def _losses(out: str) -> list[float]:
    return [float(v) for v in re.findall(r"^Epoch: \d+, Loss: ([0-9.]+)$", out, re.MULTILINE)]


# examples/miniflow_nn.py's lines that differ from the lesson's nn.py -> the lesson's line.
LESSON_CHANGES = {
    "data = boston_like()": "data = load_boston()",
    "epochs = args.epochs": "epochs = 10",
    '    print("Epoch: {}, Loss: {:.3f}".format(i+1, float(loss/steps_per_epoch)))':
        '    print("Epoch: {}, Loss: {:.3f}".format(i+1, loss/steps_per_epoch))',
}
# SHA-256 of the lesson's nn.py from "# Load data" to its end, blank lines dropped, trailing
# spaces stripped, lines joined by "\n" (a digest, so the lesson's code is not copied here).
LESSON_NN_SHA256 = "3d87628c9378c062697adc1731f262d26edbbf0e72b8c822a14119d3b3526f28"


def test_miniflow_nn_is_the_lesson_but_for_the_stated_changes():
    """The README and the example's docstring list what differs from the lesson's nn.py;
    undoing exactly those lines must give the lesson's code back."""
    with open(os.path.join(REPO, "examples", "miniflow_nn.py")) as f:
        text = f.read()
    assert "\n# Load data\n" in text, "the lesson's code starts at '# Load data'"
    block = [line.rstrip() for line in text.split("\n# Load data\n", 1)[1].splitlines()]
    changed = [line for line in block if line in LESSON_CHANGES]
    assert sorted(changed) == sorted(LESSON_CHANGES), changed
    lesson = ["# Load data"] + [LESSON_CHANGES.get(line, line) for line in block if line]
    digest = hashlib.sha256("\n".join(lesson).encode()).hexdigest()
    assert digest == LESSON_NN_SHA256, "the lesson's lines differ in more than LESSON_CHANGES"
    with open(os.path.join(REPO, "README.md")) as f:
        readme = " ".join(f.read().split())
    assert "unchanged but for the import" not in readme
    for change in ("load_boston", "--epochs", "float(", "$GPUFLOW_DEVICE", "np.random.seed",
                   "resample"):
        assert change in readme, f"the README does not state the change {change!r}"


def test_miniflow_nn_same_losses_on_cpu_and_device1():
    pytest.importorskip("array_api_strict")
    runs = {}
    for device in ("cpu", "array_api_strict:device1"):
        out = _run_example("miniflow_nn.py", "--device", device, "--epochs", "2")
        assert f"Device: {device} (" in out, out
        assert "Total number of examples = 506" in out, out
        runs[device] = _losses(out)
    cpu = runs["cpu"]
    assert len(cpu) == 2, f"expected 2 epoch lines, got {cpu}"
    assert runs["array_api_strict:device1"] == cpu, runs
    assert cpu[1] < cpu[0], f"loss did not decrease: {cpu}"


def test_miniflow_nn_seed_changes_the_run():
    a = _losses(_run_example("miniflow_nn.py", "--epochs", "1", "--seed", "1"))
    b = _losses(_run_example("miniflow_nn.py", "--epochs", "1", "--seed", "2"))
    assert len(a) == len(b) == 1 and a != b, (a, b)


def test_miniflow_nn_refuses_an_unknown_device():
    env = child_env()
    done = subprocess.run([sys.executable, os.path.join(REPO, "examples", "miniflow_nn.py"),
                           "--device", "tpu", "--epochs", "1"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode != 0
    assert "DeviceError" in done.stderr and "'tpu'" in done.stderr, done.stderr


@pytest.mark.parametrize("device", ["cpu", "torch:cpu", "jax:cpu"])
def test_digits_classifier_runs_on_each_library(device):
    # Regression: it counted parameters with `p.value.size`, a method on torch tensors, and
    # crashed with a TypeError on torch:cpu before training.
    if device != "cpu":
        pytest.importorskip(device.split(":")[0])
    out = _run_example("digits_classifier.py", "--device", device, "--epochs", "1")
    assert "parameters" in out, out


@pytest.mark.parametrize("script, sizes", [
    ("char_gpt.py", ["--width", "16", "--layers", "1"]),
    ("char_lstm.py", ["--hidden", "16"])])
def test_character_language_models_train_and_sample(script, sizes, tmp_path):
    """examples/char_gpt.py and char_lstm.py: a few steps on a small text print the held-out
    loss in nats per character (falling) and a sample that starts with the prompt."""
    text = tmp_path / "tiny.txt"
    text.write_text(" ".join(["The cat sat on the mat.", "A dog ran to it."] * 200))
    out = _run_example(script, "--steps", "20", "--context", "16", "--data", str(text), *sizes)
    held = [float(v) for v in re.findall(r"held-out ([0-9.]+) nats/char", out)]
    assert len(held) == 5 and held[-1] < held[0], out
    assert out.split("nats/char\n")[-1].startswith("The "), out
