"""Benchmark one training step (forward + backward + SGD update) against a hand-written floor
and PyTorch eager.

Workloads: W1-W4 are MLPs (W4 on GPUs only), W5 a LeNet-5 on 1x28x28 images (batch 64), W6
three 3x3 convolutions of 32, 64 and 128 channels, each with 2x2 max pooling, on 3x32x32 images
(batch 128), W7 the GPT of `gpuflow train --model gpt` (gf.layers.gpt: 2 layers, width 128,
4 heads, context 64, vocabulary 96; batch 32; no MiniFlow variant). For each workload, four
variants train the same network from the same seeded weights on the same fixed host batch:

  floor     the same maths hand-written in the device's own library (NumPy in place with
            out= and preallocated buffers for 'cpu', im2col + one GEMM per convolution pass;
            torch ops without autograd for torch:*, torch's own convolution and pooling kernels
            for W5/W6; CuPy with out= for cuda; plain namespace ops for array_api_strict). It
            computes nothing no one needs: no gradient for the data, a fused softmax-CE
            gradient.
  graph     gpuflow's Graph + gpuflow.optim.SGD: `graph.step(xb, yb); opt.step()`.
  miniflow  gpuflow's unchanged MiniFlow loop: Inputs for weights and data,
            `forward_and_backward(graph); sgd_update(trainables, lr)`; it still computes the
            gradient of the data Inputs.
  torch     PyTorch eager (nn.Linear, nn.Conv2d, nn.MaxPool2d + torch.optim.SGD +
            loss.backward()) on the matching torch device, when torch is installed.

Every variant uploads the host batch each step (Input.value / torch.from_numpy /
cupy.asarray / xp.asarray), as a training loop would; on the CPU that upload is free.
Variants are timed in interleaved rounds (blocks of steps, synchronised at the end of each
block) so machine noise hits all of them alike; the table shows the median per-step time.

    python -m gpuflow.bench --device cpu
    python -m gpuflow.bench --device cuda --workloads W3,W4 --json out.json
    python -m gpuflow.bench --profile W6      # which node takes the time (Graph.profile)

The package: `workloads` (networks, batches, weights), `variants` (gpuflow's Graph and MiniFlow
variants, and the table that picks a device's floor), one module per library floor
(`floor_numpy`, `floor_cupy`, `floor_torch` with PyTorch eager, `floor_array_api`), `timing`
(cross-check, interleaved rounds, memory), `machine` (versions, threads) and `report` (tables).
Only the floor modules import an array library other than NumPy, each only when it is used.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
from typing import Any, Sequence

import gpuflow as gf
from gpuflow.commandline import CommandParser, report_error
from gpuflow.errors import DeviceError
from gpuflow.timing import UNSTEADY, time_variants

from .floor_numpy import NdarrayFloor
from .machine import default_threads, machine_info, set_threads
from .report import report
from .timing import cross_check, memory
from .variants import VARIANTS, make_variants
from .workloads import CHECK_STEPS, LEARNING_RATE, WORKLOADS, ConvWorkload, Workload

__all__ = ["main", "WORKLOADS", "Workload", "ConvWorkload", "VARIANTS", "CHECK_STEPS", "NdarrayFloor"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(  # one-line errors, worded as every gpuflow command's
        prog="gpuflow bench",
        description="Time one training step (forward + backward + SGD) of gpuflow's Graph and "
                    "MiniFlow paths against a hand-written floor and PyTorch eager.")
    p.add_argument("--device", default="cpu",
                   help="gpuflow device spec: cpu, cuda[:N], torch:cpu, torch:cuda[:N], "
                        "array_api_strict[:device1] (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--workloads", default=None,
                   help="comma-separated subset of " + ",".join(WORKLOADS) +
                        " (default: all that apply; W4 only on GPUs)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds per variant per round (default 0.2)")
    p.add_argument("--threads", type=int, default=None,
                   help="set NumPy's OpenBLAS and torch's thread counts; 0 leaves the "
                        "libraries' own (default: 1 on a machine with 4 or fewer usable "
                        "cores, where more threads made the timings unrepeatable, else 0)")
    p.add_argument("--split-threads", type=int, default=None, metavar="N",
                   help="split gpuflow's large NumPy operations over N threads "
                        "(gf.set_num_threads; default: GPUFLOW_NUM_THREADS, else 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="tiny rounds for tests (2 rounds, 1 step per block)")
    p.add_argument("--json", metavar="PATH", help="write every number to PATH")
    p.add_argument("--profile", metavar="W", default=None,
                   help="instead of the benchmark, print the per-node profile of workload W's "
                        "Graph + SGD step (Graph.profile: each node's forward and backward, "
                        "the update; 10 steps, 2 with --quick)")
    return p


def _profile(name: str, device: Any, dtype: str, seed: int, quick: bool,
             json_path: str | None) -> int:
    """`gpuflow bench --profile W`: the Graph variant's step of workload W, profiled."""
    from .variants import GraphVariant
    w = WORKLOADS[name]
    print(f"[{name}] {w.describe()}: profile of the gpuflow Graph + SGD step ...",
          file=sys.stderr, flush=True)
    v = GraphVariant(w, device, dtype, seed, w.make_data(dtype, seed))
    result = v.graph.profile(v.xb, v.yb, steps=2 if quick else 10, warmup=1 if quick else 2,
                             optimizer=v.opt)
    print(f"{name}: {w.describe()}, {dtype}")
    print(result)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"workload": name, "describe": w.describe(), "dtype": dtype,
                       "profile": result.to_dict()}, f, indent=1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`gpuflow bench`: run the benchmark, print the tables; 0 if every loss cross-check passed,
    1 on a mismatch, 2 on a usage error."""
    args = _parser().parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 7)
    min_time = args.min_time if args.min_time is not None else (0.0 if args.quick else 0.2)
    warmup = 1 if args.quick else 3
    if rounds < 1 or min_time < 0:
        return report_error("gpuflow bench", f"--rounds ({rounds}) must be >= 1 and --min-time "
                            f"({min_time}) >= 0.\nhelp: e.g. --rounds 7 --min-time 0.2.")
    threads = args.threads if args.threads is not None else default_threads()
    if threads is not None and threads < 0:
        return report_error("gpuflow bench", f"--threads must be >= 0, got {args.threads}."
                            "\nhelp: pass e.g. --threads 1 (0: the libraries' own counts).")
    if threads:
        set_threads(threads)
    if args.split_threads is not None:
        if args.split_threads < 1:
            return report_error("gpuflow bench", "--split-threads must be >= 1, got "
                                f"{args.split_threads}.\nhelp: pass e.g. --split-threads 2.")
        gf.set_num_threads(args.split_threads)
    try:
        device = gf.get_device(args.device)
    except DeviceError as exc:
        return report_error("gpuflow bench", exc)
    if args.workloads:
        names = [s.strip().upper() for s in args.workloads.split(",") if s.strip()]
        unknown = [n for n in names if n not in WORKLOADS]
        if unknown:
            return report_error("gpuflow bench", f"unknown workload(s) {unknown}.\nhelp: "
                                f"choose from {','.join(WORKLOADS)}.")
        cpu_only = [n for n in names if WORKLOADS[n].gpu_only and not device.is_gpu]
        if cpu_only:
            return report_error("gpuflow bench", f"{', '.join(cpu_only)} run only on GPU devices, "
                                f"and {device.name} is not one.\nhelp: drop them from "
                                "--workloads or pass --device cuda.")
    else:
        names = [n for n, w in WORKLOADS.items() if device.is_gpu or not w.gpu_only]
    if args.profile is not None:
        name = args.profile.strip().upper()
        if name not in WORKLOADS:
            return report_error("gpuflow bench", f"--profile: unknown workload {args.profile!r}."
                                f"\nhelp: choose one of {','.join(WORKLOADS)}.")
        if WORKLOADS[name].gpu_only and not device.is_gpu:
            return report_error("gpuflow bench", f"{name} runs only on GPU devices, and "
                                f"{device.name} is not one.\nhelp: pass --device cuda, or "
                                "profile another workload.")
        return _profile(name, device, args.dtype, args.seed, args.quick, args.json)
    rtol = 1e-3 if args.dtype == "float32" else 1e-6

    results: dict[str, Any] = {"device": device.name, "dtype": args.dtype, "rounds": rounds,
                               "threads_option": args.threads, "threads": threads or None,
                               "split_threads_option": args.split_threads,
                               "min_time": min_time, "seed": args.seed, "rtol": rtol,
                               "lr": LEARNING_RATE, "workloads": {}}
    for name in names:
        w = WORKLOADS[name]
        print(f"[{name}] {w.describe()} ...", file=sys.stderr, flush=True)
        data = w.make_data(args.dtype, args.seed)
        variants = make_variants(w, device, args.dtype, args.seed, data)
        check = cross_check(variants, rtol)
        if not check["ok"]:
            print(f"\n!!! gpuflow bench {name}: LOSS MISMATCH between variants — the timings "
                  "below compare different maths:\n  " + "\n  ".join(check["mismatches"]) +
                  "\n", file=sys.stderr, flush=True)
        timing = time_variants(variants, rounds, min_time, warmup)
        med = timing["median_s"]
        results["workloads"][name] = {
            "describe": w.describe(), **w.fields(), "check": check, "timing": timing,
            "ratios": {"graph/floor": _ratio(med.get("graph"), med.get("floor")),
                       "miniflow/floor": _ratio(med.get("miniflow"), med.get("floor")),
                       "graph/torch": _ratio(med.get("graph"), med.get("torch")),
                       "miniflow/graph": _ratio(med.get("miniflow"), med.get("graph")),
                       "torch/floor": _ratio(med.get("torch"), med.get("floor"))},
            "memory": memory(variants),
            "unsteady": {v: x for v, x in timing["spread_x"].items() if x > UNSTEADY},
        }
        del variants
        gc.collect()
    results["check_ok"] = all(r["check"]["ok"] for r in results["workloads"].values())
    results["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results["machine"] = machine_info(device)
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if results["check_ok"] else 1
