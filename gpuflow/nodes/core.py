"""The MiniFlow nodes: each one small class whose `backward` mirrors its `forward`.

Node code calls `self.xp`, the array namespace of the graph's device, and never imports NumPy or
CuPy. A node's `backward` starts from `self.upstream_gradient()`, the sum of what every outbound
node sent back to it, and stores one gradient per inbound node in `self.gradients`. The losses
(MSE, SoftmaxCrossEntropy) are in gpuflow/nodes/losses.py.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from typing import Any

from ..backends import Ops
from ..runtime.buffers import NO_BUFFERS, Buffers, _NoBuffers, copy_if_kept
from ..errors import GraphError


_ACCUMULATION: dict[Any, Any] = {}  # (xp, dtype) -> accumulation_dtype(xp, dtype)


def accumulation_dtype(xp: Any, dtype: Any) -> Any:
    """float32 for a floating dtype narrower than float32 (float16, bfloat16), else None.

    A sum of many float16 numbers (a batch's losses, squared errors) overflows float16 at
    65504 although their mean is small: such sums are computed in float32 and only the mean is
    rounded to the graph's dtype, as torch's autocast computes losses in float32."""
    key = (xp, dtype)  # xp first: dtypes of two libraries are never compared
    try:
        return _ACCUMULATION[key]
    except (KeyError, TypeError):
        wide = (xp.float32 if xp.isdtype(dtype, "real floating") and xp.finfo(dtype).bits < 32
                else None)
        try:
            _ACCUMULATION[key] = wide
        except TypeError:
            pass
        return wide


class Binding:
    """What a graph's plan gives a node when it binds it, in one object: the `device`, its
    array namespace `xp` and operations `ops`, the node's `buffers`, the `plan` that holds it,
    and for an Input the rules its fed values follow (`float_dtype`: the graph's floating
    dtype, None keeps the fed one; `keep_integers`: labels keep their integer dtype) and
    `private` (the value the plan copied in, not copied again at the next bind).

    gpuflow/runtime/plan.py alone makes one (per node, at every bind), drops it (`plan.unbind`), and
    sets its fields on the node as plain attributes, which node code reads: `self.device`,
    `self.xp`, `self.ops`, `self.buffers`, `self._plan` (an Input's `self._float_dtype`,
    `self._keep_integers`, `self._private`). Plain attributes, not properties over the
    binding: node code reads them in every op, and a property read costs ~85 ns more (7%
    of a 13-10-1 MLP's step). An unbound node reads the class's defaults (`UNBOUND`'s).
    """

    __slots__ = ("device", "xp", "ops", "buffers", "plan", "float_dtype", "keep_integers",
                 "private")

    def __init__(self, device: Any = None, xp: Any = None, ops: Any = None,
                 buffers: "Buffers | _NoBuffers" = NO_BUFFERS, plan: Any = None,
                 float_dtype: Any = None, keep_integers: bool = False,
                 private: Any = None) -> None:
        self.device, self.xp, self.ops, self.buffers = device, xp, ops, buffers
        self.plan, self.float_dtype, self.keep_integers = plan, float_dtype, keep_integers
        self.private = private


UNBOUND = Binding(ops=Ops(None))  # what a node not bound to any graph reads


class Node:
    """Base class: keeps `inbound_nodes`, `outbound_nodes`, `value` and `gradients`."""

    # The node's Binding, and its fields (set and dropped by gpuflow/runtime/plan.py only):
    _binding: Binding = UNBOUND
    xp: Any = UNBOUND.xp  # the array namespace of the graph's device
    ops: Any = UNBOUND.ops  # the device's operations that take out= (see backends.Ops)
    device: Any = UNBOUND.device  # the gpuflow Device the graph was built for
    # `self.buffers[name, shape, dtype]`: an array to pass as `out=` to `self.ops`, or None;
    # always use what the op returns (the keep / alias / copy rules: gpuflow/runtime/buffers.py).
    buffers: "Buffers | _NoBuffers" = UNBOUND.buffers
    _plan: Any = UNBOUND.plan  # the plan.Plan that bound this node, if any
    _zeros: Any = None   # a dead end's zero gradient, kept like a buffer
    _graph: Any = None   # a parameter's Graph (a weak reference; see gpuflow/runtime/amp.py), if any
    # Set by the plan when a graph is built (gpuflow/runtime/plan.py):
    _senders: "tuple[Node, ...]" = ()  # outbound nodes that send a gradient back
    _grad_seed: Any = None  # the loss's gradient for itself (1.0, or amp's loss scale)
    is_loss = False      # a loss ends the graph: with no outbound node its upstream gradient is 1
    training = True      # training or evaluation mode (Dropout, BatchNorm), set by the graph
    integer_inputs: tuple[int, ...] = ()   # inbound slots that take integer data (labels)

    _ids = itertools.count(1)  # creation order, for labels and stable sorting

    def __init__(self, inbound_nodes: "list[Node] | None" = None, *, name: str | None = None):
        self.inbound_nodes = list(inbound_nodes) if inbound_nodes is not None else []
        self.outbound_nodes: list[Node] = []
        self.value = None
        self.gradients: dict[Node, Any] = {}
        self.name = name
        self._id = next(Node._ids)
        for i, n in enumerate(self.inbound_nodes):  # all checked before any is linked
            if not isinstance(n, Node):
                raise GraphError(f"{self.label}: inbound node {i} is {type(n).__name__} "
                                 f"{n!r:.60}, not a gpuflow Node.\nhelp: wrap data in an Input() "
                                 "and feed it through feed_dict.")
        for n in self.inbound_nodes:
            n.outbound_nodes.append(self)
        # Set by the plan when a graph is built (see plan.py):
        self.needs_grad = (True,) * len(self.inbound_nodes)  # which inbound gradients to compute

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A node refused as it is made leaves its inputs as they were: `Node.__init__` lists
        it among their outbound nodes, so every subclass's `__init__` is wrapped to take it
        off them again (`_unlink`) when it raises, whether before or after `Node.__init__`;
        else a later topological_sort or Graph over those inputs would find the broken node."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_unlinks_on_error", False):
            return

        @functools.wraps(init)
        def __init__(self: Node, *args: Any, **kw: Any) -> None:
            try:
                init(self, *args, **kw)
            except BaseException:
                self._unlink()
                raise

        __init__._unlinks_on_error = True  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[method-assign]

    def _unlink(self) -> None:
        """Take this node off its inputs' outbound lists (every occurrence)."""
        for n in getattr(self, "inbound_nodes", ()):
            if isinstance(n, Node):
                n.outbound_nodes[:] = [m for m in n.outbound_nodes if m is not self]

    @property
    def label(self) -> str:
        """How errors name this node: "Linear 'hidden'" or "Linear #3"."""
        kind = type(self).__name__
        return f"{kind} '{self.name}'" if self.name else f"{kind} #{self._id}"

    def __repr__(self) -> str:
        return f"<{self.label}>"

    def forward(self) -> None:
        """Compute `self.value` from the inbound nodes' values."""
        raise NotImplementedError(f"{self.label} must implement forward()")

    def backward(self) -> None:
        """Store in `self.gradients[n]` the gradient of the loss for each inbound node `n`."""
        raise NotImplementedError(f"{self.label} must implement backward()")

    def release(self) -> None:
        """Let go of what this node keeps for the device it leaves (`plan.unbind`, when its
        graph moves to another device, calls it after dropping every array of that device the
        node holds): the kept zero gradient here. A node with device caches of its own (a
        record of what it checked there) overrides this and calls `Node.release(self)`."""
        self._zeros = None

    def state_arrays(self) -> dict[str, Any]:
        """{name: array}: the device arrays this node updates in a step besides its value and
        gradients (BatchNorm's running statistics), as they are, not copied. A node with such
        state lists it here, so that Graph(check_finite=True) checks it too and names the node;
        none by default."""
        return {}

    def upstream_gradient(self) -> Any:
        """The sum of the gradients every outbound node sent back (zeros if none did)."""
        senders = self._senders
        if len(senders) == 1 and self._grad_seed is None:
            return senders[0].gradients[self]  # another node's array: read, never written
        total = self._grad_seed
        own = False  # whether `total` is this node's own array, safe to add into
        for n in senders:
            g = n.gradients[self]
            if total is None:
                total = g  # another node's array: read, never written
            elif own:
                total += g
            else:
                out = (self.buffers["upstream", g.shape, g.dtype]
                       if getattr(total, "shape", None) == g.shape else None)
                total = self.ops.add(total, g, out=out)
                own = True
        if total is None:  # a dead end (MiniFlow gives such nodes zero gradient)
            value, total = self.value, self._zeros
            if total is None or total.shape != value.shape or total.dtype != value.dtype:
                total = self.xp.zeros_like(value)
                if self.buffers is not NO_BUFFERS:  # kept, as buffers are
                    self._zeros = total
            else:  # zeros again, whatever a reader (a clip) wrote into it since: x > x is
                # false for every x, NaN and inf included (no `total[...] = 0`: see buffers.py)
                total = self._zeros = self.ops.greater(total, total, total.dtype, out=total)
        return total


class Input(Node):
    """A leaf whose value is fed: data, labels, or (MiniFlow style) weights.

    Once a graph is built, `node.value = array` puts a host array on the graph's device (and
    in its dtype); an array already on another device is a `DeviceError`.
    """

    def __init__(self, *, name: str | None = None):
        self._value = None
        self._classes = None         # for labels: the number of classes, once known
        Node.__init__(self, name=name)

    def _set_value(self, value: Any) -> None:
        device = self.device
        if value is None or device is None:
            self._value, self.ignore_absent = value, None
            return
        adopted, absent = False, None
        if not device.owns(value):  # another library's array on this device: shared
            shared = device.adopt(value, what=f"{self.label}.value")
            if shared is not value:
                adopted = True
                if self._keep_integers and device.in_host_memory():  # labels: the host
                    absent = self._check_labels(value)  # checks, on the caller's array
                elif self._keep_integers and not device.xp.isdtype(shared.dtype, "integral"):
                    raise self._dtype_error(shared.dtype)  # the range: at the first step
                value = shared
        if adopted or not (device.owns(value) and (
                value.dtype == self._float_dtype
                or (self._float_dtype is None and device.is_floating(value.dtype)))):
            # Labels are checked on the host before any upload; on a host device (NumPy,
            # torch:cpu) also when they are already its arrays, since that costs no transfer.
            # Labels already on a GPU are checked at the first step only (a check is a sync).
            if self._keep_integers and not adopted and (
                    device.is_host or not device.owns(value)):
                absent = self._check_labels(value)  # NumPy reads host memory, CPU tensors too
            value = device.feed(value, self._float_dtype, self._keep_integers,
                                what=f"{self.label}.value")
        # Another node's buffer (an RNN's state, one graph's output fed to the next, a view or
        # .detach() of one) is copied: its owner overwrites it (gpuflow/runtime/buffers.py).
        value = copy_if_kept(value, device)
        if value.ndim and value.shape[0] == 0:
            raise GraphError(f"{self.label}: empty batch (shape {tuple(value.shape)}).\n"
                             "help: feed at least one row; drop empty batches before the step.")
        self._value = value
        self.ignore_absent = absent

    # The binding's rules for fed values (gpuflow/runtime/plan.py sets them): the graph's dtype for
    # floating data (None keeps the fed one); whether labels keep their integer dtype.
    _float_dtype: Any = UNBOUND.float_dtype
    _keep_integers: bool = UNBOUND.keep_integers
    _private: Any = UNBOUND.private  # the value the plan copied in (not copied again)

    # Read through a C getter: a step reads every Input's value several times.
    value = property(operator.attrgetter("_value"), _set_value,
                     doc="The fed array, on the graph's device once the graph is built.")

    def expect_classes(self, classes: int | None = None, *, ignore: int | None = None,
                       words: tuple[str, str, str] | None = None) -> None:
        """How the node reading this Input's integers checks them when fed (host feeds are
        range-checked before any upload): `classes`, the number of classes (or an Embedding's
        vocabulary), fed values in 0 .. classes - 1; `ignore`, one value allowed besides them
        (SoftmaxCrossEntropy's ignore_index); `words`, how messages name the integers (noun,
        what they are, the fix for a bad range; default: class labels). An argument left out
        (None) keeps its current setting."""
        if classes is not None:
            self._classes = classes
        if ignore is not None:
            self._ignore = ignore
        if words is not None:
            self.integer_words = words

    def _check_labels(self, value: Any) -> Any:
        """Class labels on the host: integers in 0 .. classes - 1 (checked before the upload).
        Returns the ignore value (`expect_classes(ignore=)`) when the labels hold none of it
        and it lies outside 0 .. classes - 1 (so that the range tells), else None."""
        from ..backends.numpy import host_array, host_range
        host = host_array(value, f"{self.label}.value")
        if host.dtype.kind not in "iu":
            raise self._dtype_error(host.dtype)
        classes, ignore, absent = self._classes, self._ignore, None
        if host.size:
            lo, hi = host_range(host)
            if ignore is not None and ignore in (lo, hi):  # SoftmaxCrossEntropy's ignore_index
                rest = host[host != ignore]                # (-100): allowed, not a class
                if not rest.size:
                    return None
                lo, hi = host_range(rest)
            elif ignore is not None and classes is not None and not 0 <= ignore < classes:
                absent = ignore  # below the smallest label or above the largest: none of it
            if lo < 0 or (classes is not None and hi >= classes):
                noun, _, fix = self.integer_words
                limit = f"0 .. {classes - 1}" if classes is not None else ">= 0"
                if ignore is not None:
                    limit += f" (or {ignore}, the ignore_index)"
                raise GraphError(f"{self.label}: {noun} range from {lo} to {hi}, but must be in "
                                 f"{limit}.\nhelp: {fix}.")
        return absent

    # How messages name integer data: class labels, unless the node reading them says
    # otherwise (Embedding: token ids); (noun, what they are, the fix for a bad range).
    _ignore: Any = None  # a label value allowed besides 0 .. classes - 1 (an ignore_index)
    # The ignore value the labels now fed were checked on the host not to hold (None: unknown,
    # or they hold it): SoftmaxCrossEntropy then counts every row without a mask.
    ignore_absent: Any = None
    integer_words = ("labels", "class indices",
                     "check the labels, or the number of outputs of the last layer")

    def _dtype_error(self, dtype: Any) -> GraphError:
        noun, what, _ = self.integer_words
        return GraphError(f"{self.label}: {noun} have dtype {dtype}; expected integer {what}."
                          "\nhelp: feed an integer array (e.g. y.astype('int64')).")

    def forward(self) -> None:
        """Nothing to compute: the value was fed (GraphError if it was set back to None)."""
        if self._value is None:
            users = ", ".join(m.label for m in self.outbound_nodes) or "no node"
            raise GraphError(f"{self.label} has no value: None (it feeds {users}).\n"
                             f"help: set {self.label}.value to an array before running the "
                             "graph.")

    def backward(self) -> None:
        """Sum what every outbound node computed for this input."""
        senders = self._senders
        if len(senders) == 1 and self._grad_seed is None:  # the common case, without a call
            self.gradients[self] = senders[0].gradients[self]
        else:
            self.gradients[self] = self.upstream_gradient()


class Linear(Node):
    """`X @ W + b`: X (batch, n_in), W (n_in, n_out), b (n_out,). An N-D X (..., n_in) gives
    (..., n_out), as torch.nn.Linear: its rows are multiplied as one (rows, n_in) matrix, and
    W's and b's gradients sum over every leading axis."""

    def __init__(self, X: Node, W: Node, b: Node, *, name: str | None = None):
        Node.__init__(self, [X, W, b], name=name)

    def forward(self) -> None:
        X, W, b = self.inbound_nodes
        x, w, bias = X.value, W.value, b.value
        if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
            if x.ndim > 2 and w.ndim == 2 and x.shape[-1] == w.shape[0]:  # (..., n_in)
                xp = self.xp
                rows = self._matrix_forward(xp.reshape(x, (-1, w.shape[0])), w, bias)
                self.value = xp.reshape(rows, tuple(x.shape[:-1]) + (w.shape[1],))
                return
            if x.ndim in (1, 2) and w.ndim in (1, 2) and x.shape[-1] == w.shape[0]:
                self.value = self._vector_forward(x, w, bias)
                return
            raise GraphError(
                f"{self.label}: X has shape {tuple(x.shape)} but W has shape {tuple(w.shape)}; "
                "X must be 2-D (batch, n_in), N-D (..., n_in) or 1-D (n_in,), W 2-D "
                "(n_in, n_out) or 1-D (n_in,), X.shape[-1] == W.shape[0].\n"
                f"help: check the sizes of {X.label} and {W.label}.")
        self.value = self._matrix_forward(x, w, bias)

    def _matrix_forward(self, x: Any, w: Any, bias: Any) -> Any:
        """x (rows, n_in) @ w (n_in, n_out) + bias, into the kept buffer."""
        if bias.shape != w.shape[1:] and tuple(bias.shape) != (1, w.shape[1]):
            raise GraphError(
                f"{self.label}: b has shape {tuple(bias.shape)} but W has shape "
                f"{tuple(w.shape)}; b must have shape ({w.shape[1]},), one bias per output.\n"
                f"help: check the size of {self.inbound_nodes[2].label}.")
        # x's dtype: every floating value of a bound graph has the graph's dtype.
        out = self.buffers["value", (x.shape[0], w.shape[1]), x.dtype]
        fused = self.ops.matmul_add  # one kernel (torch's addmm)
        if fused is not None and bias.dtype == x.dtype:  # addmm refuses mixed dtypes
            return fused(x, w, bias, out=out)
        out = self.ops.matmul(x, w, out=out)
        out += bias
        return out

    def _vector_forward(self, x: Any, w: Any, bias: Any) -> Any:
        """MiniFlow's np.dot(X, W) + b where X or W is a vector (the lesson's first quiz):
        computed as 2-D (rows, n_in) @ (n_in, outs), shaped back as np.dot's result."""
        xp, outs = self.xp, (w.shape[1] if w.ndim == 2 else 1)
        self._2d = x2, w2 = xp.reshape(x, (-1, x.shape[-1])), xp.reshape(w, (w.shape[0], outs))
        out = xp.reshape(x2 @ w2, tuple(x.shape[:-1]) + tuple(w.shape[1:])) + bias
        if math.prod(bias.shape) != outs or math.prod(out.shape) != x2.shape[0] * outs:
            raise GraphError(
                f"{self.label}: b has shape {tuple(bias.shape)} but W has shape "
                f"{tuple(w.shape)}; b must have {outs} value(s), one bias per output.\n"
                f"help: check the size of {self.inbound_nodes[2].label}.")
        return out

    def _vector_backward(self, G: Any) -> None:
        """The gradients of `_vector_forward`, each in its input's shape."""
        xp, (x2, w2) = self.xp, self._2d
        G2 = xp.reshape(xp.asarray(G, dtype=x2.dtype, device=self.device.native),
                        (x2.shape[0], w2.shape[1]))
        grads: dict[Node, Any] = {}
        for node, grad, need in zip(self.inbound_nodes, (G2 @ w2.T, x2.T @ G2,
                                                         xp.sum(G2, axis=0)), self.needs_grad):
            if need:  # Linear(X, X, b) computes X . X: both uses' gradients add up
                grad = xp.reshape(grad, node.value.shape)
                grads[node] = grads[node] + grad if node in grads else grad
        self.gradients.update(grads)

    def backward(self) -> None:
        G = self.upstream_gradient()
        X, W, b = self.inbound_nodes
        x, w, ops, buffers = X.value, W.value, self.ops, self.buffers
        shape = None  # an N-D X's shape: its gradient is computed for its rows
        if x.ndim != 2 or w.ndim != 2:
            if x.ndim <= 2 or w.ndim != 2:
                self._vector_backward(G)
                return
            shape, xp = tuple(x.shape), self.xp
            x, G = xp.reshape(x, (-1, w.shape[0])), xp.reshape(G, (-1, w.shape[1]))
        grad_X, grad_W, grad_b = self.needs_grad
        if grad_X:
            dX = ops.matmul(G, w.T, out=buffers["dX", x.shape, G.dtype])
            self.gradients[X] = dX if shape is None else self.xp.reshape(dX, shape)
        if grad_W:
            dW = ops.matmul(x.T, G, out=buffers["dW", w.shape, G.dtype])
            # Linear(X, X, b) computes X @ X: both uses' gradients add up.
            self.gradients[W] = self.gradients[X] + dW if W is X else dW
        if grad_b:
            db = ops.sum(G, axis=0, out=buffers["db", w.shape[1:], G.dtype])
            self.gradients[b] = db if b.value.ndim == 1 else self.xp.reshape(db, b.value.shape)


class Add(Node):
    """The sum of its inputs, each times its weight: `Add(l1, l2, weights=(1.0, 0.1))` is
    l1 + 0.1 l2. Of losses it is a loss (`Graph(Add(l1, l2))` trains both); of other nodes of
    one shape (a residual connection), their elementwise sum."""

    def __init__(self, *nodes: Node, weights: Any = None, name: str | None = None):
        Node.__init__(self, list(nodes), name=name)
        if not nodes:
            raise GraphError("Add needs at least one node.\nhelp: Add(loss1, loss2).")
        weights = (1.0,) * len(nodes) if weights is None else tuple(weights)
        if len(weights) != len(nodes) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise GraphError(f"{self.label}: weights {weights!r} must be {len(nodes)} numbers, "
                             "one per node.\nhelp: e.g. Add(l1, l2, weights=(1.0, 0.1)).")
        self.weights = tuple(float(w) for w in weights)
        self.is_loss = all(n.is_loss for n in nodes)

    def forward(self) -> None:
        values = [n.value for n in self.inbound_nodes]
        shapes = {tuple(getattr(v, "shape", ())) for v in values}
        if len(shapes) > 1:
            listing = ", ".join(f"{n.label} {tuple(getattr(n.value, 'shape', ()))}"
                                for n in self.inbound_nodes)
            raise GraphError(f"{self.label}: the inputs differ in shape ({listing}); Add sums "
                             "arrays of one shape.\nhelp: reduce each loss to a scalar, or "
                             "reshape the inputs alike.")
        # arrays (a residual sum): into kept buffers; scalars (losses): new ones
        shape, dtype = tuple(getattr(values[0], "shape", ())), getattr(values[0], "dtype", None)
        same = shape and all(getattr(v, "dtype", None) == dtype for v in values)
        ops, buffers = self.ops, self.buffers
        total = None
        for w, v in zip(self.weights, values):
            if w == 1.0:
                term = v
            elif same:
                term = ops.multiply(v, w, out=buffers["value" if total is None else "term",
                                                      shape, dtype])
            else:
                term = w * v
            if total is None:
                total = term
            elif same:  # into the value buffer once total is no longer an input's array
                total = ops.add(total, term, out=buffers["value", shape, dtype])
            else:
                total = total + term
        self.value = total

    def backward(self) -> None:
        G = self.upstream_gradient()
        grads: dict[Node, Any] = {}
        array = bool(getattr(G, "ndim", 0))
        for i, (n, w, need) in enumerate(zip(self.inbound_nodes, self.weights,
                                             self.needs_grad)):
            if need:
                g = G if w == 1.0 else (self.ops.multiply(
                    G, w, out=self.buffers[f"grad{i}", tuple(G.shape), G.dtype])
                    if array else w * G)
                grads[n] = grads[n] + g if n in grads else g  # Add(l, l): both uses add up
        self.gradients.update(grads)
