"""`gpuflow train --model gpt` (gpuflow/cli/textrun.py): a tiny character-level GPT prints its
held-out loss in nats per character and a sample; --save / --resume continue bit for bit;
--recompute changes no number; a bad --data is one line; `gpuflow export` writes its
checkpoint's model."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import gpuflow as gf
from gpuflow import checkpoint
from gpuflow.cli import main, train

from conftest import keep_save

TINY = ["--steps", "30", "--layers", "1", "--width", "16", "--heads", "2", "--context", "16",
        "--device", "cpu"]
OPTS = dict(model="gpt", steps=30, layers=1, width=16, heads=2, context=16, device="cpu",
            eval_every=15, quiet=True)


@pytest.fixture
def tiny_text(tmp_path):
    """About 6,000 characters of repetitive English, UTF-8."""
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "it", "café"]
    text = "\n".join(" ".join(rng.choice(words, 8)).capitalize() + "." for _ in range(160))
    path = tmp_path / "tiny.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpuflow train: error: "), err
    assert " help: " in lines[0] and "Traceback" not in err
    return lines[0]


def test_tiny_gpt_run_prints_held_out_nats_per_char_and_a_sample(tiny_text, capsys):
    assert main(["train", "--model", "gpt", *TINY, "--data", tiny_text, "--eval-every",
                 "10"]) == 0
    out = capsys.readouterr().out
    reports = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in reports] == ["10/30", "20/30", "30/30"], out
    assert all("nats/char" in line for line in reports)
    held = [float(line.split("held-out ")[1].split()[0]) for line in reports]
    assert held[-1] < held[0] < np.log(14) + 0.5  # it learns (14 characters: log 14 at first)
    assert "adamw lr 0.003, batch 32" in out and "WarmupCosineLR(warmup=3, T_max=30" in out
    sample = out.split("sample (temperature 0.8, seed 0):\n")[1].split("\nheld-out loss:")[0]
    assert sample.startswith("The ") and len(sample) == 4 + 400, sample
    assert f"held-out loss: {held[-1]:.4f} nats/char" in out


def test_gpt_save_at_15_and_resume_to_30_equals_the_uninterrupted_run(tiny_text, tmp_path,
                                                                        monkeypatch, capsys):
    """The checkpoint of step 15 of a 30-step run, resumed with --resume alone: the held-out
    and training losses, the weights and the rate equal the uninterrupted run's bit for bit."""
    ckpt, kept = tmp_path / "run.safetensors", tmp_path / "step15.safetensors"
    keep_save(monkeypatch, "step", 15, kept)
    whole = train({**OPTS, "data": tiny_text, "save": str(ckpt)})
    monkeypatch.undo()
    assert [row[0] for row in whole["history"]] == [15.0, 30.0]
    assert main(["train", "--resume", str(kept), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {kept} at step 15" in out and "--model gpt" in out, out
    assert "step    15/30" not in out and "step    30/30" in out
    resumed = train({"resume": str(kept), "device": "cpu", "quiet": True})
    assert resumed["start_step"] == 15 and resumed["step"] == 30
    assert resumed["history"] == whole["history"]
    assert resumed["lr"] == whole["lr"] and resumed["sample"] == whole["sample"]
    for name, value in whole["parameters"].items():
        assert np.array_equal(resumed["parameters"][name], value), name


def test_resume_with_a_new_step_total_needs_no_model_option(tiny_text, tmp_path, capsys):
    """textrun.py's own example, `gpuflow train --resume run.safetensors --steps 3000`: the
    run's model comes from the checkpoint before its options are checked (--steps was refused
    as "an option of --model gpt, not of --model mlp")."""
    ckpt = tmp_path / "run.safetensors"
    train({**OPTS, "data": tiny_text, "steps": 10, "eval_every": 10, "save": str(ckpt)})
    assert main(["train", "--resume", str(ckpt), "--steps", "20", "--eval-every", "10",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {ckpt} at step 10" in out and "step    20/20" in out, out


def test_gpt_recompute_gives_the_same_numbers_bit_for_bit(tiny_text):
    normal = train({**OPTS, "data": tiny_text, "steps": 20, "eval_every": 5})
    recomputed = train({**OPTS, "data": tiny_text, "steps": 20, "eval_every": 5,
                        "recompute": True})
    assert recomputed["history"] == normal["history"]
    for name, value in normal["parameters"].items():
        assert np.array_equal(recomputed["parameters"][name], value), name


@pytest.mark.parametrize("content, expected", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8 text"),
    (b"", "the text is empty"),
    (b"text\x00with a NUL", "holds NUL bytes")])
def test_a_bad_data_file_is_one_line(tmp_path, capsys, content, expected):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    assert main(["train", "--model", "gpt", *TINY, "--data", str(path)]) == 2
    assert expected in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv, expected", [
    (["--model", "gpt", "--epochs", "3"], "--epochs is not an option of --model gpt"),
    (["--model", "gpt", "--width", "30", "--heads", "4"], "--heads 4 does not divide --width"),
    (["--steps", "10"], "--steps is an option of --model gpt"),
    (["--model", "gpt", "--context", "0"], "--context")])
def test_options_of_the_other_model_are_refused(argv, expected, capsys):
    assert main(["train", *argv]) == 2
    assert expected in _one_error_line(capsys.readouterr().err)


def test_a_text_too_short_for_one_batch_is_one_line(tmp_path, capsys):
    path = tmp_path / "short.txt"
    path.write_text("a short text, " * 30)
    assert main(["train", "--model", "gpt", *TINY, "--data", str(path)]) == 2
    assert "fewer than one batch of 32" in _one_error_line(capsys.readouterr().err)


def test_export_writes_a_gpt_checkpoints_model(tiny_text, tmp_path, capsys):
    """Issue 20: `gpuflow export` rebuilds a GPT from the checkpoint's run.* settings and its
    vocabulary; onnxruntime and the standalone model.py give gpuflow's logits, at two
    sequence lengths."""
    ckpt = str(tmp_path / "gpt.safetensors")
    train({**OPTS, "data": tiny_text, "steps": 10, "eval_every": 10, "save": ckpt})
    has_onnx = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
    folder, onnx_path = tmp_path / "py", tmp_path / "gpt.onnx"
    args = ["export", ckpt, "--python", str(folder)] + (["--onnx", str(onnx_path)]
                                                        if has_onnx else [])
    assert main(args) == 0, capsys.readouterr().err
    assert "input ids (N, T <= 16)" in capsys.readouterr().out or not has_onnx
    info = checkpoint.read_info(ckpt)
    vocabulary = info["state"]["vocabulary"]
    ids, y = gf.Input(name="ids"), gf.Input(name="y")
    logits, _ = gf.layers.gpt(ids, len(vocabulary), 16, 16, 1, 2)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device="cpu", inputs=[ids, y],
                     outputs=[logits])
    checkpoint.load(ckpt, graph)
    namespace: dict = {}
    exec(compile((folder / "model.py").read_text(), "model.py", "exec"), namespace)
    weights = namespace["load"](str(folder / "weights.safetensors"), np)
    for rows, steps in ((1, 16), (3, 5)):
        x = np.random.default_rng(rows).integers(0, len(vocabulary), (rows, steps))
        expected = gf.to_numpy(graph.run(logits, x))
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(namespace["predict"](x, weights), expected, rtol=1e-5,
                                   atol=1e-5 * scale)
        if has_onnx:
            import onnxruntime
            session = onnxruntime.InferenceSession(str(onnx_path),
                                                   providers=["CPUExecutionProvider"])
            np.testing.assert_allclose(session.run(None, {"ids": x})[0], expected, rtol=1e-5,
                                       atol=1e-5 * scale)
