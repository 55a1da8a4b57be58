"""The one timing loop: blocks of steps synchronised at both ends, and interleaved rounds of
them with medians. The bench (gpuflow/bench/), `device="fastest"` (runtime/placement.py), the
profiler (profiler.py) and the scripts in benchmarks/ (through `Steps`) all time through it.

Variants are timed in interleaved rounds (blocks of steps, synchronised at the end of each
block) so machine noise hits all of them alike; the median per-step time is what is compared,
and the spread of the rounds (slowest / fastest block) says how far to trust it.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Any

from .backends import LEDGER

clock = time.perf_counter  # looked up at every call: tests put a fake clock here
# Rounds of one variant that disagree by more than this factor (slowest / fastest block) are
# called unsteady in the report: the machine was busy, and the median may not repeat.
UNSTEADY = 2.0


class Variant:
    """One way of running a training step. `step()` returns the loss (on the device)."""

    ledger = False   # whether the step goes through gpuflow's transfer ledger

    def step(self) -> Any:
        raise NotImplementedError

    def read(self, loss: Any) -> float:
        """The loss as a Python float (synchronises)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Called before each timed block, untimed (device='fastest' moves its graph here)."""

    def sync(self) -> None:
        """Wait for queued device work (no-op on CPUs)."""

    def memory(self) -> dict[str, Any] | None:
        """The memory of one step, measured by the library that allocates it; None where host
        memory that tracemalloc sees holds the arrays (the caller measures that)."""
        return None


class Steps(Variant):
    """A Variant made of plain functions (the scripts in benchmarks/): `step()` runs one step
    and returns its loss (or anything), `sync(last)` waits for the device's queued work given
    what the last step returned (not called before the first step), `prepare()` runs untimed
    before each block."""

    def __init__(self, step: Any, sync: Any = None, prepare: Any = None) -> None:
        self._step, self._sync, self._prepare = step, sync, prepare
        self.last: Any = None
        self._stepped = False

    def step(self) -> Any:
        self.last, self._stepped = self._step(), True
        return self.last

    def sync(self) -> None:
        if self._sync is not None and self._stepped:
            self._sync(self.last)

    def prepare(self) -> None:
        if self._prepare is not None:
            self._prepare()


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
