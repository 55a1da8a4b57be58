"""Building and running a graph: MiniFlow's `topological_sort`, `forward_pass` and
`forward_and_backward`, and `Graph`, the training graph.

`topological_sort` sorts the nodes, binds every one to one device and checks every fed value
there before any compute. What a graph decides once (order, binding, backward plan) is a `Plan`
(gpuflow/runtime/plan.py), held by both MiniFlow's `SortedGraph` and `Graph`; this module runs it.
Parameter updates live in gpuflow/optim.py.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import weakref
from typing import Any, Iterable, Sequence

from .backends import LEDGER, NULL_SCOPE, Device, TransferLedger, dtype_name, get_device
from .runtime import amp
from .runtime import placement
from .runtime.buffers import copy_if_kept, forward_only
from .errors import GpuflowError, GraphError, TransferError
from .nodes import Input, Node
from .runtime.plan import Plan, kahn_sort, reachable, set_mode, unbind


class SortedGraph(list):
    """The list of nodes `topological_sort` returns; its `plan` holds the device, the dtype and
    what each step runs."""

    def __init__(self, nodes: Iterable[Node], device: Device, dtype: Any,
                 reuse_buffers: bool = True) -> None:
        super().__init__(nodes)
        self.plan = Plan(self, device, dtype, reuse_buffers=reuse_buffers)

    device = property(lambda self: self.plan.device, doc="The Device every node is bound to.")
    dtype = property(lambda self: self.plan.dtype, doc="The floating dtype of every value.")
    reuse_buffers = property(lambda self: self.plan.reuse_buffers,
                             doc="Whether nodes keep their arrays across steps.")
    backward_order = property(lambda self: self.plan.backward,
                              doc="The nodes in the order they run backward.")

    def __repr__(self) -> str:
        return summary("SortedGraph (topological_sort)", self, self.device, self.dtype,
                       [n for n in self if getattr(n, "trainable", False)], None)


def summary(title: str, nodes: Sequence[Node], device: Device, dtype: Any,
            parameters: Sequence[Node], loss: Node | None) -> str:
    """`print(graph)`: device, dtype, the nodes in graph order (`_written_order`) with their
    output shapes (once a step has run), the parameters and their number of values."""
    nodes = _written_order(nodes)
    params = set(parameters)
    counts = {p: math.prod(p.value.shape) for p in parameters
              if getattr(p.value, "shape", None) is not None}
    rows = [(str(i), n.label, "?" if getattr(n.value, "shape", None) is None
             else str(tuple(n.value.shape)),
             ("(the loss)" if n is loss else f"{counts.get(n, 0):,}" + (
                 "" if getattr(n, "trainable", True) else " (frozen)") if n in params else ""))
            for i, n in enumerate(nodes)]
    header = ("#", "node", "output shape", "parameters")
    widths = [max(len(r[c]) for r in rows + [header]) for c in range(4)]
    lines = [f"{title} on {device.name}, {dtype_name(dtype) if dtype is not None else 'fed dtype'}"
             f": {len(nodes)} nodes, {len(parameters)} parameters "
             f"({sum(counts.values()):,} values)"]
    for r in [header] + rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _written_order(nodes: Sequence[Node]) -> list[Node]:
    """`nodes` in the order a model is written: every node after its inputs, and otherwise in
    creation order (layer1's parameters before layer2's), as torch lists a module's. Kahn's
    sort from the loss, which a graph runs, may list independent nodes in another order."""
    members = set(nodes)
    waiting = {n: sum(1 for m in n.inbound_nodes if m in members) for n in nodes}
    ready = [(n._id, n) for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    order: list[Node] = []
    while ready:
        _, node = heapq.heappop(ready)
        order.append(node)
        for m in dict.fromkeys(node.outbound_nodes):
            if m in members:
                waiting[m] -= sum(1 for i in m.inbound_nodes if i is node)
                if waiting[m] == 0:
                    heapq.heappush(ready, (m._id, m))
    return order if len(order) == len(nodes) else list(nodes)


def topological_sort(feed_dict: dict, device: "str | Device | None" = None,
                     dtype: Any = None, reuse_buffers: bool = True) -> SortedGraph:
    """Sort every node reachable from the fed Inputs with Kahn's algorithm and bind it to a device.

    feed_dict: {Input: value}; values (NumPy arrays, lists, scalars) are moved to the device
    once. device: a spec ('cpu', 'cuda:0', 'auto', ...) or a Device; None means GPUFLOW_DEVICE,
    else 'cpu'. dtype: None keeps the fed floating dtype; 'float32' etc. converts floating feeds.
    reuse_buffers: nodes write values and gradients into arrays kept from step to step (no
    allocation per step), so `node.value` and `node.gradients` hold this step's numbers only:
    copy what you keep across steps (`forward_pass` returns a copy). False makes new arrays
    every step, as MiniFlow did (the rules: gpuflow/runtime/buffers.py).
    Returns the sorted nodes (a list). Raises GraphError for a missing feed or a cycle, and
    DeviceError for a value on another device.
    """
    if not isinstance(feed_dict, dict):
        raise GraphError("feed_dict must be a dict {Input: value}, got "
                         f"{type(feed_dict).__name__}"
                         ".\nhelp: topological_sort({X: x_array, y: y_array, ...}).")
    for node in feed_dict:
        if not isinstance(node, Input):
            raise GraphError(f"feed_dict key {node!r} is a {type(node).__name__}, not an Input; "
                             "only Inputs are fed.\nhelp: feed the Input nodes of the graph.")
    # Downstream of the fed Inputs, plus what those depend on (weights set through `.value`).
    nodes = reachable(reachable(list(feed_dict), "outbound_nodes"), "inbound_nodes")
    order = kahn_sort(nodes)
    graph = SortedGraph(order, get_device(device), dtype, reuse_buffers)
    # a refused sort, like a refused Graph, changes no node
    graph.plan.build(feed_dict, require_values=True, undo_on_error=True)
    return graph


def _missing_feed(node: Input) -> GraphError:
    users = ", ".join(m.label for m in node.outbound_nodes) or "no node"
    return GraphError(f"{node.label} has no value (it feeds {users}).\n"
                      f"help: feed {node.label} a batch, e.g. graph.step({{{node.label}: array}}) "
                      "or in the order of Graph(inputs=...).")


def forward_pass(output_node: Node, sorted_nodes: Sequence[Node], *,
                 training: bool = False) -> Any:
    """Run forward over `sorted_nodes`, in evaluation mode unless `training`; return
    `output_node.value` (a copy if the node reuses that array: the next pass overwrites it)."""
    set_mode(sorted_nodes, training, sorted_nodes.plan if isinstance(sorted_nodes, SortedGraph)
             else None)
    plans = dict.fromkeys(node._plan for node in sorted_nodes)
    with _scope(sorted_nodes), forward_only(plans):
        run_forward(sorted_nodes)
    return copy_if_kept(output_node.value, output_node.device)


def forward_and_backward(graph: Sequence[Node], *, training: bool = True) -> None:
    """Forward over the sorted nodes, then backward in reverse order, in training mode unless
    `training=False`."""
    if isinstance(graph, SortedGraph):
        plan = graph.plan
        plan.ensure()
        set_mode(graph, training, plan)
        for node in plan.fed:
            if node._value is None:
                node.forward()  # raises, naming the node and what it feeds
        with _scope(graph):
            _run_step(plan.compute, plan.backward)
        return
    set_mode(graph, training)
    with _scope(graph):
        _run_step(graph, graph[::-1])


def run_forward(nodes: Iterable[Node]) -> None:
    """`forward()` on each node; an error gets a note naming the node."""
    _run_step(nodes, ())


def run_backward(nodes: Iterable[Node]) -> None:
    """`backward()` on each node; an error gets a note naming the node."""
    _run_step((), nodes)


def _run_step(forward: Iterable[Node], backward: Iterable[Node]) -> None:
    """`forward()` on each of `forward`, then `backward()` on each of `backward`."""
    node, method = None, "forward"
    try:
        for node in forward:
            node.forward()
        method = "backward"
        for node in backward:
            node.backward()
    except Exception as exc:
        _name_node(exc, node, method)
        raise


def _name_node(exc: Exception, node: Node | None, method: str) -> None:
    """Say which node's `method` raised `exc`: strict mode's TransferError is raised again with
    the node in its message; other errors (not gpuflow's own) get a note."""
    if node is None:
        return
    if isinstance(exc, TransferError):
        raise TransferError(f"{node.label}.{method}(): {exc}") from exc
    if hasattr(exc, "add_note") and not isinstance(exc, GpuflowError):
        exc.add_note(f"gpuflow: raised in {node.label}.{method}()")


def _scope(graph: Sequence[Node]) -> Any:
    device = graph.device if isinstance(graph, SortedGraph) else (
        graph[0].device if graph and graph[0].device is not None else None)
    return device.scope() if device is not None else NULL_SCOPE


class Graph:
    """A graph built for training: sorted once, bound to one device, its backward planned.

    loss: the node to minimise. device: a spec or Device (None: GPUFLOW_DEVICE, else 'cpu').
    dtype: the floating dtype of every value ('float32' by default; 'float64' for checks).
    inputs: the data Inputs in the order `step`/`run` take positional batches (default: every
    Input under the loss that is not a parameter, in sorted order). parameters: what gradients
    are computed for (default: every node with a `trainable` attribute, e.g. `Parameter`); one
    whose `trainable` is False (frozen, also later: the backward is planned again) gets none.
    outputs: extra nodes to run for inference (e.g. logits for predictions).
    strict: after the first step, refuse a host<->device transfer or synchronisation in the
    forward and backward pass, except the batch upload and `item` (default:
    GPUFLOW_STRICT_TRANSFERS), where it can be seen: every one made through the `Device` on a
    device whose arrays are not host memory (cuda, torch:cuda, jax:gpu, array_api_strict),
    and a node's own float(x)/int(x)/bool(x) of a device array on array_api_strict and on
    CuPy (allow_synchronize), not on torch:cuda or jax:gpu. On cpu, torch:cpu and jax:cpu
    nothing moves: it never raises there.
    check_finite: after every step, check every value, gradient and node state (what a node
    lists in `state_arrays()`: BatchNorm's running statistics) for NaN or Inf and raise a
    GraphError naming the node where one first appeared (one extra read per step); the
    library's own overflow warnings (NumPy's) are off in those steps, the error replaces them.
    reuse_buffers: nodes write values and gradients into arrays they keep from step to step
    (NumPy, CuPy, torch): no allocation per step after the first. `node.value` and
    `p.gradients[p]` are then overwritten by the next step, as PyTorch's `.grad` is; `step`
    and `run` return arrays of the caller's own. False makes new arrays every step (the
    rules: gpuflow/runtime/buffers.py).
    dtype 'float16' or 'bfloat16' is mixed precision (gpuflow/runtime/amp.py): computed in that dtype,
    float32 master weights and optimizer state, the loss scaled ('dynamic', or loss_scale=<n>
    for a static scale); `p.gradients[p]` are then the unscaled gradients, in float32.
    device='fastest' (or 'fastest:cpu,torch:cpu') times whole steps of the first batch (the
    update of every optimizer already made over its parameters included) on each device, warmed
    until steady and in alternating rounds, keeps the fastest by the median and says how sure
    that is (gpuflow/runtime/placement.py). capture: True or 'auto' asks for one captured
    launch per step (CUDA graphs); devices without it run as usual and say so once.

    `step` runs forward and backward and returns the loss as a device scalar; `run` runs
    forward only, without gradient work; `item` reads a device scalar as a float (the one
    place that synchronises).
    """

    def __init__(self, loss: Node, *, device: "str | Device | None" = None,
                 dtype: Any = "float32", inputs: Sequence[Input] | None = None,
                 parameters: Sequence[Node] | None = None, outputs: Sequence[Node] = (),
                 strict: bool | None = None, check_finite: bool = False,
                 reuse_buffers: bool = True, loss_scale: Any = "dynamic",
                 capture: "bool | str" = False) -> None:
        if not isinstance(loss, Node):
            raise GraphError(f"Graph needs a loss node, got {type(loss).__name__}.")
        if dtype is None:
            raise GraphError("Graph(dtype=None): a Graph fixes one floating dtype for every "
                             "value.\nhelp: pass dtype='float32' (training) or 'float64'.")
        self.loss = loss
        self._fastest = placement.fastest_candidates(device) if placement.is_fastest(
            device) else None  # chosen at the first step, from its batch
        self.device = get_device(self._fastest[0] if self._fastest else device)
        self.nodes = kahn_sort(reachable([loss, *outputs], "inbound_nodes"))
        self._members = set(self.nodes)
        self.parameters = list(parameters) if parameters is not None else sorted(
            (n for n in self.nodes if hasattr(n, "trainable")), key=lambda n: n._id)
        trainable = set(self.parameters)
        self.inputs = list(inputs) if inputs is not None else sorted(  # in creation order
            (n for n in self.nodes if isinstance(n, Input) and n not in trainable),
            key=lambda n: n._id)
        stray = [n.label for n in self.inputs + self.parameters if n not in self._members]
        if stray:  # checked before binding: a refused graph changes no node
            raise GraphError(f"{', '.join(stray)} not in the graph under {loss.label}.\n"
                             "help: pass only Inputs and parameters the loss depends on.")
        self.amp = amp.for_graph(self.device, dtype, loss_scale)  # None unless float16/bfloat16
        self._loss_scale = loss_scale
        self.capture = placement.capture_option(capture, self.device)
        self.plan = Plan(self.nodes, self.device, dtype, loss=loss, wanted=self.parameters,
                         reuse_buffers=reuse_buffers).build()
        self._run_orders: dict[Node, tuple[list[Node], list[Input]]] = {}
        self.strict = TransferLedger.strict_default() if strict is None else strict
        self.check_finite = check_finite
        self.steps = 0
        self._ref = weakref.ref(self)  # one object per graph, compared by identity (amp reads it)
        amp.claim(self)  # optimizers over its parameters find its mixed precision

    # The plan holds what binding decides (it binds with them, and MiniFlow's SortedGraph has
    # no other home for them): the graph reads them there, one home for both.
    dtype = property(lambda self: self.plan.dtype, doc="The floating dtype of every value.")
    reuse_buffers = property(lambda self: self.plan.reuse_buffers,
                             doc="Whether nodes keep their arrays across steps.")

    def __repr__(self) -> str:
        return summary("Graph", self.nodes, self.device, self.dtype, self.parameters, self.loss)

    def move_to(self, device: "str | Device", dtype: Any = None, *,
                states: dict[Node, dict[str, Any]] | None = None) -> None:
        """Bind every node to `device` in `dtype` (None: the graph's dtype), the weights and
        fed values carried over exactly, node state too (BatchNorm's running statistics; or
        `states`, host copies as `placement.node_states` makes them), and plan the backward
        pass again. The gradients start empty, Dropout's masks from their seed, the step count
        from 0; mixed precision (float16/bfloat16) keeps the object optimizers hold, its float32
        masters made again from the values."""
        device = get_device(device)
        dtype = self.plan.dtype_spec if dtype is None else dtype
        states = placement.node_states(self) if states is None else states
        unbind(self.nodes, self.device)
        new_amp = amp.for_graph(device, dtype, self._loss_scale)  # checked before binding
        self.device = device
        self.plan = Plan(self.nodes, device, dtype, loss=self.loss, wanted=self.parameters,
                         reuse_buffers=self.reuse_buffers).build()
        self._run_orders = {}
        if self.amp is not None and new_amp is not None:
            self.amp.move_to(new_amp)  # the optimizer keeps the object it was given
        else:
            self.amp = new_amp
        self.steps = 0
        for node, state in states.items():
            node.load_state_dict(state)

    @contextlib.contextmanager
    def trial(self, states: dict[Node, dict[str, Any]] | None = None) -> Any:
        """Moves and steps inside the block (`graph.compare`'s) run without the graph's mixed
        precision, and leave it as it was after: its device and dtype (moved back, `states`
        or the node state of now put back), its step count, and its mixed precision (the
        object optimizers hold, whose float32 masters stay valid for the same weights)."""
        here, dtype, steps, mixed = self.device, self.plan.dtype_spec, self.steps, self.amp
        states = placement.node_states(self) if states is None else states
        self.amp = None
        try:
            yield self
        finally:
            self.amp = None
            self.move_to(here, dtype, states=states)
            self.steps, self.amp = steps, mixed
            if mixed is not None:
                mixed.values_kept()

    def named_parameters(self) -> dict[str, Node]:
        """{name: parameter} in graph order; every parameter needs a unique name."""
        named: dict[str, Node] = {}
        for p in self.parameters:
            key = p.name or p.label
            if key in named:
                raise GraphError(f"two parameters are named {key!r}.\n"
                                 "help: give every Parameter a unique name.")
            named[key] = p
        return named

    def step(self, *batches: Any, training: bool = True) -> Any:
        """Feed the batches, run forward and backward in training mode (unless
        `training=False`); return the loss (a device scalar).

        batches: one array per data Input, in the order of `self.inputs`, or one dict
        {Input: array} with every one of them (a key that is not an Input of this graph, or
        an Input left out, is a GraphError: no step silently reuses an earlier batch; Inputs
        outside `self.inputs` keep what `.value` set). Gradients land in
        `parameter.gradients[parameter]`.
        """
        if self._fastest:
            candidates, self._fastest = self._fastest, None
            self.fastest = placement.choose_fastest(self, batches, candidates)
        self.plan.ensure()
        set_mode(self.nodes, training, self.plan)
        self._feed(batches, self.inputs)
        if amp._STEPPED[0] is not self._ref:  # the parameters' gradients are this graph's
            amp.note_step(self)
        if self.amp is not None:
            self.amp.before_step(self)
        # check_finite reports the first NaN/Inf itself; mixed precision expects overflow (the
        # loss scaler skips the step): the library's warnings are off in such steps only
        with self.device.scope(), (self.device.quiet_float_errors()
                                   if self.check_finite or self.amp is not None else NULL_SCOPE):
            if self.strict and self.steps > 0:
                with LEDGER.enforcing(), self.device.forbid_sync():
                    self._forward_backward()
            else:
                self._forward_backward()
            if self.amp is not None:
                self.amp.after_step(self)
            if self.check_finite:
                self._check_finite()
            self.steps += 1
            return copy_if_kept(self.loss.value, self.device)

    def accumulate_step(self, micro_batches: Iterable[Any], *, training: bool = True) -> Any:
        """Gradient accumulation: `step` on each micro-batch, leaving in `p.gradients[p]`
        the gradient of the mean loss over all their samples (micro-batch i, of m_i samples
        along its first data Input's first axis, weighted m_i / sum(m)); return that loss
        (a device scalar). Then clip, all-reduce and `optimizer.step()` once, as after one
        `step` on the concatenated batch, whose parameters they give (gpuflow/accumulate.py;
        BatchNorm and Dropout see each micro-batch on its own, as in PyTorch).

        micro_batches: batches as `step` takes them, each a tuple (or list) of one array per
        data Input, or a dict; `gpuflow.accumulate.split_batch(k, xb, yb)` cuts a batch into k.
        """
        from .accumulate import accumulate_step
        return accumulate_step(self, micro_batches, training)

    def _forward_backward(self) -> None:
        plan = self.plan
        if self.steps == 0:  # the first step checks each node's dtype as it goes
            for node in plan.compute:
                run_forward((node,))
                self._check_dtype(node, "value", node.value)
            self._check_scalar_loss()
            run_backward(plan.backward)
            for p in self.parameters:
                self._check_dtype(p, "gradient", p.gradients.get(p))
            return
        _run_step(plan.compute, plan.backward)

    def _check_scalar_loss(self) -> None:
        """In the first step: the loss is one number (a node's output of more values, e.g.
        the logits, cannot be minimised: its backward would start from a scalar 1)."""
        shape = tuple(getattr(self.loss.value, "shape", ()))
        if math.prod(shape) != 1:
            raise GraphError(
                f"the loss, {self.loss.label}, has shape {shape}, not one number; a Graph "
                "minimises a scalar.\nhelp: put a loss node on top, e.g. "
                "Graph(gf.SoftmaxCrossEntropy(y, logits), outputs=[logits]) or "
                "Graph(gf.MSE(y, out)).")

    def _check_dtype(self, node: Node, what: str, array: Any) -> None:
        """In the first step: a floating value or gradient must have the graph's dtype. A node
        that promotes float32 to float64 (a float64 constant, a NumPy call on the host) would
        silently double the memory and time of everything after it."""
        dtype = getattr(array, "dtype", None)
        if (dtype is not None and self.device.xp.isdtype(dtype, "real floating")
                and dtype != self.dtype):
            raise GraphError(
                f"the {what} of {node.label} has dtype {dtype_name(dtype)} in a "
                f"{dtype_name(self.dtype)} graph: the node promotes it.\nhelp: make its "
                "constants with dtype=x.dtype (and device=) from its inputs, or build the "
                "graph with that dtype.")

    def _check_finite(self) -> None:
        """GraphError naming the first node (forward, then backward order) with NaN or Inf in
        its value, its state (`Node.state_arrays`) or a gradient."""
        xp = self.device.xp
        arrays = []
        for n in self.plan.compute:
            if n.value is not None:  # None: a recomputed segment's interior (recomputation)
                arrays.append((n, "value", n.value))
            arrays += [(n, f"state {name}", a) for name, a in n.state_arrays().items()]
        if self.amp is None:  # mixed precision: the loss scaler handles overflowing gradients
            arrays += [(n, f"gradient for {target.label}", g) for n in self.plan.backward
                       for target, g in n.gradients.items() if not isinstance(g, float)]
        flags = xp.stack([xp.all(xp.isfinite(a)) for _, _, a in arrays])
        if self.item(xp.all(flags)):
            return
        with LEDGER.allowed():
            host = self.device.to_host(flags, what="finite check")
        node, what, array = arrays[[bool(f) for f in host].index(False)]
        raise GraphError(f"non-finite number (NaN or Inf) first appeared in {node.label}, in "
                         f"its {what} (shape {tuple(array.shape)}) at step {self.steps}.\nhelp: "
                         "lower the learning rate, check the inputs for NaN/Inf, or use a "
                         "float64 graph to see whether it is an overflow.")

    def run(self, output: Node | None = None, *batches: Any, training: bool = False) -> Any:
        """Forward only (no gradient work) up to `output` (default: the loss), in evaluation
        mode unless `training` (Dropout off, BatchNorm's running statistics); its value.

        batches: one array per data Input that `output` depends on, in `self.inputs` order,
        or one dict {Input: array} with every one of them.
        """
        output = self.loss if output is None else output
        if output not in self._run_orders:
            if output not in self._members:
                what = output.label if isinstance(output, Node) else f"{output!r:.60}"
                raise GraphError(f"{what} is not in this graph.\n"
                                 "help: pass it as Graph(..., outputs=[node]).")
            needed = set(reachable([output], "inbound_nodes"))
            self._run_orders[output] = (
                [n for n in self.plan.compute if n in needed],
                [n for n in self.inputs if n in needed])
        self.plan.ensure()
        set_mode(self.nodes, training, self.plan)
        compute, inputs = self._run_orders[output]
        self._feed(batches, inputs)
        with self.device.scope(), forward_only((self.plan,)):
            run_forward(compute)
            return copy_if_kept(output.value, self.device)

    def compare(self, other_device: "str | Device", *batches: Any, dtype: Any = "float64",
                rtol: float | None = None, atol: float | None = None,
                training: bool = True) -> Any:
        """Run one step here and on `other_device` from the same weights, in `dtype`; return the
        first node whose value (forward order) or gradient (backward order) differs beyond
        the tolerance (default: the dtype compared's, `placement.TOLERANCES`: float64 1e-7
        relative and 1e-9 absolute, float32 1e-4 and 1e-5, float16 1e-2 and 1e-3, bfloat16
        5e-2 and 1e-2), with both numbers (a `placement.Difference`; `.found` is False if none).
        batches: as `step` takes them (default: the last batch fed). Dropout's masks differ
        between devices: pass training=False to compare a graph with Dropout. The graph is left
        as it was (device, dtype, weights, node state); its gradients are not, and Dropout's
        masks start again from their seed."""
        return placement.compare(self, other_device, batches, dtype=dtype, rtol=rtol,
                                 atol=atol, training=training)

    def profile(self, *batches: Any, steps: int = 10, warmup: int = 2,
                optimizer: Any = None) -> Any:
        """Time each node's forward and backward (and `optimizer.step()`, as a row of its own)
        over `steps` training steps on `batches` after `warmup` untimed ones; a report that
        prints as a table, slowest first (gpuflow/profiler.py). Profiling trains: the steps
        are real ones. Only these steps are timed: a normal step calls no timer."""
        from .profiler import profile
        return profile(self, batches, steps=steps, warmup=warmup, optimizer=optimizer)

    def item(self, value: Any) -> float:
        """A device scalar (e.g. the loss) as a Python float: synchronises, counted."""
        with LEDGER.allowed():
            return self.device.item(value, what="loss read")

    def _feed(self, batches: tuple, inputs: Sequence[Input]) -> None:
        """Set the Inputs' values: every one of `inputs` is fed at every step (positionally, or
        as a dict key); a dict key that is not an Input of this graph, or a dict without
        one of `inputs`, is a GraphError, and nothing is fed."""
        if len(batches) == 1 and isinstance(batches[0], dict):
            pairs: Iterable = batches[0].items()
            for n in batches[0]:
                if not isinstance(n, Input) or n not in self._members:
                    what = "not in this graph" if isinstance(n, Node) and n not in \
                        self._members else f"a {type(n).__name__}, not an Input"
                    raise GraphError(
                        f"{n.label if isinstance(n, Node) else repr(n)} is fed but is {what}."
                        f"\nhelp: feed this graph's data Inputs "
                        f"[{', '.join(i.label for i in inputs)}] (a dict key or, in that "
                        "order, positionally).")
            left_out = [n.label for n in inputs if n not in batches[0]]
            if left_out:  # it would silently reuse the previous batch
                raise GraphError(
                    f"{', '.join(left_out)} left out of the step's dict; every data Input is "
                    "fed at every step (an Input left out is not given its last batch again)."
                    f"\nhelp: add {left_out[0]} to the dict, or pass Graph(inputs=[...]) "
                    "without the Inputs you set once through .value.")
        elif len(batches) == len(inputs):
            pairs = zip(inputs, batches)
        else:
            raise GraphError(
                f"got {len(batches)} batch(es) for the inputs "
                f"[{', '.join(n.label for n in inputs)}].\n"
                "help: pass one array per input, in that order, or a dict {Input: array}.")
        with LEDGER.allowed():  # the batch upload: the one transfer a step is meant to make
            for node, value in pairs:
                node.value = value
        for node in inputs:
            if node._value is None:
                raise _missing_feed(node)
