"""`gradient_check`: a node's (or a Graph's) backward pass against float64 central differences.

    x, W = gf.Input(name="x"), gf.Input(name="W")
    report = gf.gradient_check(MyNode(x, W), {x: x0, W: w0}, device="cuda")
    print(report)                          # one line per input: entries checked, worst error

Each checked entry i of each input is compared with (f(x + h e_i) - f(x - h e_i)) / 2h, f the
scalar the backward pass starts from. A node with a non-scalar output is reduced to one as
sum(node * R), R a fixed random upstream gradient (`Project`), so every output entry counts.
The check runs on any device, in float64 by default; it raises `GradientCheckError` with the
shapes and the first differing values, or returns the report (`raise_on_failure=False`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .backends import Device, dtype_name, get_device, to_host
from .errors import GpuflowError, GraphError
from .graph import Graph, reachable
from .runtime.plan import detach, restore
from .host import to_numpy
from .nodes import Input, Node

__all__ = ["gradient_check", "GradientReport", "GradientCheckError", "Project",
           "central_difference"]


class GradientCheckError(GpuflowError, AssertionError):
    """A backward pass that disagrees with central differences (an AssertionError, so that a
    test using `gradient_check` fails as a test does)."""


class Project(Node):
    """sum(node * R): a scalar loss from any node, R (an Input) a fixed upstream gradient."""

    is_loss = True

    def __init__(self, node: Node, R: Node, *, name: str | None = None):
        Node.__init__(self, [node, R], name=name)

    def forward(self) -> None:
        a, R = self.inbound_nodes
        self.value = self.xp.sum(a.value * R.value)

    def backward(self) -> None:
        g = self.upstream_gradient()
        a, R = self.inbound_nodes
        self.gradients[a] = R.value * g
        self.gradients[R] = a.value * g


def central_difference(node: Node, x0: np.ndarray, loss: Callable[[], Any], device: Device, *,
                       entries: Iterable[tuple] | None = None, h: float = 1e-6) -> np.ndarray:
    """(f(x + h) - f(x - h)) / 2h for each entry of `node`'s value (all, or `entries`), where
    f is the scalar `loss()` with `node.value` set to the perturbed host array `x`; `node` is
    left at `x0`. Entries not asked for stay 0."""
    numeric = np.zeros_like(x0)
    try:
        for i in np.ndindex(*x0.shape) if entries is None else entries:
            for sign in (1.0, -1.0):
                x = x0.copy()
                x[i] += sign * h
                node.value = x
                numeric[i] += sign * device.item(loss(), what="gradient check")
            numeric[i] /= 2 * h
    finally:
        node.value = x0
    return numeric


@dataclasses.dataclass
class InputReport:
    """How one input's backward gradient compared (see `GradientReport`)."""

    label: str
    shape: tuple[int, ...]
    checked: int               # entries compared
    bad: int                   # entries outside the tolerance
    max_abs_error: float
    max_rel_error: float
    first_bad: tuple[int, ...] | None = None
    backward: float | None = None      # at first_bad
    numeric: float | None = None       # at first_bad
    problem: str | None = None         # no gradient, or one of the wrong shape

    @property
    def ok(self) -> bool:
        return self.problem is None and self.bad == 0

    def __str__(self) -> str:
        head = f"{self.label} {self.shape}: "
        if self.problem is not None:
            return head + self.problem
        text = (f"{self.checked} entries, max abs error {self.max_abs_error:.1e}, max rel "
                f"error {self.max_rel_error:.1e}")
        if self.bad:
            text += (f"; {self.bad} differ, first at {list(self.first_bad)}: backward "
                     f"{self.backward:.10g}, central difference {self.numeric:.10g}")
        return head + text + ("" if self.ok else "  FAILED")


@dataclasses.dataclass
class GradientReport:
    """What `gradient_check` found: one `InputReport` per input checked; `ok` if all agree."""

    target: str
    device: str
    dtype: str
    rtol: float
    atol: float
    inputs: list[InputReport]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.inputs)

    def __str__(self) -> str:
        lines = [f"gradient check of {self.target} on {self.device} ({self.dtype}, rtol "
                 f"{self.rtol:g}, atol {self.atol:g}): {'OK' if self.ok else 'FAILED'}"]
        lines += [f"  {r}" for r in self.inputs]
        return "\n".join(lines)


def gradient_check(target: "Node | Graph", *batches: Any, wrt: Sequence[Node] | None = None,
                   device: "str | Device | None" = None, dtype: str = "float64",
                   h: float = 1e-6, rtol: float = 1e-6, atol: float = 1e-8,
                   samples: int | None = None, seed: int = 0,
                   raise_on_failure: bool = True) -> GradientReport:
    """Compare backward gradients with central differences on any device.

    target: a node (built on Inputs) or a Graph. batches: what feeds it, as `Graph.step` takes
    them: for a node one dict {Input: host array} (Inputs with values already set, such as
    Parameters, need none); for a Graph one array per data Input, or a dict.
    wrt: the Inputs whose gradients are checked (default: a node's floating Inputs, a Graph's
    parameters). device: default the target's own, else 'cpu'. dtype: the check's precision
    ('float64': h=1e-6 gives ~1e-9 relative accuracy). samples: check this many random
    entries (seeded) of each input instead of all of them (2 forward passes per entry).
    A node whose output is not a scalar is reduced as sum(node * R), R fixed random numbers.
    The check builds a graph of its own over the target's nodes, on `device` in `dtype`, and
    then leaves every node as it found it (device, dtype, values, gradients, buffers, state):
    the same node can be checked on one device after another, and a Graph passed in trains on
    as before.
    Returns a GradientReport; raises GradientCheckError if a gradient differs (unless
    `raise_on_failure=False`) and GraphError for a target that cannot run.
    """
    if device is None:  # the target's own (before `detach` lets go of a node's)
        device = getattr(target, "device", None)
    if isinstance(target, Graph):
        nodes = list(target.nodes)
    else:
        nodes = reachable([target], "inbound_nodes") if isinstance(target, Node) else []
    # Every node as it is (its outbound list copied: the check's reduction is appended to
    # it), then let go of its device and buffers, an Input's value a host copy: the check
    # binds the nodes to its own device, and its passes allocate arrays of their own. The
    # nodes get back their device, bindings, values, gradients, buffers and state after.
    kept = detach(nodes)
    try:
        return _check(target, batches, wrt, device, dtype, h, rtol, atol, samples, seed,
                      raise_on_failure)
    finally:
        restore(kept)


def _check(target: "Node | Graph", batches: tuple, wrt: Sequence[Node] | None,
           device: "str | Device | None", dtype: str, h: float, rtol: float, atol: float,
           samples: int | None, seed: int, raise_on_failure: bool) -> GradientReport:
    """`gradient_check` itself, on nodes that `detach` let go of their buffers."""
    if isinstance(target, Graph):
        label = f"the graph under {target.loss.label}"
        device = get_device(device if device is not None else target.device)
        wrt = list(target.parameters) if wrt is None else list(wrt)
        feed = batches[0] if len(batches) == 1 and isinstance(batches[0], dict) else None
        if feed is None:
            if len(batches) != len(target.inputs):
                raise GraphError(
                    f"gradient_check: got {len(batches)} batch(es) for the inputs "
                    f"[{', '.join(n.label for n in target.inputs)}].\nhelp: pass one array per "
                    "input, in that order, or a dict {Input: array}.")
            feed = dict(zip(target.inputs, batches))
        saved = _node_state(target.nodes)
        try:
            # inputs=[]: fed once here, then held while the entries are perturbed one by one.
            check = Graph(target.loss, device=device, dtype=dtype, inputs=[], parameters=wrt,
                          strict=False)
            _same_masks(saved)
            check.step(feed)
            extra: list[Node] = []
        except BaseException:
            _same_masks(saved, last=True)
            raise
    elif isinstance(target, Node):
        label = target.label
        device = get_device(device if device is not None else (target.device or "cpu"))
        saved = _node_state(reachable([target], "inbound_nodes"))
        try:
            check, wrt, extra = _node_graph(target, batches, wrt, device, dtype, seed, saved)
        except BaseException:
            _same_masks(saved, last=True)
            raise
    else:
        raise GraphError(f"gradient_check: expected a Node or a Graph, got "
                         f"{type(target).__name__}.\nhelp: pass the node to check (built on "
                         "Inputs) and a dict {Input: array} feeding it.")
    try:
        return _compare(check, label, wrt, h, rtol, atol, samples, seed, raise_on_failure,
                        saved)
    finally:
        _detach(extra)
        _same_masks(saved, last=True)


def _same_masks(saved: dict[Node, Any], *, last: bool = False) -> None:
    """Put every node's state back as it was before the check, before each of its passes (all
    in training mode, as the backward pass ran): Dropout draws the checked step's mask again,
    and BatchNorm's running statistics end where they started (`last`: after the check)."""
    for node, state in saved.items():
        node.load_state_dict(state)


def _node_state(nodes: Iterable[Node]) -> dict[Node, Any]:
    """The state of every node that has one (`state_dict()`, host copies): BatchNorm's running
    statistics, Dropout's position in its mask sequence."""
    saved: dict[Node, Any] = {}
    for node in nodes:
        if callable(getattr(node, "state_dict", None)):
            try:
                saved[node] = {k: v if isinstance(v, (int, float)) else to_numpy(v)
                               for k, v in node.state_dict().items()}
            except (AttributeError, TypeError):  # not bound nor fed yet: nothing to keep
                pass
    return saved


def _detach(extra: list[Node]) -> None:
    """Take the reduction node off its inputs' outbound lists: the target's graph stays its own."""
    for node in extra:
        for n in node.inbound_nodes:
            n.outbound_nodes = [m for m in n.outbound_nodes if m is not node]


def _node_graph(node: Node, batches: tuple, wrt: Sequence[Node] | None, device: Device,
                dtype: str, seed: int, saved: dict[Node, Any]
                ) -> tuple[Graph, list[Node], list[Node]]:
    """A Graph whose loss is `node` (a loss) or sum(node * R), after one step; the inputs to
    check, and the reduction node to detach afterwards."""
    if len(batches) > 1 or (batches and not isinstance(batches[0], dict)):
        raise GraphError(f"gradient_check({node.label}, ...): feed a node with one dict "
                         "{Input: array}.\nhelp: gradient_check(node, {x: x0, W: w0}).")
    feed = dict(batches[0]) if batches else {}
    leaves = [n for n in reachable([node], "inbound_nodes") if isinstance(n, Input)]
    unfed = [n.label for n in leaves if n not in feed and n.value is None]
    if unfed:
        raise GraphError(f"gradient_check({node.label}): {', '.join(unfed)} has no value.\n"
                         "help: feed it in the dict: gradient_check(node, {input: array, ...}).")
    if wrt is None:  # the floating inputs (not integer labels), in creation order
        wrt = [n for n in sorted(leaves, key=lambda n: n._id)
               if _host(feed[n] if n in feed else n.value, device).dtype.kind == "f"]
    wrt = list(wrt)
    extra: list[Node] = []
    loss = node
    if not node.is_loss:  # reduced to a scalar with a fixed random upstream gradient
        R = Input(name="upstream R")
        loss = Project(node, R, name="gradient check")
        extra = [loss]
    try:
        check = Graph(loss, device=device, dtype=dtype, inputs=[], parameters=wrt,
                      strict=False)  # inputs=[]: fed once, then held while perturbing
        if extra:
            shape = tuple(getattr(check.run(node, feed), "shape", ()))
            upstream = np.random.default_rng(seed).normal(size=shape)
            feed[R] = upstream if shape else np.float64(upstream)
        _same_masks(saved)
        check.step(feed)
    except BaseException:
        _detach(extra)
        raise
    return check, wrt, extra


def _host(value: Any, device: Device) -> Any:
    """A value as a NumPy array (device arrays brought back, host values as they are)."""
    host_data = isinstance(value, (np.ndarray, np.generic, int, float, list, tuple))
    return np.asarray(to_host(value, None if host_data else device, what="gradient check"))


def _training_loss(check: Graph, saved: dict[Node, Any]) -> Any:
    """The loss in training mode, as the checked backward pass saw it (same Dropout masks)."""
    _same_masks(saved)
    return check.run(None, {}, training=True)


def _compare(check: Graph, label: str, wrt: list[Node], h: float, rtol: float, atol: float,
             samples: int | None, seed: int, raise_on_failure: bool,
             states: dict[Node, Any]) -> GradientReport:
    """After a step of `check`: each input's gradient against central differences."""
    device = check.device
    rng = np.random.default_rng(seed)
    reports = []
    saved = {p: np.array(_host(p.value, device), dtype=np.float64) for p in wrt}
    analytic = {}
    for p in wrt:
        g = p.gradients.get(p)
        analytic[p] = None if g is None else np.array(_host(g, device), dtype=np.float64)
    for p in wrt:
        x0 = saved[p]
        shape = tuple(x0.shape)
        grad = analytic[p]
        if grad is None:
            reports.append(InputReport(p.label, shape, 0, 0, 0.0, 0.0,
                                       problem="no gradient (is it under the loss?)"))
            continue
        if grad.shape != x0.shape:
            reports.append(InputReport(p.label, shape, 0, 0, 0.0, 0.0, problem=(
                f"the backward gradient has shape {tuple(grad.shape)}, the value {shape}")))
            continue
        all_entries = list(np.ndindex(*shape))
        if samples is not None and samples < len(all_entries):
            picks = rng.choice(len(all_entries), size=samples, replace=False)
            entries = [all_entries[i] for i in sorted(picks)]
        else:
            entries = all_entries
        numeric = central_difference(p, x0, lambda: _training_loss(check, states), device,
                                     entries=entries, h=h)
        idx = tuple(np.array(entries).T) if entries and shape else ()
        a = grad[idx] if shape else grad.reshape(1)
        n = numeric[idx] if shape else numeric.reshape(1)
        close = np.isclose(a, n, rtol=rtol, atol=atol)
        abs_err = np.abs(a - n)
        rel_err = abs_err / np.maximum(np.abs(n), atol)
        report = InputReport(p.label, shape, len(entries), int((~close).sum()),
                             float(abs_err.max(initial=0.0)), float(rel_err.max(initial=0.0)))
        if report.bad:
            k = int(np.argmax(~close))
            report.first_bad = tuple(int(i) for i in entries[k])
            report.backward, report.numeric = float(a[k]), float(n[k])
        reports.append(report)
    result = GradientReport(label, device.name, dtype_name(check.dtype), rtol, atol, reports)
    if raise_on_failure and not result.ok:
        raise GradientCheckError(
            f"{result}\nhelp: the backward() of {label} disagrees with its forward(): check the "
            "gradient it stores for each input (summed over outbound nodes, the input's shape)"
            "; a kink (ReLU at 0, max ties) near an entry can also fool central differences.")
    return result
