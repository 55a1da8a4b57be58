"""Building and running a graph: Kahn's sort, binding to a device, planning, forward and backward.

`topological_sort` is MiniFlow's entry point; it also binds every node to one device and checks
every fed value there before any compute. A `Plan`, made once when a graph is built and held by
both MiniFlow's `SortedGraph` and `Graph`, records what every step needs: the order, which
nodes run forward and backward, which nodes send a gradient to which (`_senders`), which
inbound gradients each node computes (`needs_grad`), and where the gradient starts
(`_grad_seed`, 1 for the loss). Parameter updates live in gpuflow/optim.py.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Iterable, Sequence

from .backends import LEDGER, NULL_SCOPE, Device, TransferLedger, dtype_name, get_device
from . import amp, placement
from .buffers import NO_BUFFERS, Buffers, copy_feed, copy_if_kept, forward_only
from .errors import GpuflowError, GraphError, TransferError
from .nodes import Input, Node


class Plan:
    """What a graph decides once, when it is built, and every step then follows.

    nodes: every node, in topological order, bound to `device` in `dtype`. fed: the Inputs
    whose forward only checks that a value was fed (done in one loop, without calls); compute:
    the other nodes, which run forward; backward: the nodes that run backward, in backward order
    (with `loss=None`, MiniFlow's way, every node; with a loss, those between it and `wanted`).
    A node belongs to one plan at a time (`node._plan`): a plan that binds nodes of another
    marks that one `stale`, and `ensure` binds and plans it again before it next runs.
    `keeping` is False while the graph runs forward only (see buffers.forward_only).
    """

    def __init__(self, nodes: Sequence[Node], device: Device, dtype: Any, *,
                 loss: Node | None = None, wanted: Iterable[Node] = (),
                 reuse_buffers: bool = True) -> None:
        self.nodes = list(nodes)
        self.device, self.loss = device, loss
        self.dtype: Any = None       # the floating dtype of every value, once bound
        self._dtype_spec = dtype     # what the graph asked for (None: what the feeds agree on)
        self.wanted, self.reuse_buffers = list(wanted), reuse_buffers
        self.fed = [n for n in self.nodes if type(n).forward is Input.forward]
        self.compute = [n for n in self.nodes if type(n).forward is not Input.forward]
        self.backward: list[Node] = []
        self.stale = True  # nothing bound yet
        self.keeping = True

    def build(self, feed_dict: dict | None = None, require_values: bool = False,
              fresh: bool = True) -> "Plan":
        """Bind every node (see `bind`) and plan the backward pass (see `plan_backward`)."""
        self.dtype = bind(self.nodes, self.device, self._dtype_spec, feed_dict or {},
                          require_values, owner=self, reuse_buffers=self.reuse_buffers)
        if self._dtype_spec is None:  # the one the feeds agreed on: a re-bind converts to it
            self._dtype_spec = self.dtype
        wanted = [n for n in self.wanted if getattr(n, "trainable", True)]  # not the frozen
        self.backward = plan_backward(self.nodes, self.loss, wanted, fresh=fresh)
        self.stale = False
        return self

    def ensure(self) -> None:
        """Bind and plan again if another graph (a validation graph, a MiniFlow sort) over some
        of the same nodes bound them since: a node holds one binding and one plan at a time.
        The gradients already computed stay."""
        if self.stale:
            self.build(fresh=False)


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
    """`print(graph)`: device, dtype, the nodes in order with their output shapes (once a step
    has run), the parameters and their number of values."""
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


def topological_sort(feed_dict: dict, device: "str | Device | None" = None,
                     dtype: Any = None, reuse_buffers: bool = True) -> SortedGraph:
    """Sort every node reachable from the fed Inputs with Kahn's algorithm and bind it to a device.

    feed_dict: {Input: value}; values (NumPy arrays, lists, scalars) are moved to the device
    once. device: a spec ('cpu', 'cuda:0', 'auto', ...) or a Device; None means GPUFLOW_DEVICE,
    else 'cpu'. dtype: None keeps the fed floating dtype; 'float32' etc. converts floating feeds.
    reuse_buffers: nodes write values and gradients into arrays kept from step to step (no
    allocation per step), so `node.value` and `node.gradients` hold this step's numbers only:
    copy what you keep across steps (`forward_pass` returns a copy). False makes new arrays
    every step, as MiniFlow did (the rules: gpuflow/buffers.py).
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
    before = [(node, dict(node.__dict__)) for node in order]
    try:
        graph.plan.build(feed_dict, require_values=True)
    except Exception:  # a refused sort, like a refused Graph, changes no node
        for node, attributes in before:
            node.__dict__.clear()
            node.__dict__.update(attributes)
        raise
    return graph


def reachable(start: Sequence[Node], edges: str, within: set | None = None) -> list[Node]:
    """`start` and every node reached from it along `edges` ('inbound_nodes' or
    'outbound_nodes'), staying `within` a set if given, in breadth-first discovery order."""
    seen = dict.fromkeys(start)
    queue = deque(start)
    while queue:
        for n in getattr(queue.popleft(), edges):
            if n not in seen and (within is None or n in within):
                seen[n] = None
                queue.append(n)
    return list(seen)


def kahn_sort(nodes: Sequence[Node]) -> list[Node]:
    """Kahn's algorithm over `nodes` (edges inside the set only); GraphError on a cycle."""
    members = set(nodes)
    indegree = {n: sum(1 for m in n.inbound_nodes if m in members) for n in nodes}
    ready = deque(n for n in nodes if indegree[n] == 0)
    order = []
    while ready:
        node = ready.popleft()
        order.append(node)
        for m in dict.fromkeys(node.outbound_nodes):
            if m in members:
                indegree[m] -= sum(1 for i in m.inbound_nodes if i is node)
                if indegree[m] == 0:
                    ready.append(m)
    if len(order) < len(nodes):
        cycle = _find_cycle([n for n in nodes if indegree[n] > 0])
        raise GraphError("the graph has a cycle: " + " -> ".join(n.label for n in cycle) +
                         ".\nhelp: a node cannot depend on its own output; rebuild the graph "
                         "without that edge.")
    return order


def _find_cycle(stuck: list[Node]) -> list[Node]:
    """One cycle among the nodes Kahn's algorithm could not order (walk inbound edges)."""
    members = set(stuck)
    path: list[Node] = []
    node = stuck[0]
    while node not in path:
        path.append(node)
        node = next(n for n in node.inbound_nodes if n in members)
    cycle = path[path.index(node):] + [node]
    return cycle[::-1]


def bind(order: Sequence[Node], device: Device, dtype: Any, feed_dict: dict,
         require_values: bool = True, owner: Any = None, reuse_buffers: bool = True) -> Any:
    """Bind every node to `device`, and put every Input's value there, checked, in `dtype`.

    With `require_values=False` (a Graph, fed batch by batch) an Input may still be empty.
    Every node records `owner` (the Plan binding it) as `node._plan`; the plan that held it
    before is marked stale, to bind and plan again before it runs. With `reuse_buffers` (and a
    backend that writes into arrays) nodes keep their buffers across steps. Returns the
    floating dtype.
    """
    float_dtype = device.dtype(dtype)
    if float_dtype is not None and not device.is_floating(float_dtype):
        raise GraphError(f"dtype {dtype!r} is not a floating dtype.\n"
                         "help: pass dtype='float32' or 'float64' (or None to keep the fed one).")
    for node in order:
        if node.device is not None and node.device is not device:
            raise GraphError(
                f"{node.label} already belongs to a graph on {node.device.name}; this graph is "
                f"on {device.name}, and a node lives on one device.\nhelp: build the model "
                f"again for {device.name} (the same seed gives the same initial weights), or "
                "save a checkpoint and load it into the new model.")
    reuse = reuse_buffers and device.ops.writes_out
    for node in order:
        if not reuse:
            node.buffers = NO_BUFFERS
        elif node.buffers is NO_BUFFERS or node.device is not device:
            node.buffers = Buffers(node, device)
        node.device = device
        node.xp = device.xp
        node.ops = device.ops
        if node._plan is not owner and node._plan is not None:
            node._plan.stale = True  # it binds and plans again before it next runs
        node._plan = owner
    inputs = [node for node in order if isinstance(node, Input)]
    for node in inputs:
        node._float_dtype = float_dtype
        consumers = [(m, i) for m in node.outbound_nodes
                     for i, n in enumerate(m.inbound_nodes) if n is node]
        node._keep_integers = bool(consumers) and all(
            i in m.integer_inputs for m, i in consumers)
        value = feed_dict[node] if node in feed_dict else node.value
        if value is None and (node in feed_dict or require_values):
            users = ", ".join(m.label for m, _ in consumers) or "no node"
            where = "in feed_dict" if node in feed_dict else "no value"
            raise GraphError(f"{node.label} has {where}: None (it feeds {users}).\n"
                             f"help: add {node.label} to feed_dict with an array, or set its "
                             ".value before building the graph.")
        # A value from the caller (fed, or set before the graph was built) is copied once
        # (gpuflow/buffers.py): training updates it, and the caller's array must not change.
        private = node in feed_dict or getattr(node, "_private", None) is not value
        node.value = copy_feed(value, device) if private else value
        node._private = node._value
    if float_dtype is None:
        float_dtype = _one_float_dtype(inputs, device)
    return float_dtype


def _one_float_dtype(inputs: Sequence[Input], device: Device) -> Any:
    """With no dtype given, the fed floating values must agree; later feeds take that dtype.

    Mixed float32 and float64 values would silently promote the float32 ones to float64.
    """
    floats = {n: n.value.dtype for n in inputs
              if n.value is not None and device.is_floating(n.value.dtype)}
    kinds = set(floats.values())
    if len(kinds) > 1:
        listing = ", ".join(f"{n.label}: {dtype_name(d)}" for n, d in floats.items())
        raise GraphError(f"the fed values mix floating dtypes ({listing}); float32 values "
                         "would be promoted to float64 silently.\nhelp: pass dtype='float32' "
                         "or dtype='float64' to topological_sort, and every feed is converted.")
    common = next(iter(kinds)) if kinds else None
    for node in inputs:
        node._float_dtype = common
    return common


def _missing_feed(node: Input) -> GraphError:
    users = ", ".join(m.label for m in node.outbound_nodes) or "no node"
    return GraphError(f"{node.label} has no value (it feeds {users}).\n"
                      f"help: feed {node.label} a batch, e.g. graph.step({{{node.label}: array}}) "
                      "or in the order of Graph(inputs=...).")


def plan_backward(order: Sequence[Node], loss: Node | None,
                  wanted: Iterable[Node] | None = None, fresh: bool = True) -> list[Node]:
    """Decide, once, who sends gradients to whom on this graph.

    With `loss=None` (MiniFlow's `forward_and_backward`) every node runs backward and every
    gradient is computed; a loss node with no outbound node starts its own gradient at 1.
    With a loss node, only nodes between `wanted` (e.g. the trainable parameters) and the loss
    get gradients: nothing is computed for data that no one trains.
    `fresh=False` (planning again for a graph that shares nodes) keeps the gradients there.
    Returns the nodes that run backward, in backward order.
    """
    members = set(order)
    if loss is None:
        live = wants = members
    else:
        live = set(reachable([loss], "inbound_nodes", members))  # backward reaches the loss
        wanted = set(wanted or ())
        wants = set()
        for node in order:  # topological: a node wants a gradient if an input of it does
            if node in live and (node in wanted or any(n in wants for n in node.inbound_nodes)):
                wants.add(node)
    for node in order:
        if fresh:
            node.gradients = {}
        node.needs_grad = tuple(n in wants and i not in node.integer_inputs
                                for i, n in enumerate(node.inbound_nodes))
    for node in order:
        node._senders = tuple(dict.fromkeys(
            m for m in node.outbound_nodes if m in live and any(
                n is node and need for n, need in zip(m.inbound_nodes, m.needs_grad))))
        if loss is None:
            ends = not any(m in members for m in node.outbound_nodes)
            node._grad_seed = 1.0 if node.is_loss and ends else None
        else:
            node._grad_seed = 1.0 if node is loss else None
    return [node for node in reversed(order) if node in wants]


_MODE_SETS = 0  # times any graph set its nodes' training mode


def set_mode(nodes: Sequence[Node], training: bool, holder: Any = None) -> None:
    """`node.training = training` on every node, skipped when `holder` (the graph) set that
    mode last and no graph set one since (a step, not a loop over nodes, in the common case)."""
    global _MODE_SETS
    if holder is not None and getattr(holder, "_mode", None) == (training, _MODE_SETS):
        return
    for node in nodes:
        node.training = training
    _MODE_SETS += 1
    if holder is not None:
        holder._mode = (training, _MODE_SETS)


def forward_pass(output_node: Node, sorted_nodes: Sequence[Node], *,
                 training: bool = False) -> Any:
    """Run forward over `sorted_nodes`, in evaluation mode unless `training`; return
    `output_node.value` (a copy if the node reuses that array: the next pass overwrites it)."""
    set_mode(sorted_nodes, training, sorted_nodes if isinstance(sorted_nodes, SortedGraph)
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
        set_mode(graph, training, graph)
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
    strict: after the first step, refuse every host<->device transfer or synchronisation
    except the batch upload and `item` (default: GPUFLOW_STRICT_TRANSFERS).
    check_finite: after every step, check every value and gradient for NaN or Inf and raise
    a GraphError naming the node where one first appeared (one extra read per step).
    reuse_buffers: nodes write values and gradients into arrays they keep from step to step
    (NumPy, CuPy, torch): no allocation per step after the first. `node.value` and
    `p.gradients[p]` are then overwritten by the next step, as PyTorch's `.grad` is; `step`
    and `run` return arrays of the caller's own. False makes new arrays every step (the
    rules: gpuflow/buffers.py).
    dtype 'float16' or 'bfloat16' is mixed precision (gpuflow/amp.py): computed in that dtype,
    float32 master weights and optimizer state, the loss scaled ('dynamic', or loss_scale=<n>
    for a static scale); `p.gradients[p]` are then the unscaled gradients, in float32.
    device='fastest' (or 'fastest:cpu,torch:cpu') times the first batch's step on each device
    and keeps the fastest (gpuflow/placement.py). capture: True or 'auto' asks for one captured
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
        self.reuse_buffers = reuse_buffers
        self.plan = Plan(self.nodes, self.device, dtype, loss=loss, wanted=self.parameters,
                         reuse_buffers=reuse_buffers).build()
        self.dtype = self.plan.dtype
        self._run_orders: dict[Node, tuple[list[Node], list[Input]]] = {}
        self.strict = TransferLedger.strict_default() if strict is None else strict
        self.check_finite = check_finite
        self.steps = 0

    def __repr__(self) -> str:
        return summary("Graph", self.nodes, self.device, self.dtype, self.parameters, self.loss)

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
        set_mode(self.nodes, training, self)
        self._feed(batches, self.inputs)
        if self.amp is not None:
            self.amp.before_step(self)
        with self.device.scope():
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
        """GraphError naming the first node (forward, then backward order) with NaN or Inf."""
        xp = self.device.xp
        arrays = [(n, "value", n.value) for n in self.plan.compute]
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
                raise GraphError(f"{output.label} is not in this graph.\n"
                                 "help: pass it as Graph(..., outputs=[node]).")
            needed = set(reachable([output], "inbound_nodes"))
            self._run_orders[output] = (
                [n for n in self.plan.compute if n in needed],
                [n for n in self.inputs if n in needed])
        self.plan.ensure()
        set_mode(self.nodes, training, self)
        compute, inputs = self._run_orders[output]
        self._feed(batches, inputs)
        with self.device.scope(), forward_only((self.plan,)):
            run_forward(compute)
            return copy_if_kept(output.value, self.device)

    def compare(self, other_device: "str | Device", *batches: Any, dtype: Any = "float64",
                rtol: float = 1e-7, atol: float = 1e-9, training: bool = True) -> Any:
        """Run one step here and on `other_device` from the same weights, in `dtype`; return the
        first node whose value (forward order) or gradient (backward order) differs beyond
        the tolerance, with both numbers (a `placement.Difference`; `.found` is False if none).
        batches: as `step` takes them (default: the last batch fed). Dropout's masks differ
        between devices: pass training=False to compare a graph with Dropout. The graph is left
        as it was (device, dtype, weights, node state); its gradients are not, and Dropout's
        masks start again from their seed."""
        return placement.compare(self, other_device, batches, dtype=dtype, rtol=rtol,
                                 atol=atol, training=training)

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
