"""gpuflow.bench: the quick run writes a complete JSON whose loss cross-check passed.

No timed assertions: these check that the benchmark runs and measures the same maths, never
how fast anything is.
"""

from __future__ import annotations

import json
import sys

import pytest

import gpuflow as gf
from gpuflow import bench


def _run(tmp_path, *args):
    path = tmp_path / "bench.json"
    rc = bench.main(["--quick", *args, "--json", str(path)])
    return rc, json.loads(path.read_text())


def test_bench_quick_cpu_json(tmp_path, capsys):
    rc, out = _run(tmp_path, "--workloads", "W1,W2")
    assert rc == 0
    assert out["check_ok"] is True
    assert set(out["workloads"]) == {"W1", "W2"}
    torch_ok = "torch" in sys.modules or out["machine"]["torch"] is not None
    for name, w in out["workloads"].items():
        assert w["check"]["ok"], w["check"]["mismatches"]
        timing = w["timing"]
        expected = {"floor", "graph", "miniflow"} | ({"torch"} if torch_ok else set())
        assert set(timing["median_s"]) == expected
        for variant, median in timing["median_s"].items():
            assert median > 0, (name, variant)
            assert len(timing["samples_s"][variant]) == out["rounds"]
            assert all(s > 0 for s in timing["samples_s"][variant])
        assert w["ratios"]["graph/floor"] > 0 and w["ratios"]["miniflow/floor"] > 0
        for variant in ("graph", "miniflow"):
            ledger = timing["ledger_per_step"][variant]
            assert set(ledger) >= {"h2d_calls", "d2h_calls", "syncs"}
            assert ledger["syncs"] == 0  # the cpu device never synchronises
        for variant in ("floor", "graph", "miniflow"):
            assert w["memory"][variant]["bytes"] > 0
        losses = w["check"]["losses"]
        assert len(losses["graph"]) == bench.CHECK_STEPS
    machine = out["machine"]
    assert machine["device"] == "cpu" and machine["numpy"]
    printed = capsys.readouterr().out
    assert "Graph/floor" in printed and "W2" in printed and "passed" in printed


def test_bench_quick_strict_device1(tmp_path):
    try:
        gf.get_device("array_api_strict:device1")
    except gf.DeviceError as exc:
        pytest.skip(f"array_api_strict:device1 unavailable: {str(exc).splitlines()[0]}")
    rc, out = _run(tmp_path, "--device", "array_api_strict:device1", "--workloads", "W1")
    assert rc == 0 and out["check_ok"] is True
    w = out["workloads"]["W1"]
    assert all(m > 0 for m in w["timing"]["median_s"].values())
    # device1 is not host memory: each gpuflow step uploads X and y, and reads nothing back.
    for variant in ("graph", "miniflow"):
        ledger = w["timing"]["ledger_per_step"][variant]
        assert ledger["h2d_calls"] == 2 and ledger["d2h_calls"] == 0


def test_bench_split_threads_are_set_reported_and_checked(tmp_path, capsys):
    before = gf.get_num_threads()
    try:
        rc, out = _run(tmp_path, "--workloads", "W5", "--split-threads", "2")
        assert rc == 0 and out["check_ok"] is True  # the split ops compute the same losses
        assert out["machine"]["gpuflow_split_threads"] == 2
        assert "gpuflow split threads 2" in capsys.readouterr().out
    finally:
        gf.set_num_threads(before)
    assert bench.main(["--quick", "--split-threads", "0"]) == 2
    assert "--split-threads must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--rounds", "0"], ["--rounds", "-1"],
                                    ["--min-time", "-1"]])
def test_bench_refuses_rounds_below_one_before_running(option, capsys):
    # Regression: --rounds 0 read as "not given" (args.rounds or 7) ran the full benchmark.
    assert bench.main(["--quick", "--workloads", "W1", *option]) == 2
    err = capsys.readouterr().err
    assert "must be >= 1" in err and "help:" in err, err


def test_bench_refuses_gpu_only_workload_on_cpu(capsys):
    assert bench.main(["--quick", "--workloads", "W4"]) == 2
    assert "only on GPU" in capsys.readouterr().err


def test_bench_profile_prints_the_per_node_table(tmp_path, capsys):
    """`gpuflow bench --profile W2`: Graph.profile's table for the workload, not the benchmark."""
    rc, data = _run(tmp_path, "--profile", "w2")
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("W2: 784-128-10 relu, softmax CE, batch 64, float32")
    assert "output shape" in out and "SGD update" in out and "wall per step over 2 steps" in out
    rows = data["profile"]["rows"]
    assert {r["kind"] for r in rows} >= {"Linear", "ReLU", "SoftmaxCrossEntropy", "SGD update"}
    assert [r["total_s"] for r in rows] == sorted((r["total_s"] for r in rows), reverse=True)
    assert "timing" not in data  # the benchmark itself did not run
    assert bench.main(["--quick", "--profile", "W9"]) == 2
    assert "unknown workload 'W9'" in capsys.readouterr().err
    assert bench.main(["--quick", "--profile", "W4"]) == 2


def test_bench_reports_a_loss_mismatch(tmp_path, monkeypatch, capsys):
    real = bench.NdarrayFloor.step

    def wrong(self):
        return real(self) * 1.01  # a floor whose loss is off by 1%

    monkeypatch.setattr(bench.NdarrayFloor, "step", wrong)
    rc, out = _run(tmp_path, "--workloads", "W1")
    assert rc == 1 and out["check_ok"] is False
    assert out["workloads"]["W1"]["check"]["mismatches"]
    assert "LOSS MISMATCH" in capsys.readouterr().err


def test_bench_float64_variants_do_not_share_weights(tmp_path):
    # Regression: in float64 on the CPU, topological_sort keeps a fed NumPy array as is, so the
    # MiniFlow variant and the floor once updated the same weight arrays and disagreed.
    rc, out = _run(tmp_path, "--workloads", "W1", "--dtype", "float64")
    assert rc == 0 and out["check_ok"] is True


def test_bench_package_only_floor_modules_import_array_libraries():
    # The benchmark asks the gpuflow Device for everything; a library's own calls live in its
    # floor module (floor_<lib>.py), NumPy being the host format every module may use.
    import ast
    import pathlib
    root = pathlib.Path(bench.__file__).parent
    offenders = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                top = name.split(".")[0]
                if top in {"torch", "cupy", "jax", "array_api_strict"} and \
                        not path.name.startswith("floor_"):
                    offenders.append(f"{path.name} imports {name}")
        assert len(path.read_text().splitlines()) < 600, path.name
    assert not offenders, offenders


@pytest.mark.parametrize("name", ["W5", "W6"])
def test_bench_conv_variants_agree_in_float64(device, name):
    # Every variant of the CNN workloads (floor, Graph, MiniFlow, PyTorch eager when installed)
    # trains the same network: three float64 SGD steps give the same losses to 1e-9, so the
    # hand-written forward, backward and update of each floor match autograd's.
    import dataclasses

    from gpuflow.bench.timing import cross_check
    from gpuflow.bench.variants import make_variants
    w = dataclasses.replace(bench.WORKLOADS[name], batch=2)
    variants = make_variants(w, device, "float64", 0, w.make_data("float64", 0))
    check = cross_check(variants, 1e-9)
    assert check["ok"], check["mismatches"]
    assert len(check["losses"]) == 4 - (variants["torch"] is None)
    assert len(set(check["losses"]["floor"])) == 3  # the steps change the weights


def test_bench_quick_conv_json(tmp_path):
    rc, out = _run(tmp_path, "--workloads", "W5")
    assert rc == 0 and out["check_ok"] is True
    w = out["workloads"]["W5"]
    assert w["image"] == [1, 28, 28] and w["batch"] == 64 and w["layers"][0] == ["conv", 6, 5, 2]
    assert all(m > 0 for m in w["timing"]["median_s"].values())


def test_bench_defaults_to_one_thread_on_a_small_machine(tmp_path, monkeypatch):
    # on 2 cores the default run's torch eager W2 took 0.98 ms to 124 ms; one thread repeats
    from gpuflow.bench import machine
    calls = []
    monkeypatch.setattr(bench, "set_threads", calls.append)
    monkeypatch.setattr(machine, "usable_cores", lambda: 2, raising=False)
    rc, out = _run(tmp_path, "--workloads", "W1")
    assert rc == 0 and calls == [1] and out["threads"] == 1
    monkeypatch.setattr(machine, "usable_cores", lambda: 64)
    rc, out = _run(tmp_path, "--workloads", "W1")
    assert calls == [1] and out["threads"] is None  # a large machine: the libraries' own
    monkeypatch.setattr(machine, "usable_cores", lambda: 2)
    rc, out = _run(tmp_path, "--workloads", "W1", "--threads", "0")
    assert calls == [1] and out["threads"] is None  # 0: leave them


def test_bench_says_when_the_rounds_disagree(tmp_path, monkeypatch, capsys):
    from gpuflow import timing
    real = timing.time_variants

    def one_slow_round(*args, **kwargs):  # a busy machine: one floor block 10x slower
        out = real(*args, **kwargs)
        out["samples_s"]["floor"][0] *= 10
        out["spread_x"] = {n: timing.spread(s) for n, s in out["samples_s"].items()}
        return out

    monkeypatch.setattr(bench, "time_variants", one_slow_round)
    rc, out = _run(tmp_path, "--workloads", "W1")
    assert rc == 0 and out["workloads"]["W1"]["unsteady"]["floor"] >= 2
    printed = capsys.readouterr().out
    assert "W1: the rounds disagree by more than 2x" in printed, printed
    assert "floor " in printed and "may not repeat" in printed


def test_bench_quick_gpt_w7_losses_agree(tmp_path):
    # W7 (gf.layers.gpt at batch 32): the floor, gpuflow's Graph and PyTorch eager start from
    # gf.layers.gpt's weights and report the same first losses; there is no MiniFlow GPT.
    rc, out = _run(tmp_path, "--workloads", "W7", "--rounds", "1")
    assert rc == 0 and out["check_ok"] is True
    w = out["workloads"]["W7"]
    assert (w["vocab"], w["context"], w["dim"], w["layers"], w["heads"], w["batch"]) == \
        (96, 64, 128, 2, 4, 32)
    losses = w["check"]["losses"]
    assert "miniflow" not in losses and set(losses) >= {"floor", "graph"}
    assert len(set(losses["floor"])) == 3  # the SGD steps change the weights


def test_bench_gpt_variants_agree_in_float64(device):
    # Every variant of W7 (the hand-written floor of the device's library, Graph, PyTorch eager)
    # trains the same GPT: three float64 SGD steps of a small one give the same losses to 1e-9,
    # so each floor's written-out forward and backward match autograd's.
    import dataclasses

    from gpuflow.bench.timing import cross_check
    from gpuflow.bench.variants import make_variants
    w = dataclasses.replace(bench.WORKLOADS["W7"], vocab=11, context=8, dim=16, batch=2)
    variants = make_variants(w, device, "float64", 0, w.make_data("float64", 0))
    check = cross_check(variants, 1e-9)
    assert check["ok"], check["mismatches"]
    assert variants["miniflow"] is None
    assert len(check["losses"]) == 3 - (variants["torch"] is None)
    assert len(set(check["losses"]["floor"])) == 3


def test_timing_steps_runs_plain_functions_through_the_one_loop(monkeypatch):
    # benchmarks/*.py time through gpuflow.timing.Steps: prepare before each block, untimed;
    # sync given the last step's result, inside the timed block (never before a first step).
    from gpuflow import timing
    now = [0.0]
    monkeypatch.setattr(timing, "clock", lambda: now[0])
    calls = []

    def step():
        now[0] += 0.5
        calls.append("step")
        return calls.count("step")

    def sync(last):
        now[0] += 1.0
        calls.append(("sync", last))

    v = timing.Steps(step, sync, prepare=lambda: calls.append("prepare"))
    assert timing.time_block(v, 2)[0] == (2 * 0.5 + 1.0) / 2
    assert calls == ["prepare", "step", "step", ("sync", 2)]
    calls.clear()
    assert timing.time_block(v, 1)[0] == 0.5 + 1.0
    assert calls == ["prepare", ("sync", 2), "step", ("sync", 1)]
