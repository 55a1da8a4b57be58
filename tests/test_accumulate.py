"""Gradient accumulation (issue 21 item 1): `Graph.accumulate_step` over micro-batches, then one
optimizer step, equals one step on the concatenated batch, for every optimizer, with clipping,
under float16 loss scaling, under `mpiexec -n 2` and as `gpuflow train --accumulate K`."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import gpuflow as gf
from gpuflow.accumulate import split_batch
from gpuflow.cli import main, train
from gpuflow.data import Batches
from gpuflow.optim import SGD, Adam, AdamW, clip_grad_norm

from conftest import host

sys.path.insert(0, os.path.dirname(__file__))
import distributed_script as script  # noqa: E402
from test_distributed import check, needs_mpi, run  # noqa: E402

OPTIMIZERS = {
    "sgd-momentum": lambda g: SGD(g, lr=0.1, momentum=0.9),
    "adam": lambda g: Adam(g, lr=0.01),
    "adamw": lambda g: AdamW(g, lr=0.01, weight_decay=0.1),
}
SPLITS = {
    "4x16": [(0, 16), (16, 32), (32, 48), (48, 64)],
    "10+30+24": [(0, 10), (10, 40), (40, 64)],
}


def _data(n: int = 64, features: int = 12, classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, features)), rng.integers(0, classes, n)


def _graph(device, dtype="float64", sizes=(12, 16, 4), **options):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = gf.mlp(X, list(sizes), activation="relu", seed=1)
    try:
        return gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=device, dtype=dtype,
                        inputs=[X, y], **options)
    except gf.GraphError as exc:
        if f"has no {dtype}" in str(exc):
            pytest.skip(f"{device.name}: {str(exc).splitlines()[0]}")
        raise


def _values(graph) -> list[np.ndarray]:
    return [np.array(host(graph.device, p.value), dtype=np.float64) for p in graph.parameters]


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_micro_batches_then_one_step_equal_one_step_on_the_whole_batch(device, optimizer, split):
    """Three optimizer steps, clipped to a global norm of 0.3 (which bites: the norms are
    larger), each over 4 micro-batches of 16 or 3 of 10, 30 and 24 samples: the parameters
    and losses equal those of steps on the batches of 64, to 1e-12 in float64."""
    whole, parts = _graph(device), _graph(device)
    whole_opt, parts_opt = OPTIMIZERS[optimizer](whole), OPTIMIZERS[optimizer](parts)
    for step in range(3):
        X, y = _data(seed=step)
        loss = whole.item(whole.step(X, y))
        norm = whole.item(clip_grad_norm(whole, 0.3))
        whole_opt.step()
        micro = [(X[a:b], y[a:b]) for a, b in SPLITS[split]]
        accumulated = parts.item(parts.accumulate_step(micro))
        assert parts.item(clip_grad_norm(parts, 0.3)) == pytest.approx(norm, rel=1e-12)
        parts_opt.step()
        assert norm > 0.3, "the clip must bite for this test to test it"
        assert accumulated == pytest.approx(loss, rel=1e-12)
        for p, a, b in zip(whole.parameters, _values(whole), _values(parts)):
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14, err_msg=p.label)
    assert parts_opt.t == whole_opt.t == 3
    assert parts.steps == 3 * len(SPLITS[split])  # forward-backward passes


def test_split_batch_cuts_contiguous_slices_larger_first():
    X, y = np.arange(20).reshape(10, 2), np.arange(10)
    parts = split_batch(4, X, y)
    assert [len(b[1]) for b in parts] == [3, 3, 2, 2]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in parts]), y)
    assert [len(b[0]) for b in split_batch(4, X[:2], y[:2])] == [1, 1]  # no empty micro-batch
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        split_batch(0, X, y)
    with pytest.raises(gf.GraphError, match="10 and 9 samples"):
        split_batch(2, X, y[:9])


def test_refusals_name_the_micro_batch_and_step_nothing():
    graph = _graph("cpu")
    X, y = _data()
    with pytest.raises(gf.GraphError, match="no micro-batches"):
        graph.accumulate_step([])
    with pytest.raises(gf.GraphError, match="micro-batch 1 holds no samples"):
        graph.accumulate_step([(X[:8], y[:8]), (X[:0], y[:0])])
    with pytest.raises(gf.GraphError, match="micro-batch 0: its first array is a scalar"):
        graph.accumulate_step([(np.float64(1.0), y[:1])])
    assert graph.steps == 0, "a refused accumulation runs no step"


def test_dict_micro_batches_and_a_frozen_parameter(device):
    """Micro-batches as dicts {Input: array}; a frozen parameter gets no accumulated gradient
    and keeps its value, as the optimizer skips it."""
    whole, parts = _graph(device), _graph(device)
    for g in (whole, parts):
        g.parameters[0].trainable = False
    opts = [SGD(whole, lr=0.1, momentum=0.9), SGD(parts, lr=0.1, momentum=0.9)]
    frozen = parts.parameters[0]
    kept = np.array(host(parts.device, frozen.value))
    X, y = _data()
    whole.step(X, y)
    opts[0].step()
    Xin, yin = parts.inputs
    parts.accumulate_step([{Xin: X[:40], yin: y[:40]}, {Xin: X[40:], yin: y[40:]}])
    opts[1].step()
    for a, b in zip(_values(whole), _values(parts)):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)
    assert frozen.gradients.get(frozen) is None  # no backward computed one
    np.testing.assert_array_equal(host(parts.device, frozen.value), kept)


def test_the_accumulator_is_kept_from_step_to_step():
    """One kept array per parameter: the accumulated gradient lands in the same array at every
    accumulated step (nothing allocated after the first), never in the graph's own gradient
    arrays, which each micro-batch's backward overwrites."""
    graph = _graph("cpu")
    X, y = _data()
    graph.accumulate_step(split_batch(4, X, y))
    first = [p.gradients[p] for p in graph.parameters]
    graph.accumulate_step(split_batch(3, X, y))
    again = [p.gradients[p] for p in graph.parameters]
    assert all(a is b for a, b in zip(first, again))
    graph.step(X, y)
    assert all(p.gradients[p] is not a for p, a in zip(graph.parameters, first))


def _masters_and_state(graph, opt) -> list[np.ndarray]:
    arrays = _values(graph)
    arrays += [np.array(host(graph.device, m)) for m in graph.amp.master.values()]
    arrays += [np.array(host(graph.device, a)) for p in graph.parameters
               for a in opt.state[p].values()]
    return arrays + [np.asarray(opt.t)]


def test_an_overflow_in_one_micro_batch_skips_the_whole_step(device):
    """float16 with dynamic loss scaling: the second of three micro-batches overflows (its
    inputs are 1000x larger: the scaled backward passes 65504); the accumulated gradient is not
    finite, so the optimizer skips the step: parameters, float32 masters, Adam's moments and
    its step count are as they were, and the scale halves once. The next accumulated step
    with finite micro-batches steps."""
    graph = _graph(device, "float16", sizes=(12, 32, 4))
    opt = Adam(graph, lr=1e-2)
    X, y = _data()
    X = X.astype(np.float32)
    graph.accumulate_step(split_batch(3, X, y))
    opt.step()
    before, scale = _masters_and_state(graph, opt), graph.amp.scaler.scale
    micro = split_batch(3, X, y)
    micro[1] = (micro[1][0] * 1000.0, micro[1][1])
    graph.accumulate_step(micro)
    assert not all(np.isfinite(host(device, p.gradients[p])).all() for p in graph.parameters)
    clip_grad_norm(graph, 1.0)
    opt.step()
    after = _masters_and_state(graph, opt)
    assert len(after) == len(before)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert graph.amp.scaler.skipped == 1 and graph.amp.scaler.scale == scale / 2
    graph.accumulate_step(split_batch(3, X, y))
    opt.step()
    assert opt.t == 2 and graph.amp.scaler.skipped == 1
    assert not np.array_equal(_values(graph)[0], before[0])


@needs_mpi
def test_two_ranks_accumulating_equal_one_process_and_all_reduce_once_per_step(tmp_path):
    """`mpiexec -n 2`: each rank splits its slice of every global batch of 8 into 3
    micro-batches; after 5 clipped steps both ranks hold the parameters of one process
    stepping on the whole batches (to 1e-12), and each made one all-reduce per optimizer
    step (5), not one per micro-batch (15)."""
    check(run("accumulate", str(tmp_path)))
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    assert [int(r["size"]) for r in ranks] == [2, 2]
    X, y = script.data()
    for name, make in script.OPTIMIZERS.items():
        graph = script.model()
        opt = make(graph)
        for xb, yb in Batches(X, y, 8, seed=script.DATA_SEED):
            graph.step(xb, yb)
            clip_grad_norm(graph, 0.5)
            opt.step()
        expected = script.parameters(graph)
        for r, params in enumerate(ranks):
            assert int(params[f"{name}:steps"]) == 5
            assert int(params[f"{name}:allreduces"]) == 5, f"rank {r}: one per optimizer step"
            for key, want in expected.items():
                np.testing.assert_allclose(params[f"{name}/{key}"], want, rtol=1e-12,
                                           atol=1e-15, err_msg=f"rank {r} {name} {key}")


CLI = dict(device="cpu", dtype="float64", hidden=(16,), epochs=3, optimizer="momentum",
           lr=0.05, clip=0.5, quiet=True)


def test_gpuflow_train_accumulate_2_of_32_equals_batch_64():
    """The MLP (no BatchNorm, no Dropout): --accumulate 2 --batch-size 32 takes the batches
    of 64 that --batch-size 64 takes, and its steps equal theirs: the same losses per epoch
    (1e-9), held-out accuracies and parameters (1e-12)."""
    accumulated = train({**CLI, "batch_size": 32, "accumulate": 2})
    whole = train({**CLI, "batch_size": 64})
    np.testing.assert_allclose(accumulated["losses"], whole["losses"], rtol=1e-9)
    assert accumulated["accuracies"] == whole["accuracies"]
    for name, value in whole["parameters"].items():
        np.testing.assert_allclose(accumulated["parameters"][name], value, rtol=1e-12,
                                   atol=1e-15, err_msg=name)
    plain = train({**CLI, "batch_size": 32})
    assert not np.allclose(plain["losses"], whole["losses"], rtol=1e-6)


def test_resume_carries_accumulate(tmp_path, capsys):
    """--save stores --accumulate with the run's settings; --resume takes it back, said in
    the one line, and continues as the uninterrupted run (bit for bit)."""
    ckpt = str(tmp_path / "run.safetensors")
    argv = ["train", "--device", "cpu", "--dtype", "float64", "--hidden", "16", "--batch-size",
            "16", "--accumulate", "3", "--quiet"]
    assert main([*argv, "--epochs", "1", "--save", ckpt]) == 0
    capsys.readouterr()
    assert main(["train", "--device", "cpu", "--resume", ckpt, "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    taken = [line for line in out.splitlines() if line.startswith("from the checkpoint: ")]
    assert len(taken) == 1 and "--accumulate 3" in taken[0] and "--batch-size 16" in taken[0]
    assert "batch 16, 3 accumulated per step" in out
    resumed = train({"device": "cpu", "resume": ckpt, "epochs": 2, "quiet": True})
    whole = train(dict(device="cpu", dtype="float64", hidden=(16,), batch_size=16,
                       accumulate=3, epochs=2, quiet=True))
    assert resumed["losses"] == whole["losses"]
    for name, value in whole["parameters"].items():
        assert np.array_equal(resumed["parameters"][name], value), name


def test_accumulate_is_checked(capsys):
    assert main(["train", "--device", "cpu", "--accumulate", "0"]) == 2
    assert "--accumulate must be an integer >= 1, got 0" in capsys.readouterr().err


def test_the_readme_snippet_runs():
    """The README's accumulation snippet, after its training snippet (no epochs run)."""
    import contextlib
    import io
    import re
    readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    snippet = next(b for b in blocks if "accumulate_step" in b)
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(blocks[2].replace("range(25)", "range(0)").replace('"auto"', '"cpu"'), namespace)
        exec(snippet, namespace)
    graph, opt = namespace["graph"], namespace["opt"]
    assert graph.steps == 4 * opt.t and opt.t == 6  # 1437 samples: 6 batches of up to 256
