"""Measuring: the loss cross-check, interleaved timing rounds with medians, memory of one step.

Variants are timed in interleaved rounds (blocks of steps, synchronised at the end of each
block) so machine noise hits all of them alike; the median per-step time is what is compared,
and the spread of the rounds (slowest / fastest block) says how far to trust it.
The rounds themselves (`time_variants`, `time_block`) live in gpuflow/timing.py, shared with
`device="fastest"` (gpuflow/runtime/placement.py) and the profiler (gpuflow/profiler.py).
"""

from __future__ import annotations

import math
import resource
import tracemalloc
from typing import Any

from gpuflow.timing import Variant

from .workloads import CHECK_STEPS

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
