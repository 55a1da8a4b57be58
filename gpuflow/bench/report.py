"""The printed summary: the timing table, the memory and transfer table, notes."""

from __future__ import annotations

from typing import Any

from gpuflow.timing import UNSTEADY

from .variants import VARIANTS
from .workloads import CHECK_STEPS


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def _fmt_bytes(b: int | None) -> str:
    if b is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.1f} {unit}"
    return f"{b} B"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def report(results: dict[str, Any]) -> str:
    """The printed summary: timing table, memory and ledger table, notes."""
    info = results["machine"]
    head = [f"gpuflow bench on {info['device']}: {info['device_describe']}",
            f"dtype {results['dtype']}; CPU {info.get('cpu_model')}, {info['cpu_affinity']} "
            f"usable cores; NumPy BLAS threads {info['numpy_blas_threads']}, torch threads "
            f"{info.get('torch_threads', 'n/a')}, gpuflow split threads "
            f"{info.get('gpuflow_split_threads', 1)}",
            f"{results['rounds']} interleaved rounds, >= {results['min_time']} s per block; "
            "median per-step time (forward + backward + SGD update)."]
    rows = [["workload", "floor", "gpuflow Graph", "gpuflow MiniFlow", "torch eager",
             "Graph/floor", "MiniFlow/floor", "Graph/torch"]]
    mem_rows = [["workload", "mem floor", "mem Graph", "mem MiniFlow", "mem torch",
                 "Graph h2d/d2h/sync per step", "MiniFlow h2d/d2h/sync per step"]]
    notes = []
    for name, r in results["workloads"].items():
        med = r["timing"]["median_s"]
        ratios = r["ratios"]
        f = lambda x: "n/a" if x is None else f"{x:.2f}x"  # noqa: E731
        rows.append([f"{name} {r['describe']}"] + [_fmt_time(med.get(v)) for v in VARIANTS] +
                    [f(ratios["graph/floor"]), f(ratios["miniflow/floor"]),
                     f(ratios["graph/torch"])])
        led = r["timing"]["ledger_per_step"]
        lf = lambda d: "n/a" if d is None else (  # noqa: E731
            f"{d['h2d_calls']:.2f}/{d['d2h_calls']:.2f}/{d['syncs']:.2f}")
        mem_rows.append([name] + [_fmt_bytes(r["memory"].get(v, {}).get("bytes"))
                                  for v in VARIANTS] + [lf(led.get("graph")),
                                                        lf(led.get("miniflow"))])
        unsteady = r.get("unsteady") or {}
        if unsteady:
            notes.append(f"!! {name}: the rounds disagree by more than {UNSTEADY:g}x (slowest "
                         "block / fastest: " + ", ".join(f"{v} {x:.1f}x" for v, x in
                                                          unsteady.items()) +
                         "): the machine was busy and these medians and ratios may not repeat."
                         "\n   help: run again with " + ("" if results.get("threads") == 1 else
                                                     "--threads 1 (on a shared machine), ") +
                         "more --rounds, or on a quiet machine.")
        if not r["check"]["ok"]:
            notes.append(f"!!! {name}: LOSS MISMATCH: " + "; ".join(r["check"]["mismatches"]))
    mem_kinds = sorted({m["kind"] for r in results["workloads"].values()
                        for k, m in r["memory"].items() if isinstance(m, dict)})
    tail = [f"memory: {'; '.join(mem_kinds)}; process ru_maxrss "
            f"{_fmt_bytes(results['ru_maxrss_bytes'])}",
            "every variant uploads the same host batch each step (Input.value, "
            "torch.from_numpy, cupy.asarray, xp.asarray); on CPU devices that is zero-copy.",
            "loss cross-check (floor vs Graph vs MiniFlow vs torch, first "
            f"{CHECK_STEPS} steps, rtol {results['rtol']}): " +
            ("passed" if results["check_ok"] else "FAILED")]
    return "\n".join(head + ["", _table(rows), "", _table(mem_rows), ""] + tail + notes)
