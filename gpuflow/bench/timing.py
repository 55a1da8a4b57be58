"""Measuring: the loss cross-check, interleaved timing rounds with medians, memory of one step.

Variants are timed in interleaved rounds (blocks of steps, synchronised at the end of each
block) so machine noise hits all of them alike; the median per-step time is what is compared,
and the spread of the rounds (slowest / fastest block) says how far to trust it.
`device="fastest"` (gpuflow/placement.py) times its candidate devices with `time_variants` too.
"""

from __future__ import annotations

import gc
import math
import resource
import statistics
import time
import tracemalloc
from typing import Any

from gpuflow.backends import LEDGER

from .variants import Variant
from .workloads import CHECK_STEPS

clock = time.perf_counter  # looked up at every call: tests put a fake clock here
# Rounds of one variant that disagree by more than this factor (slowest / fastest block) are
# called unsteady in the report: the machine was busy, and the median may not repeat.
UNSTEADY = 2.0


def cross_check(variants: dict[str, Variant | None], rtol: float) -> dict[str, Any]:
    """Run CHECK_STEPS steps of each variant; compare every loss with the floor's."""
    losses = {name: [v.read(v.step()) for _ in range(CHECK_STEPS)]
              for name, v in variants.items() if v is not None}
    ref = losses["floor"]
    bad = []
    for name, ls in losses.items():
        for i, (a, b) in enumerate(zip(ls, ref)):
            if not (math.isfinite(a) and abs(a - b) <= rtol * abs(b) + 1e-12):
                bad.append(f"{name} step {i}: loss {a!r} but the floor has {b!r}")
    return {"ok": not bad, "rtol": rtol, "losses": losses, "mismatches": bad}


def time_block(v: Variant, k: int) -> tuple[float, dict[str, int] | None]:
    """Seconds per step over k steps of `v` (synchronised before and at the end), and the
    ledger change. The one timing loop: the rounds below and the profiler
    (gpuflow/profiler.py) use it."""
    v.prepare()
    v.sync()
    before = LEDGER.snapshot() if v.ledger else None
    t0 = clock()
    for _ in range(k):
        v.step()
    after = LEDGER.snapshot() if v.ledger else None  # before the block-end sync we add
    v.sync()
    dt = (clock() - t0) / k
    delta = {key: after[key] - before[key] for key in after} if before and after else None
    return dt, delta


def time_variants(variants: dict[str, Variant | None], rounds: int, min_time: float,
                  warmup: int) -> dict[str, Any]:
    """Interleaved rounds: each round times a block of k steps of every variant in turn
    (order rotated each round). k is set in warm-up so that a block lasts about min_time.
    `spread_x`: each variant's slowest block over its fastest (above UNSTEADY: unsteady)."""
    live = [(n, v) for n, v in variants.items() if v is not None]
    steps: dict[str, int] = {}
    for name, v in live:
        per_step, _ = time_block(v, warmup)
        steps[name] = max(1, math.ceil(min_time / max(per_step, 1e-9)))
    samples: dict[str, list[float]] = {n: [] for n, _ in live}
    ledger: dict[str, dict[str, int]] = {}
    timed_steps = {n: 0 for n, _ in live}
    gc.collect()
    for r in range(rounds):
        shift = r % len(live)
        for name, v in live[shift:] + live[:shift]:
            dt, delta = time_block(v, steps[name])
            samples[name].append(dt)
            timed_steps[name] += steps[name]
            if delta is not None:
                total = ledger.setdefault(name, dict.fromkeys(delta, 0))
                for key, val in delta.items():
                    total[key] += val
    return {
        "median_s": {n: statistics.median(s) for n, s in samples.items()},
        "min_s": {n: min(s) for n, s in samples.items()},
        "spread_x": {n: spread(s) for n, s in samples.items()},
        "samples_s": samples,
        "steps_per_block": steps,
        "ledger_per_step": {n: {k: val / timed_steps[n] for k, val in d.items()}
                            for n, d in ledger.items()},
    }


def spread(samples: list[float]) -> float:
    """The slowest sample over the fastest (1.0: all alike)."""
    return max(samples) / max(min(samples), 1e-12)


def memory(variants: dict[str, Variant | None]) -> dict[str, Any]:
    """Memory of one step of each variant: what its library measures (the CuPy pool,
    torch.cuda.max_memory_allocated), else the tracemalloc peak of host arrays; ru_maxrss for
    the process."""
    out: dict[str, Any] = {}
    for name, v in variants.items():
        if v is None:
            continue
        measured = v.memory()
        out[name] = measured if measured is not None else _tracemalloc_peak(v)
    out["process_ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _tracemalloc_peak(v: Variant) -> dict[str, Any]:
    tracemalloc.start()
    tracemalloc.reset_peak()
    v.step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"kind": "tracemalloc peak of one step", "bytes": int(peak)}
