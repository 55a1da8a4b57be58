"""Where a training step's time goes: `graph.profile(*batch, steps=10, optimizer=opt)` times
each node's forward and backward and the optimizer's update, as torch.profiler's
`key_averages().table()` and Chainer's TimerHook answer "which layer?":

    report = graph.profile(xb, yb, steps=10, optimizer=opt)
    print(report)              # a table, slowest first; report.rows for the numbers

It runs `warmup` steps untimed (the first step's checks, caches, allocations), then `steps`
real training steps (`graph.step(*batch)` then `optimizer.step()`: profiling trains the
model, as torch.profiler's steps do), with a mark of the device's clock
(`Device.profile_clock()`, gpuflow/backends/) around every node's forward and backward and
around the update: CUDA events on CuPy and torch GPUs (nothing waits until the end of each
step), time.perf_counter after the device's synchronise elsewhere (JAX waits for its
asynchronous dispatch at every mark). The marks exist only inside `profile`: it wraps each
node's `forward`/`backward` for its steps and takes the wrappers off after (also when a step
raises), so a normal step calls no timer. The step's wall time is measured over the same
steps by the benchmark's timing loop (gpuflow/bench/timing.py, `time_block`); each row's
share is its time over that step, and the rows add up to the step less what runs outside
nodes (feeding the batch, mixed precision's unscaling, the loop itself): the report says how
much that is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import GraphError

__all__ = ["profile", "Profile", "Row"]


@dataclass
class Row:
    """One line of the report: a node (or the optimizer's update), its time per step."""

    node: str                  # the node's name (its label without a name), or 'optimizer'
    kind: str                  # the node's class, or the optimizer's ('SGD update')
    shape: tuple | None        # the node's output shape (None: the optimizer)
    forward_s: float | None    # seconds per step in forward (None: it has none)
    backward_s: float | None   # seconds per step in backward (None: it ran none)
    share: float = 0.0         # total_s over the step's wall time

    @property
    def total_s(self) -> float:
        return (self.forward_s or 0.0) + (self.backward_s or 0.0)


@dataclass
class Profile:
    """What `profile` measured: `rows`, slowest first, and the step's wall time `step_s`
    (seconds per step, over the same `steps`). `print(report)` shows `table()`."""

    rows: list[Row]
    step_s: float
    steps: int
    warmup: int
    device: str
    clock: str

    @property
    def accounted(self) -> float:
        """The rows' times over the step's wall time (1.0: every microsecond is in a row)."""
        return sum(r.total_s for r in self.rows) / self.step_s if self.step_s > 0 else math.nan

    def table(self, row_limit: int | None = None) -> str:
        """The rows as a text table (the first `row_limit` of them), then the step's time."""
        rows = self.rows if row_limit is None else self.rows[:row_limit]
        header = ["node", "kind", "output shape", "forward", "backward", "total", "share"]
        lines = [header] + [[r.node, r.kind, "-" if r.shape is None else str(r.shape),
                             _fmt(r.forward_s), _fmt(r.backward_s), _fmt(r.total_s),
                             f"{100 * r.share:.1f}%"] for r in rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        rule = "  ".join("-" * w for w in widths)
        text = [rule] + ["  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(line, widths)))
                         for line in lines]
        text.insert(2, rule)
        text.append(rule)
        left = f" ({len(self.rows) - len(rows)} more rows)" if len(rows) < len(self.rows) else ""
        text.append(f"step: {_fmt(self.step_s)} wall per step over {self.steps} steps (after "
                    f"{self.warmup} warm-up) on {self.device}; the rows add up to "
                    f"{100 * self.accounted:.1f}% of it{left}. Timed with {self.clock}.")
        return "\n".join(text)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """The numbers, for JSON."""
        return {"step_s": self.step_s, "steps": self.steps, "warmup": self.warmup,
                "device": self.device, "clock": self.clock, "accounted": self.accounted,
                "rows": [{"node": r.node, "kind": r.kind,
                          "shape": None if r.shape is None else list(r.shape),
                          "forward_s": r.forward_s, "backward_s": r.backward_s,
                          "total_s": r.total_s, "share": r.share} for r in self.rows]}


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e6:.1f} us" if seconds < 1e-3 else f"{seconds * 1e3:.3f} ms"


def _count(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Graph.profile: {name} must be an int >= {low}, got {value!r}.\n"
                         f"help: pass e.g. {name}={max(low, 2 if name == 'warmup' else 10)}.")
    return value


_MISSING = object()


def profile(graph: Any, batches: Sequence[Any], *, steps: int = 10, warmup: int = 2,
            optimizer: Any = None) -> Profile:
    """Profile `steps` training steps of `graph` on `batches` (as `graph.step` takes them)
    after `warmup` untimed ones; with `optimizer`, each step ends with `optimizer.step()`,
    timed as a row of its own. Returns a `Profile` (see the module's docstring)."""
    steps = _count(steps, "steps", 1)
    warmup = _count(warmup, "warmup", 0)
    if optimizer is not None and not callable(getattr(optimizer, "step", None)):
        raise GraphError(f"Graph.profile: optimizer must have step(), got "
                         f"{type(optimizer).__name__}.\nhelp: pass the gpuflow.optim optimizer "
                         "that trains this graph, or leave it out.")
    # The benchmark's timing loop (imported now: `import gpuflow` stays light).
    from .timing import Variant, time_block

    clock = graph.device.profile_clock()
    spans: list[tuple[Any, str, Any, Any]] = []  # (node or optimizer, phase, start, end)

    class Steps(Variant):
        ledger = False

        def step(self) -> Any:
            loss = graph.step(*batches)
            if optimizer is not None:
                start = clock.mark()
                optimizer.step()
                params = getattr(optimizer, "params", ())
                spans.append((optimizer, "update", start,
                              clock.mark([getattr(p, "value", None) for p in params])))
            return loss

        def sync(self) -> None:
            clock.wait()

    run = Steps()
    if warmup:
        time_block(run, warmup)
    spans.clear()  # the warm-up recorded the update's spans only: not counted
    graph.plan.ensure()
    wrapped = [(n, "forward") for n in graph.plan.compute] + \
              [(n, "backward") for n in graph.plan.backward]
    saved = [(n, method, n.__dict__.get(method, _MISSING)) for n, method in wrapped]
    try:
        for node, method in wrapped:
            setattr(node, method, _timed(node, method, getattr(node, method), clock, spans))
        step_s, _ = time_block(run, steps)
    finally:
        for node, method, before in saved:
            if before is _MISSING:
                node.__dict__.pop(method, None)
            else:
                setattr(node, method, before)
    return _report(graph, optimizer, spans, clock, step_s, steps, warmup)


def _timed(node: Any, method: str, inner: Any, clock: Any, spans: list) -> Any:
    """`inner` (a node's bound forward or backward) between two marks of `clock`."""
    def timed() -> None:
        start = clock.mark()
        inner()
        made = node.value if method == "forward" else list(node.gradients.values())
        spans.append((node, method, start, clock.mark(made)))
    return timed


def _report(graph: Any, optimizer: Any, spans: list, clock: Any, step_s: float, steps: int,
            warmup: int) -> Profile:
    totals: dict[Any, dict[str, float]] = {}
    for owner, phase, start, end in spans:  # read after the timing loop's last wait
        phase_totals = totals.setdefault(owner, {})
        phase_totals[phase] = phase_totals.get(phase, 0.0) + clock.seconds(start, end)
    rows = []
    for owner, phases in totals.items():
        if owner is optimizer:
            rows.append(Row("optimizer", f"{type(optimizer).__name__} update", None,
                            phases["update"] / steps, None))
            continue
        shape = getattr(owner.value, "shape", None)
        fwd, bwd = phases.get("forward"), phases.get("backward")
        rows.append(Row(owner.name or owner.label, type(owner).__name__,
                        None if shape is None else tuple(shape),
                        None if fwd is None else fwd / steps,
                        None if bwd is None else bwd / steps))
    for row in rows:
        row.share = row.total_s / step_s if step_s > 0 else math.nan
    rows.sort(key=lambda r: r.total_s, reverse=True)
    return Profile(rows, step_s, steps, warmup, graph.device.name, clock.kind)
