"""Activation recomputation: segments of a graph whose values are not kept after the forward pass
and are computed again, from the segment's inputs, just before its backward pass (PyTorch's
`torch.utils.checkpoint`, Chainer's `F.forget`, Keras's `remat`).

    h = X
    for i in range(8):
        h, p = gf.recompute(block, h, name=f"block{i}")   # block(h, name=...) builds the nodes
    graph = gf.Graph(loss)                                  # runs every marked block recomputed

`recompute(fn, *args, **kwargs)` calls `fn`, which builds nodes as any model code does, and
returns what it returns; every node `fn` created that the result depends on (Parameters and
other Inputs aside: they are leaves, kept as always) forms one segment. Any graph built over the
nodes (`Graph`, MiniFlow's `topological_sort`) then runs it recomputed; a model built without
the call is the normal graph, with the same weights for the same seed. A call inside another
call's `fn` gives its nodes to the outer segment (one level of recomputation).

How a segment runs, and how its arrays are held (the kept-buffer rules: gpuflow/runtime/buffers.py):

- Its **outputs** (nodes a node outside the segment reads, the loss, a node nothing reads) keep
  their values and buffers as every node does: the rest of the graph reads them.
- Its **interior** nodes (read only inside the segment) borrow their buffers from one pool per
  graph (`Arena`): each `node.buffers[name, shape, dtype]` takes an array of that shape and
  dtype from the pool for the rest of the pass (the same one for the same key), and after the
  segment's last node has run forward every borrowed array goes back to the pool, and the
  interior nodes let go of the arrays their forward pass set (`value` and every array
  attribute it assigned, except `state_arrays()`: those made by the library, not from the
  pool, are freed). The next segment borrows the same arrays: segments of equal shapes (the
  blocks of a deep model) share one set, so a step holds the interior arrays of one segment
  instead of all. The pool, like a node's buffers, is kept from step to step: after the first
  step nothing is allocated for it (a pass on a batch of a new shape that runs forward only,
  `Graph.run`, borrows arrays that are not kept, as `forward_only` says).
- **Backward**: just before the first of the segment's nodes runs backward, the whole segment
  runs forward again from its inputs (which are kept), borrowing from the pool; its nodes then
  run backward, borrowing their gradient arrays from it too; a gradient an interior node sends
  out of the segment (to a parameter, or to the segment's input) is copied into a buffer that
  node keeps, and after the segment's last backward the pool gets everything back.
- **State** (Dropout's step counter, BatchNorm's running statistics: whatever a node's
  `state_dict()` holds) is put back, by `load_state_dict`, as it was before the forward pass,
  so the second forward pass draws the same Dropout masks and moves the running statistics
  from the same place to the same place: once per step, bit for bit. The recomputed values are
  bit-identical, so the gradients are the normal graph's bit for bit on every device.
- On devices that cannot write into arrays (JAX, array_api_strict) and in graphs built with
  `reuse_buffers=False`, interior nodes make new arrays (no pool) and let go of them as above.
  A compiled step (gpuflow/compiled.py, JAX) leaves memory planning to the compiler; it runs
  the segments as the eager step does.

A custom node in a segment must compute its forward pass from its inputs and its state alone,
as torch's checkpointed functions must: an array attribute its forward pass sets is dropped
after the pass, and a node that keeps state between steps lists it in
`state_dict()` / `load_state_dict()`. After a step an interior node's `value` is None.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Sequence

from .buffers import _KEPT, NO_BUFFERS, Buffers
from ..errors import GraphError
from ..nodes import Input, Node

__all__ = ["recompute", "Segment", "Arena"]

# node -> the Segment `recompute` marked it with, read by `install` when a plan is built
# (process-wide, weak: a node that is gone leaves it).
_SEGMENTS: "weakref.WeakKeyDictionary[Node, Segment]" = weakref.WeakKeyDictionary()


class Segment:
    """The mark `recompute` gives every node of one segment (kept here, in `_SEGMENTS`: no
    node reads it)."""

    def __init__(self, name: str | None) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<recompute segment {self.name!r}>" if self.name else "<recompute segment>"


def recompute(fn: Callable[..., Any], *args: Any, name: str | None = None,
              **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, with every node it creates that its result depends on recomputed
    in the backward pass instead of kept (see the module docstring). Returns what `fn` returns:
    a node, or a tuple, list or dict holding nodes (a layer builder's `(output, parameters)`).
    `name` names the segment in messages (default: `fn`'s name).
    """
    if not callable(fn):
        raise GraphError(f"recompute: {fn!r:.60} is not callable.\nhelp: pass the function "
                         "that builds the block, then its arguments: gf.recompute(block, h).")
    first = next(Node._ids)  # every node made by fn has a larger id
    result = fn(*args, **kwargs)
    outputs = [n for n in _nodes_in(result) if n._id > first]
    if not outputs:
        raise GraphError(f"recompute: {getattr(fn, '__name__', fn)!r} returned no node it "
                         "created.\nhelp: return the block's output node (or a tuple whose "
                         "items include it).")
    segment = Segment(name or getattr(fn, "__name__", None))
    seen: set[Node] = set()
    stack = list(outputs)
    while stack:
        node = stack.pop()
        if node in seen or node._id <= first:
            continue
        seen.add(node)
        if not isinstance(node, Input):
            _SEGMENTS[node] = segment
        stack.extend(node.inbound_nodes)
    return result


def _nodes_in(result: Any) -> list[Node]:
    if isinstance(result, Node):
        return [result]
    if isinstance(result, dict):
        result = list(result.values())
    if isinstance(result, (list, tuple)):
        return [n for item in result if not isinstance(item, dict) for n in _nodes_in(item)]
    return []


class Arena:
    """The pool a graph's interior nodes borrow buffers from: free arrays by (shape, dtype).

    Arrays made while the graph's plan is keeping (a training step) are kept (and listed in
    buffers._KEPT, so that what is handed to a caller is copied); those made while it runs
    forward only are used once and dropped when given back.
    """

    def __init__(self, plan: Any) -> None:
        self.device = plan.device
        self._plan_ref = weakref.ref(plan)
        self.free: dict[tuple, list] = {}
        self.buffers: dict[tuple, Any] = {}   # ("arena", n): array, for buffers._KEPT
        self.keys: set = set()                # the memory keys of every kept array

    def take(self, shape: tuple, dtype: Any) -> Any:
        free = self.free.get((shape, dtype))
        if free:
            return free.pop()
        array = self.device.new_buffer(shape, dtype)
        plan = self._plan_ref()
        if plan is not None and plan.keeping:
            key = self.device.memory_keys(array)[0]
            name = ("arena", len(self.buffers))
            self.buffers[name] = array
            self.keys.add(key)
            _KEPT.add(key, weakref.ref(self), name)
        return array

    def give(self, array: Any) -> None:
        if self.device.memory_keys(array)[0] in self.keys:
            self.free.setdefault((tuple(array.shape), array.dtype), []).append(array)

    def holds(self, array: Any) -> bool:
        """Whether `array` shares memory with an array of the pool."""
        return any(k in self.keys for k in self.device.memory_keys(array))

    @property
    def nbytes(self) -> int:
        """The bytes the pool keeps."""
        return sum(math.prod(a.shape) * a.dtype.itemsize for a in self.buffers.values())


class Borrowed(dict):
    """An interior node's `node.buffers`: arrays borrowed from the graph's `Arena` until
    `give_back` (the same array for the same key until then)."""

    def __init__(self, arena: Arena) -> None:
        super().__init__()
        self.arena = arena
        self.loose: list = []  # arrays not from the pool (made while running forward only)

    def __missing__(self, key: tuple) -> Any:
        name, shape, dtype = key
        if not shape or not self.arena.device.is_floating(dtype):
            return None
        array = self.arena.take(tuple(shape), dtype)
        self[key] = array
        return array

    def give_back(self) -> None:
        for array in self.values():
            self.arena.give(array)
        self.clear()


_MISSING = object()


def _arrays(value: Any, device: Any) -> bool:
    """Whether `value` is an array of `device`, or a tuple or list made only of such."""
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_arrays(v, device) for v in value)
    if getattr(value, "shape", None) is None or isinstance(value, type):
        return False
    try:
        return bool(device.owns(value))
    except Exception:  # noqa: BLE001 - not an array of this device
        return False


class Schedule:
    """One segment in one graph plan: which nodes are interior, and the wrapped `forward` and
    `backward` of its nodes that borrow, release and recompute (see the module docstring)."""

    def __init__(self, nodes: Sequence[Node], plan: Any, arena: Arena | None) -> None:
        members = set(plan.nodes)
        self.nodes = list(nodes)  # in forward order
        inside = set(self.nodes)
        # Nodes computed from weights alone (a Transpose of a Parameter) keep their values as
        # outputs do: they are small, and their backward runs after every other node's (the
        # order puts them last), so as interior nodes they would hold the pool to the end.
        weights = set(plan.wanted)  # the trainable parameters
        for n in self.nodes:
            if all(m in weights for m in n.inbound_nodes):
                weights.add(n)
        self.interior = [n for n in self.nodes if n is not plan.loss and n not in weights
                         and any(m in members for m in n.outbound_nodes) and all(
            m in inside for m in n.outbound_nodes if m in members)]
        self.inner = set(self.interior)
        self.outputs = [n for n in self.nodes if n not in self.inner]
        self.arena = arena
        self.device = plan.device
        self.states: dict[Node, Any] = {}
        self.kept: dict[Node, Any] = {}  # interior node -> where its gradients sent out go
        self.before: dict[Node, dict] = {}
        backward = [n for n in plan.backward if n in inside and n not in weights] or [
            n for n in plan.backward if n in inside]
        self.first_backward = backward[0] if backward else None
        self.last_backward = backward[-1] if backward else None

    # -- wrapping ------------------------------------------------------------------------------
    def install(self, plan: Any) -> None:
        first, last = self.nodes[0], self.nodes[-1]
        for node in self.nodes:
            forward = type(node).forward.__get__(node)
            backward = type(node).backward.__get__(node)
            node.forward = _Wrapped(self._forward_of(node, forward, node is first,
                                                     node is last))
            node.backward = _Wrapped(self._backward_of(
                node, backward, node is self.first_backward, node is self.last_backward))
            if self.arena is not None and node in self.inner:
                plan.set_buffers(node, Borrowed(self.arena))
            if node in self.inner:  # where gradients sent out of the segment are copied
                self.kept[node] = (Buffers(node, self.device) if self.arena is not None
                                   else NO_BUFFERS)

    def _forward_of(self, node: Node, forward: Callable, first: bool, last: bool) -> Callable:
        def run() -> None:
            if first:
                self._begin()
            forward()
            if last:
                self._release()
        return run

    def _backward_of(self, node: Node, backward: Callable, first: bool,
                     last: bool) -> Callable:
        inner = node in self.inner

        def run() -> None:
            if first:
                self._recompute()
            backward()
            if inner and self.arena is not None:
                self._send_out(node)
            if last:
                for n in self.interior:
                    for target in [t for t in n.gradients if t in self.inner]:
                        del n.gradients[target]
                self._release()
        return run

    # -- the passes ----------------------------------------------------------------------------
    def _begin(self) -> None:
        """Before the segment's forward pass: its nodes' state, and what each interior node
        holds (to tell which arrays the pass set)."""
        self.states = {n: n.state_dict() for n in self.nodes
                       if callable(getattr(n, "state_dict", None))
                       and callable(getattr(n, "load_state_dict", None))}
        self.before = {n: dict(vars(n)) for n in self.interior}

    def _recompute(self) -> None:
        """The segment's forward pass again, from the state it started from."""
        for node, state in self.states.items():
            node.load_state_dict(state)
        self.before = {n: dict(vars(n)) for n in self.interior}
        for node in self.nodes:
            type(node).forward(node)

    def _release(self) -> None:
        """After the segment's last forward (or backward): outputs that view a pool array
        get their own copy, interior nodes let go of their arrays, the pool gets its own back."""
        arena = self.arena
        if arena is not None:
            for node in self.outputs:
                value = node.value
                if value is not None and getattr(value, "shape", None) is not None \
                        and arena.holds(value):
                    node.value = _copy(node, node.buffers, value, "recompute value")
        for node in self.interior:
            before, state = self.before.get(node, {}), node.state_arrays().values()
            for key, value in list(vars(node).items()):
                if key in ("forward", "backward", "buffers", "gradients"):
                    continue
                if (key == "value" or before.get(key, _MISSING) is not value) and \
                        _arrays(value, self.device) and not any(value is s for s in state):
                    setattr(node, key, None)
            if isinstance(node.buffers, Borrowed):
                node.buffers.give_back()

    def _send_out(self, node: Node) -> None:
        """The gradients an interior node sends out of the segment, copied out of the pool."""
        for i, (target, grad) in enumerate(list(node.gradients.items())):
            if target not in self.inner and getattr(grad, "shape", None) is not None \
                    and self.arena.holds(grad):
                node.gradients[target] = _copy(node, self.kept[node], grad, ("recompute out", i))


class _Wrapped:
    """A node's `forward` or `backward` as its segment runs it (an instance attribute, so every
    runner, MiniFlow's loops included, calls it)."""

    __slots__ = ("run",)

    def __init__(self, run: Callable[[], None]) -> None:
        self.run = run

    def __call__(self) -> None:
        self.run()


def _copy(node: Node, buffers: Any, value: Any, name: Any) -> Any:
    """`value` in an array of `node`'s own (bit for bit: x * 1.0 is x)."""
    out = buffers[name, tuple(value.shape), value.dtype]
    if out is None:
        return node.xp.asarray(value, copy=True)
    return node.ops.multiply(value, 1.0, out=out)


def install(plan: Any) -> list[Schedule]:
    """Wrap the nodes of every marked segment of `plan` (after it is bound and its backward is
    planned); undo an earlier plan's wrapping of nodes this one runs otherwise. Returns the
    segments' schedules (none if no node is marked)."""
    device = plan.device
    reuse = plan.reuse_buffers and device.ops.writes_out
    groups: dict[Segment, list[Node]] = {}
    for node in plan.nodes:
        for key in ("forward", "backward"):
            if isinstance(vars(node).get(key), _Wrapped):
                del vars(node)[key]
        if isinstance(node.buffers, Borrowed):
            node.buffers.give_back()
            plan.set_buffers(node, Buffers(node, device) if reuse else NO_BUFFERS)
        segment = _SEGMENTS.get(node)
        if segment is not None and not isinstance(node, Input):
            groups.setdefault(segment, []).append(node)
    if not groups:
        return []
    arena = Arena(plan) if reuse else None
    schedules = []
    for nodes in groups.values():
        schedule = Schedule(nodes, plan, arena)
        if schedule.interior:
            schedule.install(plan)
            schedules.append(schedule)
    return schedules
