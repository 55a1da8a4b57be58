"""Building and running a graph: Kahn's sort, binding to a device, forward and backward passes.

`topological_sort` is MiniFlow's entry point; it also binds every node to one device and checks
every fed value there before any compute. The executor plans the backward pass once, when the
graph is built: which nodes send a gradient to which (`_senders`), which inbound gradients each
node computes (`needs_grad`), and where the gradient starts (`_seed`, 1 for the loss).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Iterable, Sequence

from .backends import Device, get_device
from .errors import DeviceError, GraphError
from .nodes import Input, Node


class SortedGraph(list):
    """The list of nodes `topological_sort` returns, with the device and dtype it was built for."""

    def __init__(self, nodes: Iterable[Node], device: Device, dtype: Any) -> None:
        super().__init__(nodes)
        self.device = device
        self.dtype = dtype
        self.backward_order: list[Node] = self[::-1]


def topological_sort(feed_dict: dict, device: "str | Device | None" = None,
                     dtype: Any = None) -> SortedGraph:
    """Sort every node reachable from the fed Inputs with Kahn's algorithm and bind it to a device.

    feed_dict: {Input: value}; values (NumPy arrays, lists, scalars) are moved to the device
    once. device: a spec ('cpu', 'cuda:0', 'auto', ...) or a Device; None means GPUFLOW_DEVICE,
    else 'cpu'. dtype: None keeps the fed floating dtype; 'float32' etc. converts floating feeds.
    Returns the sorted nodes (a list). Raises GraphError for a missing feed or a cycle, and
    DeviceError for a value on another device.
    """
    if not isinstance(feed_dict, dict):
        raise GraphError(f"feed_dict must be a dict {{Input: value}}, got {type(feed_dict).__name__}"
                         ".\nhelp: topological_sort({X: x_array, y: y_array, ...}).")
    for node in feed_dict:
        if not isinstance(node, Input):
            raise GraphError(f"feed_dict key {node!r} is a {type(node).__name__}, not an Input; "
                             "only Inputs are fed.\nhelp: feed the Input nodes of the graph.")
    nodes = _collect(list(feed_dict))
    order = kahn_sort(nodes)
    device = get_device(device)
    bind(order, device, dtype, feed_dict)
    plan_backward(order, loss=None)
    return SortedGraph(order, device, device.dtype(dtype))


def _collect(fed: Sequence[Node]) -> list[Node]:
    """Every node downstream of the fed Inputs, plus the nodes those depend on (weights set
    through `.value`), in discovery order."""
    seen = dict.fromkeys(fed)
    queue = deque(fed)
    while queue:
        node = queue.popleft()
        for n in node.outbound_nodes:
            if n not in seen:
                seen[n] = None
                queue.append(n)
    queue = deque(seen)
    while queue:
        node = queue.popleft()
        for n in node.inbound_nodes:
            if n not in seen:
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


def bind(order: Sequence[Node], device: Device, dtype: Any, feed_dict: dict) -> None:
    """Bind every node to `device`, and put every Input's value there, checked, in `dtype`."""
    float_dtype = device.dtype(dtype)
    if float_dtype is not None and not device.is_floating(float_dtype):
        raise GraphError(f"dtype {dtype!r} is not a floating dtype.\n"
                         "help: pass dtype='float32' or 'float64' (or None to keep the fed one).")
    for node in order:
        node.device = device
        node.xp = device.xp
    for node in order:
        if not isinstance(node, Input):
            continue
        node._float_dtype = float_dtype
        consumers = [(m, i) for m in node.outbound_nodes
                     for i, n in enumerate(m.inbound_nodes) if n is node]
        node._keep_integers = bool(consumers) and all(
            i in m.integer_inputs for m, i in consumers)
        value = feed_dict[node] if node in feed_dict else node.value
        if value is None:
            users = ", ".join(m.label for m, _ in consumers) or "no node"
            where = "in feed_dict" if node in feed_dict else "no value"
            raise GraphError(f"{node.label} has {where}: None (it feeds {users}).\n"
                             f"help: add {node.label} to feed_dict with an array, or set its "
                             ".value before building the graph.")
        node.value = value


def plan_backward(order: Sequence[Node], loss: Node | None,
                  wanted: Iterable[Node] | None = None) -> list[Node]:
    """Decide, once, who sends gradients to whom on this graph.

    With `loss=None` (MiniFlow's `forward_and_backward`) every node runs backward and every
    gradient is computed; a loss node with no outbound node starts its own gradient at 1.
    With a loss node, only nodes between `wanted` (e.g. the trainable parameters) and the loss
    get gradients: nothing is computed for data that no one trains.
    Returns the nodes that run backward, in backward order.
    """
    members = set(order)
    if loss is None:
        live = wants = members
    else:
        live = _ancestors(loss, members)  # the nodes whose backward reaches the loss
        wanted = set(wanted or ())
        wants = set()
        for node in order:  # topological: a node wants a gradient if an input of it does
            if node in live and (node in wanted or any(n in wants for n in node.inbound_nodes)):
                wants.add(node)
    for node in order:
        node.gradients = {}
        node.needs_grad = tuple(n in wants and i not in node.integer_inputs
                                for i, n in enumerate(node.inbound_nodes))
    for node in order:
        node._senders = tuple(dict.fromkeys(
            m for m in node.outbound_nodes if m in live and any(
                n is node and need for n, need in zip(m.inbound_nodes, m.needs_grad))))
        if loss is None:
            node._seed = 1.0 if node.is_loss and not node.outbound_nodes else None
        else:
            node._seed = 1.0 if node is loss else None
    return [node for node in reversed(order) if node in wants]


def _ancestors(node: Node, members: set) -> set:
    """`node` and every node it depends on, within `members`."""
    seen = {node}
    stack = [node]
    while stack:
        for n in stack.pop().inbound_nodes:
            if n in members and n not in seen:
                seen.add(n)
                stack.append(n)
    return seen


def forward_pass(output_node: Node, sorted_nodes: Sequence[Node]) -> Any:
    """Run forward over `sorted_nodes`; return `output_node.value`."""
    with _scope(sorted_nodes):
        for node in sorted_nodes:
            _run(node, "forward")
    return output_node.value


def forward_and_backward(graph: Sequence[Node]) -> None:
    """Forward over the sorted nodes, then backward in reverse order."""
    backward_order = graph.backward_order if isinstance(graph, SortedGraph) else graph[::-1]
    with _scope(graph):
        for node in graph:
            _run(node, "forward")
        for node in backward_order:
            _run(node, "backward")


def _run(node: Node, method: str) -> None:
    try:
        getattr(node, method)()
    except (GraphError, DeviceError):
        raise
    except Exception as exc:
        if hasattr(exc, "add_note"):
            exc.add_note(f"gpuflow: raised in {node.label}.{method}()")
        raise


def _scope(graph: Sequence[Node]) -> Any:
    device = graph.device if isinstance(graph, SortedGraph) else (
        graph[0].device if graph and graph[0].device is not None else None)
    return device.scope() if device is not None else _NoScope()


class _NoScope:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def check_learning_rate(learning_rate: float) -> float:
    """`learning_rate` as a float; ValueError unless it is finite and positive."""
    # float() would also take "0.1" (e.g. an argparse option without type=float) and True.
    not_a_number = isinstance(learning_rate, (str, bytes, bool))
    try:
        lr = float(learning_rate)
    except (TypeError, ValueError):
        not_a_number = True
    if not_a_number:
        raise ValueError(f"learning_rate must be a number, got {learning_rate!r}.\n"
                         "help: pass e.g. learning_rate=1e-2 (a float).")
    if not (math.isfinite(lr) and lr > 0.0):
        raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}.\n"
                         "help: pass e.g. learning_rate=1e-2.")
    return lr


def sgd_update(trainables: Iterable[Node], learning_rate: float = 1e-2) -> None:
    """`t.value -= learning_rate * t.gradients[t]` for each trainable, in place."""
    lr = check_learning_rate(learning_rate)
    for t in trainables:
        grad = t.gradients.get(t)
        if grad is None:
            raise GraphError(f"{t.label} has no gradient yet.\nhelp: run "
                             "forward_and_backward(graph) before sgd_update(trainables).")
        value = t.value
        value -= lr * grad
