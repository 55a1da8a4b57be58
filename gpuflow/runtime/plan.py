"""What a graph decides once, when it is built: the order, the device, the backward plan.

Kahn's sort orders the nodes; `bind` puts every node on one device (and every fed value there,
checked, in one floating dtype); `plan_backward` decides which nodes send a gradient to which
(`_senders`), which inbound gradients each node computes (`needs_grad`) and where the gradient
starts (`_grad_seed`, 1 for the loss). A `Plan` holds the result for MiniFlow's `SortedGraph`
and for `Graph` (gpuflow/graph.py, which runs it), with the little state a graph keeps
between steps: whether another graph took its nodes, whether it runs forward only, and the
training mode it last set.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Sequence

from ..backends import LEDGER, Device, dtype_name
from ..backends.numpy import host_copy
from . import recomputation
from .buffers import NO_BUFFERS, Buffers, copy_feed
from ..errors import GraphError
from ..host import to_numpy
from ..nodes import Binding, Input, Node


class Plan:
    """What a graph decides once, when it is built, and every step then follows.

    nodes: every node, in topological order, bound to `device` in `dtype`. fed: the Inputs
    whose forward only checks that a value was fed (done in one loop, without calls); compute:
    the other nodes, which run forward; backward: the nodes that run backward, in backward order
    (with `loss=None`, MiniFlow's way, every node; with a loss, those between it and `wanted`).
    A node belongs to one plan at a time (`node._plan`): a plan that binds nodes of another
    marks that one `stale`, and `ensure` binds and plans it again before it next runs.
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
        self.segments: list = []  # the recomputed segments (gpuflow/runtime/recomputation.py)
        self.stale = True   # nothing bound yet
        self.keeping = True  # False while running forward only (see buffers.forward_only)
        self.mode: bool | None = None  # the training mode set_mode last gave these nodes

    def build(self, feed_dict: dict | None = None, require_values: bool = False,
              fresh: bool = True, undo_on_error: bool = False) -> "Plan":
        """Bind every node (see `bind`) and plan the backward pass (see `plan_backward`).
        `undo_on_error`: a refused build (a missing feed: MiniFlow's topological_sort) leaves
        every node as it was."""
        if undo_on_error:
            kept = snapshot(self.nodes)
            try:
                return self.build(feed_dict, require_values, fresh)
            except Exception:
                restore(kept)
                raise
        self.dtype = bind(self.nodes, self.device, self._dtype_spec, feed_dict or {},
                          require_values, owner=self, reuse_buffers=self.reuse_buffers)
        if self._dtype_spec is None:  # the one the feeds agreed on: a re-bind converts to it
            self._dtype_spec = self.dtype
        wanted = [n for n in self.wanted if getattr(n, "trainable", True)]  # not the frozen
        self.backward = plan_backward(self.nodes, self.loss, wanted, fresh=fresh)
        self.segments = recomputation.install(self)
        self.stale = False
        self.mode = None  # another graph may have set these nodes' mode meanwhile
        return self

    dtype_spec = property(lambda self: self._dtype_spec,
                          doc="The dtype the graph asked for (None: what the feeds agree on).")

    def ensure(self) -> None:
        """Bind and plan again if another graph (a validation graph, a MiniFlow sort) over some
        of the same nodes bound them since: a node holds one binding and one plan at a time.
        The gradients already computed stay."""
        if self.stale:
            self.build(fresh=False)

    def set_buffers(self, node: Node, buffers: Any) -> None:
        """Give a node this plan binds other buffers (gpuflow/runtime/recomputation.py, as the plan
        is built: a segment's interior nodes borrow from its arena)."""
        if node._plan is not self:
            raise GraphError(f"{node.label} is not bound by this plan.")
        _set(node, "buffers", buffers)

    def seed_loss(self, value: Any) -> None:
        """Start the backward pass from `value` (mixed precision's loss scale) instead of 1."""
        self.loss._grad_seed = value


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
    Every node gets a new `Binding` (nodes/core.py) recording `owner` (the Plan binding it) as
    `node._plan`; the plan that held it before is marked stale, to bind and plan again before it runs. With `reuse_buffers` (and a
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
    for node in order:  # a new binding each: a snapshot (see `snapshot`) keeps the old one
        old = node._binding
        if not reuse:
            buffers = NO_BUFFERS
        elif old.buffers is NO_BUFFERS or old.device is not device:
            buffers = Buffers(node, device)
        else:
            buffers = old.buffers
        if old.plan is not owner and old.plan is not None:
            old.plan.stale = True  # it binds and plans again before it next runs
        _install(node, Binding(device, device.xp, device.ops, buffers, owner,
                               old.float_dtype, old.keep_integers, old.private))
    inputs = [node for node in order if isinstance(node, Input)]
    for node in inputs:
        binding = node._binding
        consumers = [(m, i) for m in node.outbound_nodes
                     for i, n in enumerate(m.inbound_nodes) if n is node]
        _set(node, "float_dtype", float_dtype)
        _set(node, "keep_integers", bool(consumers) and all(
            i in m.integer_inputs for m, i in consumers))
        value = feed_dict[node] if node in feed_dict else node.value
        if value is None and (node in feed_dict or require_values):
            users = ", ".join(m.label for m, _ in consumers) or "no node"
            where = "in feed_dict" if node in feed_dict else "no value"
            raise GraphError(f"{node.label} has {where}: None (it feeds {users}).\n"
                             f"help: add {node.label} to feed_dict with an array, or set its "
                             ".value before building the graph.")
        # A value from the caller (fed, or set before the graph was built) is copied once
        # (gpuflow/runtime/buffers.py): training updates it, and the caller's array must not change.
        private = node in feed_dict or binding.private is not value
        node.value = copy_feed(value, device) if private else value
        _set(node, "private", node._value)
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
        _set(node, "float_dtype", common)
    return common


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



def set_mode(nodes: Sequence[Node], training: bool, plan: Plan | None = None) -> None:
    """`node.training = training` on every node, skipped when `plan` (the graph's) set that
    mode last: an attribute test per step, not a loop over nodes. Setting the mode of a node
    voids the record of the plan that holds it, as binding the plan again does."""
    if plan is not None and plan.mode is training:
        return
    for node in nodes:
        node.training = training
        holder = node._plan
        if holder is not plan and holder is not None:
            holder.mode = None
    if plan is not None:
        plan.mode = training


# -- the other ways a node's binding changes: this module alone writes it -----------------------
# A Binding's fields, as node code reads them on the node (plain attributes: see nodes.Binding);
# an Input's dtype rules and private copy only on Inputs.
_NAMES = {"device": "device", "xp": "xp", "ops": "ops", "buffers": "buffers", "plan": "_plan",
          "float_dtype": "_float_dtype", "keep_integers": "_keep_integers",
          "private": "_private"}
_INPUT_ONLY = ("float_dtype", "keep_integers", "private")


def _install(node: Node, binding: Binding) -> None:
    """Give `node` its binding, and its fields as the node's attributes."""
    attributes = vars(node)
    attributes["_binding"] = binding
    for field, name in _NAMES.items():
        if field not in _INPUT_ONLY or isinstance(node, Input):
            attributes[name] = getattr(binding, field)


def _set(node: Node, field: str, value: Any) -> None:
    """Change one field of the binding `node` got from the plan being built."""
    setattr(node._binding, field, value)
    vars(node)[_NAMES[field]] = value


def unbind(nodes: Iterable[Node], device: Device | None) -> None:
    """Release every node from `device` (its graph moves to another one): a fed value to the
    host, every array the node keeps on `device` dropped (forward recomputes what backward
    needs), its gradients, its own device caches (`Node.release`), and its binding."""
    for node in nodes:
        if isinstance(node, Input):
            node._value = _host_copy(node.device, node._value)
        for key, value in list(vars(node).items()):
            if key not in ("_value", "_binding") and _owned(device, value):
                setattr(node, key, None)
        node.gradients = {}
        node.release()
        for name in ("_binding", *_NAMES.values()):  # back to the class's defaults (UNBOUND)
            vars(node).pop(name, None)


def _host_copy(device: Device | None, value: Any) -> Any:
    """`value` as host data of its own (a NumPy array, or the Python value it is)."""
    if device is not None and device.owns(value):
        with LEDGER.allowed():
            return host_copy(device.to_host(value, what="moving the graph"))
    return value


def _owned(device: Device | None, value: Any) -> bool:
    """Whether `value` is an array of `device` (anything else is kept)."""
    if device is None or getattr(value, "shape", None) is None or isinstance(value, type):
        return False
    try:
        return bool(device.owns(value))
    except Exception:  # noqa: BLE001 - an object the library cannot judge is not its array
        return False


def snapshot(nodes: Iterable[Node]) -> dict[Node, dict[str, Any]]:
    """Every node's attributes as they are, its binding included (dicts, such as the
    gradients, and the outbound list copied), for `restore`."""
    return {n: {k: dict(v) if type(v) is dict else v for k, v in vars(n).items()}
            | {"outbound_nodes": list(n.outbound_nodes)} for n in nodes}


def restore(kept: dict[Node, dict[str, Any]]) -> None:
    """Put every node's attributes back as `snapshot` found them (a plan that held them, and
    that another plan marked stale meanwhile, binds them again before it next runs)."""
    for node, attributes in kept.items():
        vars(node).clear()
        vars(node).update(attributes)


def detach(nodes: Sequence[Node]) -> dict[Node, dict[str, Any]]:
    """`snapshot` the nodes, then let each go of its device, buffers and kept zeros, and make
    an Input's value a host copy: another plan (gradient_check's) binds them to its own device,
    and its passes allocate arrays of their own instead of writing into the caller's.
    `restore` puts everything back."""
    kept = snapshot(nodes)
    for n in nodes:
        b = n._binding
        fed = isinstance(n, Input) and n.value is not None
        _install(n, Binding(None, b.xp, b.ops, NO_BUFFERS, b.plan, b.float_dtype,
                            b.keep_integers, None if fed else b.private))
        n._zeros = None
        if fed:
            n._value = to_numpy(n.value)
    return kept


def put_values(nodes: Iterable[Input], values: Iterable[Any]) -> None:
    """Set Inputs' values as they are, unchecked and uncopied: arrays a compiled step made on
    the graph's device (or traced), which are already right (gpuflow/compiled.py)."""
    for node, value in zip(nodes, values):
        node._value, node.ignore_absent = value, None  # unchecked: may hold an ignore_index


def put_seeds(nodes: Iterable[Node], seeds: Iterable[Any]) -> None:
    """Give Dropout nodes the seeds a compiled step takes as arguments (`_seed_in`, traced
    arrays: gpuflow/compiled.py), while it is traced; `restore` puts back the None they hold
    otherwise (each then draws from its own seed and step count)."""
    for node, seed in zip(nodes, seeds):
        node._seed_in = seed


def record_graph(params: Iterable[Node], ref: Any, unheld_only: bool = False) -> None:
    """Each parameter records `ref`, a weak reference to the Graph whose step computes its
    gradients (`p._graph`, read by optimizers: gpuflow/runtime/amp.py); with `unheld_only`,
    only a parameter that no live Graph holds yet (a Graph being built claims those)."""
    for p in params:
        if unheld_only and p._graph is not None and p._graph() is not None:
            continue
        p._graph = ref
