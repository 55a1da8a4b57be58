"""Soak tests: thousands of training steps and hundreds of checkpoint save/load cycles on the
CPU, with memory measured before and after (tracemalloc for Python and NumPy allocations, RSS
from /proc for everything else). Marked `soak`; they run in CI by default (-m "not soak" skips
them locally). Each prints its figures (pytest -s shows them)."""

from __future__ import annotations

import gc
import os
import time
import tracemalloc

import numpy as np
import pytest

import gpuflow as gf
from gpuflow.checkpoint import load, save
from gpuflow.data import Batches, load_digits
from gpuflow.optim import Adam

pytestmark = pytest.mark.soak

STEPS = 3000
CYCLES = 200
TRACED_BOUND = 16 << 10   # bytes: what Python/NumPy may still hold after the run
RSS_BOUND = 8 << 20       # bytes: allocator noise, not a leak (a leak of one batch per step
#                           would be 3000 * 16 KB = 48 MB)


def rss() -> int:
    """Current resident set size in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def model(seed=0):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = gf.mlp(X, [64, 32, 10], seed=seed)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device="cpu", dtype="float32",
                     inputs=[X, y])
    return graph, Adam(graph, lr=1e-3)


def measure(run, warmup):
    """((traced before, after), (RSS before, after), seconds) of `run()`.

    `warmup()` runs under tracemalloc too, so that "before" already counts the arrays every
    step replaces (batch, activations, gradients): the difference is what `run` kept."""
    tracemalloc.start()
    try:
        warmup()
        gc.collect()
        traced_before, _ = tracemalloc.get_traced_memory()
        rss_before = rss()
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
        gc.collect()
        traced_after, _ = tracemalloc.get_traced_memory()
        rss_after = rss()
    finally:
        tracemalloc.stop()
    return (traced_before, traced_after), (rss_before, rss_after), seconds


def test_thousands_of_training_steps_keep_memory_flat():
    graph, opt = model()
    X, y = load_digits()
    batches = Batches(X[:512], y[:512], 32, seed=0)  # 16 batches an epoch

    def steps(n):
        def go():
            done = 0
            while done < n:
                for xb, yb in batches:
                    graph.step(xb, yb)
                    opt.step()
                    done += 1
                    if done == n:
                        break
        return go

    losses = [graph.item(graph.step(X[:32], y[:32]))]
    traced, rss_pair, seconds = measure(steps(STEPS), steps(100))
    losses.append(graph.item(graph.step(X[:32], y[:32])))
    print(f"\nsoak: {STEPS} steps in {seconds:.1f} s; tracemalloc {traced[0]} -> {traced[1]} "
          f"bytes; RSS {rss_pair[0] / 2**20:.1f} -> {rss_pair[1] / 2**20:.1f} MiB; loss "
          f"{losses[0]:.3f} -> {losses[1]:.3f}")
    assert traced[1] - traced[0] < TRACED_BOUND, f"traced memory grew {traced}"
    assert rss_pair[1] - rss_pair[0] < RSS_BOUND, f"RSS grew {rss_pair}"
    assert np.isfinite(losses).all() and losses[1] < losses[0], losses


def test_hundreds_of_save_load_cycles_keep_memory_flat(tmp_path):
    graph, opt = model()
    X, y = load_digits()
    graph.step(X[:32], y[:32])
    opt.step()
    other, other_opt = model(seed=1)
    path = tmp_path / "c.safetensors"
    expected = {n: p.value.copy() for n, p in graph.named_parameters().items()}

    def cycles(n):
        def go():
            for i in range(n):
                save(path, graph, opt, step=i, state={"i": i, "rows": np.arange(64.0)})
                info = load(path, other, other_opt)
                assert info["step"] == i
        return go

    # warm-up: caches (zipfile, json, dtype names) fill over the first few hundred cycles
    traced, rss_pair, seconds = measure(cycles(CYCLES), cycles(300))
    print(f"\nsoak: {CYCLES} save/load cycles in {seconds:.1f} s; tracemalloc {traced[0]} -> "
          f"{traced[1]} bytes; RSS {rss_pair[0] / 2**20:.1f} -> {rss_pair[1] / 2**20:.1f} MiB")
    # a few bytes a cycle still settle in interpreter caches after the warm-up (the growth
    # slows to about 2 bytes a cycle by cycle 1000); a real leak of one array a cycle is KBs
    assert traced[1] - traced[0] < 2 * TRACED_BOUND, f"traced memory grew {traced}"
    assert rss_pair[1] - rss_pair[0] < RSS_BOUND, f"RSS grew {rss_pair}"
    for name, p in other.named_parameters().items():
        np.testing.assert_array_equal(p.value, expected[name], err_msg=name)
    assert sorted(os.listdir(tmp_path)) == ["c.safetensors"], os.listdir(tmp_path)  # no temps
