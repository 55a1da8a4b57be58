"""Moving a Graph between devices: `device="fastest"`, `Graph.compare`, and the `capture` option.

A node lives on one device at a time (see `bind`). To run the same graph elsewhere, every node
is released (its values brought to the host, every array it kept on the old device dropped,
the state of nodes with `state_dict()` carried over), then bound to the new device: the same
weights, bit for bit, wherever they go. `Graph.move_to` (gpuflow/graph.py) does it; this
module keeps the policies that move a graph, through its public methods only.

- `device="fastest"` (or "fastest:cpu,torch:cpu" to name the candidates) times whole training
  steps (graph.step and the optimizer's update) at the first batch's shapes on each candidate
  device, warmed until steady, in alternating rounds; keeps the fastest by the median and says
  which, by how much, and how sure (whether the runner-up is within the noise).
- `graph.compare(other_device, ...)` runs the same step on this device and on another one from
  the same weights (in float64 by default) and names the first node whose value or gradient
  differs beyond a tolerance, with both numbers.
- `capture=True|"auto"` asks for CUDA-graph capture of the whole step; no device has it yet in
  this build, so the option is accepted, changes nothing, and says so once per device.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import warnings
import weakref
from typing import Any, Sequence

import numpy as np

from ..backends import LEDGER, Device, available_devices, dtype_name, get_device, to_host
from ..backends.numpy import host_copy
from ..errors import DeviceError, GraphError
from ..nodes import Node

FASTEST = "fastest"
# array_api_strict is a test library (slow on purpose): a candidate only when named.
_NOT_CANDIDATES = ("array_api_strict",)


# -- moving a graph -------------------------------------------------------------------------------
def _host_copy(device: Device | None, value: Any) -> Any:
    """`value` as host data (a NumPy array or the Python value it is): backends.to_host."""
    return to_host(value, device, what="moving the graph", allowed=True)


def node_states(graph: Any) -> dict[Node, dict[str, Any]]:
    """Host copies of the state of every node that has `state_dict()` (BatchNorm's running
    statistics)."""
    states = {}
    for node in graph.nodes:
        state_dict = getattr(node, "state_dict", None)
        if callable(state_dict) and node.device is not None:
            states[node] = {k: _host_copy(node.device, v) for k, v in state_dict().items()}
    return states


# -- device="fastest" -----------------------------------------------------------------------------
def fastest_candidates(spec: str) -> list[str]:
    """The devices 'fastest' chooses among: those named after 'fastest:' (comma-separated), or
    every available device but the test library array_api_strict."""
    head, _, rest = spec.strip().partition(":")
    if rest.strip():
        names = [s.strip() for s in rest.split(",") if s.strip()]
        devices = [get_device(s).name for s in names]  # DeviceError for one we lack
    else:
        devices = [s for s in available_devices() if not s.startswith(_NOT_CANDIDATES)]
    unique = list(dict.fromkeys(devices))
    if not unique:
        raise DeviceError(f"device {spec!r}: no device to choose from.\nhelp: pass e.g. "
                          "'fastest:cpu,torch:cpu', or a device spec.")
    return unique


def is_fastest(device: Any) -> bool:
    return isinstance(device, str) and device.strip().lower().split(":")[0] == FASTEST


@dataclasses.dataclass
class FastestReport:
    """What `device="fastest"` measured: seconds per whole step (graph.step and the update of
    every optimizer over the graph's parameters) by device, the median of `samples` (one per
    interleaved round); the warm-up steps not counted; the choice; devices that could not run
    the graph (with the reason); and how sure the choice is (`sure`, `ratio`, `spread`)."""

    seconds: dict[str, float]
    chosen: str
    failed: dict[str, str]
    shapes: tuple
    samples: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    warmup_steps: dict[str, int] = dataclasses.field(default_factory=dict)
    optimizers: tuple[str, ...] = ()

    @property
    def runner_up(self) -> str | None:
        """The second fastest device (None if only one ran)."""
        ranked = sorted(self.seconds, key=self.seconds.__getitem__)
        return ranked[1] if len(ranked) > 1 else None

    @property
    def ratio(self) -> float | None:
        """The runner-up's median over the chosen device's (None if only one ran)."""
        other = self.runner_up
        return None if other is None else self.seconds[other] / self.seconds[self.chosen]

    @property
    def spread(self) -> dict[str, float]:
        """Each device's slowest round over its fastest (1.0: every round alike)."""
        return {name: max(s) / max(min(s), 1e-12) for name, s in self.samples.items() if s}

    @property
    def sure(self) -> bool:
        """Whether every round of the chosen device beat every round of the runner-up; False
        when their rounds overlap (the runner-up is within the noise)."""
        other = self.runner_up
        if other is None or not self.samples.get(other):
            return True
        return max(self.samples[self.chosen]) < min(self.samples[other])

    def __str__(self) -> str:
        ranked = sorted(self.seconds.items(), key=lambda kv: kv[1])
        best = self.seconds[self.chosen]
        spread = self.spread
        rounds = len(self.samples.get(self.chosen, ()))
        timed = ("graph.step + " + " + ".join(f"{o}.step" for o in self.optimizers)
                 if self.optimizers else "graph.step only: no optimizer over its parameters "
                 "existed yet")
        text = (f"gpuflow: device 'fastest' chose {self.chosen} for this graph at batch shapes "
                f"{', '.join(str(s) for s in self.shapes)}: {best * 1e3:.3g} ms per step "
                f"({timed}; median of {rounds} alternating rounds after warm-up")
        if self.chosen in spread:
            text += f", rounds within {spread[self.chosen]:.2f}x"
        text += ")"
        others = [f"{(t / best):.2f}x faster than {name} ({t * 1e3:.3g} ms"
                  + (f", rounds within {spread[name]:.2f}x" if name in spread else "") + ")"
                  for name, t in ranked if name != self.chosen]
        text += (", " + ", ".join(others)) if others else " (the only candidate)"
        if self.runner_up is not None:
            text += (f"; a sure choice (every round faster than {self.runner_up}'s)"
                     if self.sure else
                     f"; NOT a sure choice: {self.runner_up} is within the noise (their "
                     f"rounds overlap), either will do; pass device='{self.chosen}' or "
                     f"'{self.runner_up}' to fix it")
        if self.failed:
            text += "; could not run on " + ", ".join(f"{k} ({v})" for k, v in self.failed.items())
        return text


# device='fastest' timing: each candidate is warmed until its step time is steady (the last
# STEADY_WINDOW steps within STEADY_FACTOR of each other, after at least one more: JAX compiles
# its first step), at most MAX_WARMUP steps; then ROUNDS interleaved rounds, each a block of
# steps lasting about BLOCK_SECONDS per device, the devices' order rotated every round.
MAX_WARMUP = 20
STEADY_WINDOW = 3
STEADY_FACTOR = 1.5
ROUNDS = 5
BLOCK_SECONDS = 0.01
REWARM = 2  # untimed steps after each move (the first step checks dtypes and allocates)


# Every optimizer made (gpuflow.optim's add themselves), held weakly: device='fastest' times
# the update of those over a graph's parameters as part of its step.
LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _optimizers_of(graph: Any) -> list[Any]:
    """The optimizers made so far over any of `graph`'s parameters (Adam(graph),
    Adam(graph.parameters), Adam(params_dict))."""
    params = set(graph.parameters)
    return [o for o in list(LIVE) if params.intersection(o.params)]


class _Candidate:
    """One candidate device as a `bench.timing` variant: `prepare` moves the graph here
    (weights, node state and optimizer state as they were before timing); `step` is the
    whole training step, the optimizers' updates included."""

    ledger = False

    def __init__(self, graph: Any, device: Device, batches: tuple, optimizers: list[Any],
                 weights: dict[Node, Any], states: dict[Node, dict[str, Any]]) -> None:
        self.graph, self.device, self.batches = graph, device, batches
        self.optimizers, self.weights, self.states = optimizers, weights, states

    def prepare(self) -> None:
        if self.graph.device is self.device:
            return
        self.graph.move_to(self.device, states=_copied(self.states))
        with LEDGER.allowed():
            for p, host in self.weights.items():  # every block starts from the same weights
                p.value = host_copy(host)
        for opt in self.optimizers:  # its state was on the other device: made again here
            opt.state = {p: {} for p in opt.params}
        for _ in range(REWARM):
            self.step()
        self.sync()

    def step(self) -> Any:
        loss = self.graph.step(*self.batches)
        for opt in self.optimizers:
            opt.step()
        return loss

    def sync(self) -> None:
        with LEDGER.allowed():
            self.device.synchronize(what="timing for device='fastest'")


def _copied(states: dict[Node, dict[str, Any]]) -> dict[Node, dict[str, Any]]:
    return {node: {k: host_copy(v) for k, v in state.items()} for node, state in states.items()}


def warm_until_steady(candidate: Any, max_steps: int = MAX_WARMUP) -> list[float]:
    """Untimed-for-the-choice steps of `candidate` until its step time is steady: the last
    STEADY_WINDOW steps within STEADY_FACTOR of each other, after at least one step before
    them (a compiling first step), at most `max_steps`. Returns the step times seen."""
    from .. import timing
    times: list[float] = []
    for _ in range(max_steps):
        start = timing.clock()
        candidate.step()
        candidate.sync()
        times.append(timing.clock() - start)
        last = times[-STEADY_WINDOW:]
        if len(times) > STEADY_WINDOW and max(last) <= STEADY_FACTOR * min(last):
            break
    return times


def choose_fastest(graph: Any, batches: tuple, candidates: Sequence[str], *,
                   rounds: int = ROUNDS, block_seconds: float = BLOCK_SECONDS) -> FastestReport:
    """Time whole training steps of `graph` on `batches` on each candidate (graph.step and the
    update of every optimizer made so far over its parameters), move the graph to the fastest,
    print and return the report.

    Each device is warmed until its step time is steady (`warm_until_steady`: compilation and
    first-step allocation are not counted), then the devices are timed in `rounds` interleaved
    rounds (`gpuflow.bench.timing.time_variants`, the benchmark's own helper) and compared by
    their median; the report says how sure the choice is. Timing changes nothing the user
    sees: the weights, node state (BatchNorm's statistics, Dropout's counter), optimizer state
    and step count, and the loss scale are put back as they were before it."""
    from ..timing import time_variants
    failed: dict[str, str] = {}
    states = node_states(graph)  # timing steps train BatchNorm's statistics: put back after
    weights = {p: _host_copy(graph.device, p.value) for p in graph.parameters}
    optimizers = _optimizers_of(graph)
    saved_opt = [(o, o.t, {p: {k: _host_copy(graph.device, v) for k, v in s.items()}
                           for p, s in o.state.items()}) for o in optimizers]
    amps = {id(a): a for a in [graph.amp] + [o._amp for o in optimizers] if a is not None}
    saved_amp = [(a, a.scaler.state_dict()) for a in amps.values()]
    first_error: Exception | None = None
    host_batches = _host_batches(graph, batches)
    live: dict[str, _Candidate] = {}
    warm: dict[str, list[float]] = {}
    for spec in candidates:
        device = get_device(spec)
        candidate = _Candidate(graph, device, host_batches, optimizers, weights, states)
        try:
            candidate.prepare()
            warm[device.name] = warm_until_steady(candidate)
            live[device.name] = candidate
        except Exception as exc:  # noqa: BLE001 - a device that cannot run it is reported
            first_error = first_error or exc
            failed[device.name] = str(exc).splitlines()[0][:120]
    if not live:
        _put_back(graph, graph.device, weights, states, saved_opt, saved_amp)
        raise GraphError(f"device 'fastest': the graph ran on none of {list(candidates)}: "
                         f"{failed}.\nhelp: pass a device spec instead.") from first_error
    if len(live) > 1:
        timing = time_variants(dict(live), rounds, block_seconds, warmup=1)
        samples = timing["samples_s"]
    else:  # nothing to compare: the warm-up's last steps are the measurement
        samples = {name: times[-STEADY_WINDOW:] for name, times in warm.items()}
    seconds = {name: statistics.median(s) for name, s in samples.items()}
    chosen = min(seconds, key=seconds.__getitem__)
    _put_back(graph, get_device(chosen), weights, states, saved_opt, saved_amp)
    shapes = tuple(tuple(np.shape(b)) for b in _batch_values(host_batches))
    report = FastestReport(seconds, chosen, failed, shapes, samples,
                           {name: len(times) for name, times in warm.items()},
                           tuple(type(o).__name__ for o in optimizers))
    print(report, file=sys.stderr)
    return report


def _put_back(graph: Any, device: Device, weights: dict[Node, Any],
              states: dict[Node, dict[str, Any]], saved_opt: list, saved_amp: list) -> None:
    """Move `graph` to `device` with everything as it was before timing."""
    graph.move_to(device, states=_copied(states))
    with LEDGER.allowed():
        for p, host in weights.items():
            p.value = host_copy(host)
        for opt, t, state in saved_opt:
            opt.t = t
            opt.state = {p: {k: p.device.put(v, opt._state_dtype(p), what="optimizer state")
                             for k, v in state.get(p, {}).items()} for p in opt.params}
    for amp_, scaler in saved_amp:
        amp_.scaler.load_state_dict(scaler)


def _batch_values(batches: tuple) -> list[Any]:
    if len(batches) == 1 and isinstance(batches[0], dict):
        return list(batches[0].values())
    return list(batches)


def _host_batches(graph: Any, batches: tuple) -> tuple:
    """The batches as host data (an array of the provisional device brought back)."""
    device = graph.device
    if len(batches) == 1 and isinstance(batches[0], dict):
        return ({k: _host_copy(device, v) for k, v in batches[0].items()},)
    return tuple(_host_copy(device, b) for b in batches)


# -- graph.compare --------------------------------------------------------------------------------
@dataclasses.dataclass
class Difference:
    """The first value or gradient that differs between two devices, or None fields if none."""

    node: str | None
    what: str | None
    index: tuple | None
    here: float | None
    there: float | None
    devices: tuple[str, str]
    compared: int

    @property
    def found(self) -> bool:
        return self.node is not None

    def __str__(self) -> str:
        a, b = self.devices
        if not self.found:
            return (f"{a} and {b} agree on all {self.compared} values and gradients of the "
                    "step")
        return (f"{self.node}'s {self.what} differs first: at {list(self.index)} {a} gives "
                f"{self.here!r}, {b} gives {self.there!r}")


# The tolerances `compare` uses for each dtype compared (rtol, atol), unless given: two
# libraries round a whole step differently (summation order, fused kernels), by a few units in
# the last place of the dtype, grown through the layers. float64's are the strictest; the others
# are about 1000 units of the dtype's epsilon (float32: 1.2e-7, float16: 9.8e-4, bfloat16:
# 7.8e-3), capped where that would pass everything, and absolute for values near 0.
TOLERANCES = {"float64": (1e-7, 1e-9), "float32": (1e-4, 1e-5),
              "float16": (1e-2, 1e-3), "bfloat16": (5e-2, 1e-2)}


def tolerances(dtype: Any, rtol: float | None = None, atol: float | None = None
               ) -> tuple[float, float]:
    """(rtol, atol) for comparing values of `dtype` (a name, a NumPy or namespace dtype):
    those given, else TOLERANCES' for that dtype (float64's for a dtype not listed)."""
    from ..backends import dtype_name
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    default = TOLERANCES.get(str(name), TOLERANCES["float64"])
    return (default[0] if rtol is None else rtol, default[1] if atol is None else atol)


def compare(graph: Any, other: "str | Device", batches: tuple, *, dtype: Any = "float64",
            rtol: float | None = None, atol: float | None = None,
            training: bool = True) -> Difference:
    """Run one step of `graph` on its device and on `other` from the same weights, in `dtype`;
    the first node (forward order, then backward order) whose value or gradient differs beyond
    rtol/atol (default: `TOLERANCES` of the dtype compared)."""
    other = get_device(other)
    if dtype is None:  # the graph's own
        dtype = dtype_name(graph.dtype)
    rtol, atol = tolerances(dtype, rtol, atol)
    here = graph.device
    states = node_states(graph)
    host_batches = _host_batches(graph, batches) if batches else _current_batch(graph)
    runs = []
    with graph.trial(states):  # put back as it was after, mixed precision included
        for device in (here, other):
            graph.move_to(device, dtype, states=states)
            graph.step(*host_batches, training=training)
            runs.append(_record(graph))
    return _first_difference(runs, (here.name, other.name), rtol, atol)


def _current_batch(graph: Any) -> tuple:
    """The data Inputs' current values (the last batch fed), as one dict."""
    missing = [n.label for n in graph.inputs if n.value is None]
    if missing:
        raise GraphError(f"compare: {', '.join(missing)} has no value yet.\nhelp: pass the "
                         "batch: graph.compare(device, X, y).")
    return ({n: _host_copy(graph.device, n.value) for n in graph.inputs},)


def _record(graph: Any) -> list[tuple[str, str, Any]]:
    """(node label, 'value' / 'gradient for X', host array) for the step just run: values in
    forward order, then gradients in backward order."""
    device = graph.device
    out = []
    for node in graph.plan.compute:
        out.append((node.label, "value", _host_copy(device, node.value)))
    for node in graph.plan.backward:
        for target, g in node.gradients.items():
            out.append((node.label, f"gradient for {target.label}", _host_copy(device, g)))
    return out


def _first_difference(runs: list, devices: tuple[str, str], rtol: float, atol: float
                      ) -> Difference:
    for (label, what, a), (_, _, b) in zip(*runs):
        a64 = np.asarray(a, dtype=np.float64)
        b64 = np.asarray(b, dtype=np.float64)
        if a64.shape != b64.shape:
            return Difference(label, f"{what} shape", (), a64.shape, b64.shape, devices,
                              len(runs[0]))
        close = np.isclose(a64, b64, rtol=rtol, atol=atol, equal_nan=True)
        if not close.all():
            index = tuple(int(i) for i in np.argwhere(~close)[0]) if a64.ndim else ()
            return Difference(label, what, index, float(a64[index]), float(b64[index]),
                              devices, len(runs[0]))
    return Difference(None, None, None, None, None, devices, len(runs[0]))


# -- capture ---------------------------------------------------------------------------------------
_SAID: set[str] = set()


def capture_option(capture: Any, device: Device) -> bool:
    """Check Graph's `capture` argument; returns whether steps are captured (never, in this
    build), saying once per device that the option changes nothing here."""
    if capture not in (False, True, "auto"):
        raise GraphError(f"Graph(capture={capture!r}): expected True, False or 'auto'.\n"
                         "help: pass capture='auto' (capture where the device supports it).")
    if capture is False:
        return False
    if device.name not in _SAID:
        _SAID.add(device.name)
        why = ("CUDA-graph capture is not implemented in this build yet (issue 11)"
               if device.is_gpu else "it has no step capture (a CUDA feature)")
        warnings.warn(f"Graph(capture={capture!r}) on {device.name}: {why}; steps run "
                      "uncaptured, with the same results.", stacklevel=3)
    return False
