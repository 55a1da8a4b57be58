"""Moving a Graph between devices: `device="fastest"`, `Graph.compare`, and the `capture` option.

A node lives on one device at a time (see `bind`). To run the same graph elsewhere, every node
is released (its values brought to the host, every array it kept on the old device dropped,
the state of nodes with `state_dict()` carried over), then bound to the new device: the same
weights, bit for bit, wherever they go.

- `device="fastest"` (or "fastest:cpu,torch:cpu" to name the candidates) times one warmed step
  of the graph at its first batch's shapes on each candidate device, keeps the fastest and
  says which and by how much.
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
import time
import warnings
from typing import Any, Sequence

import numpy as np

from .backends import LEDGER, Device, available_devices, get_device
from .errors import DeviceError, GraphError
from .nodes import NO_BUFFERS, Input, Node

FASTEST = "fastest"
# array_api_strict is a test library (slow on purpose): a candidate only when named.
_NOT_CANDIDATES = ("array_api_strict",)


# -- moving a graph -------------------------------------------------------------------------------
def _host_copy(device: Device | None, value: Any) -> Any:
    """`value` as host data (a NumPy array or the Python value it is)."""
    if device is not None and device.owns(value):
        with LEDGER.allowed():
            return np.array(device.to_host(value, what="moving the graph"), copy=True)
    return value


def node_states(graph: Any) -> dict[Node, dict[str, Any]]:
    """Host copies of the state of every node that has `state_dict()` (BatchNorm's running
    statistics)."""
    states = {}
    for node in graph.nodes:
        state_dict = getattr(node, "state_dict", None)
        if callable(state_dict) and node.device is not None:
            states[node] = {k: _host_copy(node.device, v) for k, v in state_dict().items()}
    return states


def move(graph: Any, device: Device, dtype: Any,
         states: dict[Node, dict[str, Any]] | None = None) -> None:
    """Bind every node of `graph` to `device` in `dtype` (weights and fed values carried over
    exactly, node state too, or `states` given), and plan its backward pass again; the
    gradients start empty, Dropout's masks from their seed."""
    from . import amp
    from .plan import Plan
    old = graph.device
    states = node_states(graph) if states is None else states
    for node in graph.nodes:
        _release(node, old)
    new_amp = amp.for_graph(device, dtype, graph._loss_scale)  # checked before binding
    graph.device = device
    graph.plan = Plan(graph.nodes, device, dtype, loss=graph.loss, wanted=graph.parameters,
                      reuse_buffers=graph.reuse_buffers).build()
    graph.dtype = graph.plan.dtype
    graph._run_orders = {}
    if graph.amp is not None and new_amp is not None:
        graph.amp.move_to(new_amp)  # the optimizer keeps the object it was given
    else:
        graph.amp = new_amp
    graph.steps = 0
    for node, state in states.items():
        node.load_state_dict(state)


# Per-device caches of the built-in nodes that are not arrays (SoftmaxCrossEntropy's record of
# the label dtype it checked, Dropout's device generator); None means "not yet".
_DEVICE_CACHES = ("_checked", "_rng", "_rng_device")


def _owned(device: Device | None, value: Any) -> bool:
    """Whether `value` is an array of `device` (anything else is kept)."""
    if device is None or getattr(value, "shape", None) is None or isinstance(value, type):
        return False
    try:
        return bool(device.owns(value))
    except Exception:  # noqa: BLE001 - an object the library cannot judge is not its array
        return False


def _release(node: Node, device: Device | None) -> None:
    """Unbind one node: its fed value to the host, every array it keeps on `device` dropped
    (forward recomputes what backward needs)."""
    if isinstance(node, Input):
        node._value = _host_copy(node.device, node._value)
        node._private = None
    for key, value in list(vars(node).items()):
        if key in _DEVICE_CACHES or (key != "_value" and _owned(device, value)):
            setattr(node, key, None)
    node.gradients = {}
    node.buffers = NO_BUFFERS
    for key in ("_zeros", "device", "xp", "ops", "_plan"):  # back to the class's defaults
        node.__dict__.pop(key, None)


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
    """What `device="fastest"` measured: seconds per step by device (median of `repeats`
    warmed steps), the choice, and devices that could not run the graph (with the reason)."""

    seconds: dict[str, float]
    chosen: str
    failed: dict[str, str]
    shapes: tuple

    def __str__(self) -> str:
        ranked = sorted(self.seconds.items(), key=lambda kv: kv[1])
        best = self.seconds[self.chosen]
        text = (f"gpuflow: device 'fastest' chose {self.chosen} for this graph at batch shapes "
                f"{', '.join(str(s) for s in self.shapes)}: {best * 1e3:.3g} ms per step")
        others = [f"{(t / best):.2f}x faster than {name} ({t * 1e3:.3g} ms)"
                  for name, t in ranked if name != self.chosen]
        text += (", " + ", ".join(others)) if others else " (the only candidate)"
        if self.failed:
            text += "; could not run on " + ", ".join(f"{k} ({v})" for k, v in self.failed.items())
        return text


def choose_fastest(graph: Any, batches: tuple, candidates: Sequence[str], *,
                   warmup: int = 2, repeats: int = 3) -> FastestReport:
    """Time `repeats` warmed steps of `graph` on `batches` on each candidate, move the graph to
    the fastest, print and return the report. Parameters are not updated."""
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}
    states = node_states(graph)  # timing steps train BatchNorm's statistics: put back after
    first_error: Exception | None = None
    host_batches = _host_batches(graph, batches)
    for spec in candidates:
        device = get_device(spec)
        try:
            move(graph, device, graph.plan._dtype_spec)
            times = []
            for i in range(warmup + repeats):
                start = time.perf_counter()
                graph.step(*host_batches)
                with LEDGER.allowed():
                    device.synchronize(what="timing for device='fastest'")
                if i >= warmup:
                    times.append(time.perf_counter() - start)
            seconds[device.name] = statistics.median(times)
        except Exception as exc:  # noqa: BLE001 - a device that cannot run it is reported
            first_error = first_error or exc
            failed[device.name] = str(exc).splitlines()[0][:120]
    if not seconds:
        raise GraphError(f"device 'fastest': the graph ran on none of {list(candidates)}: "
                         f"{failed}.\nhelp: pass a device spec instead.") from first_error
    chosen = min(seconds, key=seconds.__getitem__)
    move(graph, get_device(chosen), graph.plan._dtype_spec, states)
    shapes = tuple(tuple(np.shape(b)) for b in _batch_values(host_batches))
    report = FastestReport(seconds, chosen, failed, shapes)
    print(report, file=sys.stderr)
    return report


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
    from .backends import dtype_name
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
    dtype = graph.plan._dtype_spec if dtype is None else dtype
    rtol, atol = tolerances(dtype, rtol, atol)
    here = graph.device
    saved = (here, graph.plan._dtype_spec, graph.steps, graph.amp)
    masters = dict(graph.amp._written) if graph.amp is not None else None
    states = node_states(graph)
    host_batches = _host_batches(graph, batches) if batches else _current_batch(graph)
    runs = []
    try:
        for device in (here, other):
            graph.amp = None  # the comparison runs in `dtype`, without loss scaling
            move(graph, device, dtype, states)
            graph.step(*host_batches, training=training)
            runs.append(_record(graph))
    finally:
        graph.amp = None
        move(graph, here, saved[1], states)
        graph.steps, graph.amp = saved[2], saved[3]
        if masters is not None:  # the float32 masters stay valid: point them at the values
            graph.amp._written = {p: p.value for p in masters}
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
