"""Sequence nodes, layouts and numbers as PyTorch's: Embedding, MatMul, Mul, BiasAdd, Scale,
Reshape, Transpose, Concat, Slice, GELU, SiLU and ScaledDotProductAttention (in
gpuflow/nodes/attention.py, exported here too; the LSTM: gpuflow/nodes/recurrent.py).

Where an operation broadcasts (MatMul over leading dimensions, Mul both ways, the attention's
batch dimensions), each input's gradient is summed back to that input's shape, as autograd
does. A node that takes one input twice (`Mul(x, x)`) sends it the sum of both gradients.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..errors import GraphError
from .core import Input, Node
from .attention import ScaledDotProductAttention  # noqa: F401 - gpuflow/nodes/attention.py
from .shapes import (_axis, _between_zeros, _broadcast, _device_range,  # noqa: F401
                     _flush_subnormals, _send, _shape, _unbroadcast)

_SQRT1_2 = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_KAPPA = 0.044715  # the tanh approximation's cubic coefficient (torch's kKappa)


def _sigmoid(xp: Any, x: Any) -> tuple[Any, Any]:
    """sigmoid(x) and 1 - sigmoid(x) in gpuflow.Sigmoid's split form: no exp of a positive
    number (no overflow in either tail), and the complement without cancelling."""
    e = xp.exp(-xp.abs(x))                  # exp(-|x|) <= 1
    positive = x >= 0
    return xp.where(positive, 1.0, e) / (1.0 + e), xp.where(positive, e, 1.0) / (1.0 + e)


class Embedding(Node):
    """Rows of a table, as torch.nn.functional.embedding: `ids` (integers in [0, vocab), any
    shape) and W (vocab, dim) give ids.shape + (dim,).

    The backward adds each position's gradient into its id's row of W (a repeated id's
    gradients add up); ids get none. Ids fed to an Input are range-checked when fed, once
    the vocabulary size is known (W's value when the node is made, else the first step), as
    class labels are: an id out of range is a GraphError, never an index error later.
    """

    integer_inputs = (0,)

    def __init__(self, ids: Node, W: Node, *, name: str | None = None):
        Node.__init__(self, [ids, W], name=name)
        self._checked = None  # (vocab, ids dtype) the ids were last checked for
        if isinstance(ids, Input):
            ids.expect_classes(words=("ids", "token ids", "check the ids"))
            table = W.value if isinstance(W, Input) else None
            if getattr(table, "ndim", 0) == 2:
                self._vocabulary(table.shape[0])

    def release(self) -> None:
        """Also forget the ids' check (made again on the next device)."""
        self._checked = None
        Node.release(self)

    def _vocabulary(self, vocab: int) -> None:
        """Later feeds of the ids Input are checked against `vocab` rows."""
        ids, W = self.inbound_nodes
        if isinstance(ids, Input):
            ids.expect_classes(vocab, words=(
                "ids", "token ids", f"{self.label} has a vocabulary of {vocab} "
                f"(the rows of {W.label}): check the ids, or give it more rows"))

    def forward(self) -> None:
        ids_node, W = self.inbound_nodes
        xp, ids, w = self.xp, ids_node.value, W.value
        if w.ndim != 2:
            raise GraphError(f"{self.label}: W has shape {_shape(w)}; expected (vocab, dim).\n"
                             f"help: feed {W.label} a 2-D table, one row per id.")
        vocab, dim = w.shape
        if self._checked != (vocab, ids.dtype):
            if not xp.isdtype(ids.dtype, "integral"):
                raise GraphError(f"{self.label}: ids have dtype {ids.dtype}; expected integer "
                                 f"token ids.\nhelp: feed {ids_node.label} an integer array "
                                 "(e.g. ids.astype('int64')).")
            self._check_range(ids, vocab)
            self._checked = (vocab, ids.dtype)
            self._vocabulary(vocab)
        flat = xp.reshape(ids, (-1,))
        rows = self.ops.take_rows(w, flat, out=self.buffers["value", (flat.shape[0], dim),
                                                            w.dtype])
        self.value = xp.reshape(rows, _shape(ids) + (dim,))

    def _check_range(self, ids: Any, vocab: int) -> None:
        """The ids on the device, once per vocabulary (later host feeds: when fed)."""
        if not math.prod(ids.shape):
            return
        lo, hi = (int(v) for v in _device_range(self, ids, "id check"))  # once, at the first step
        if lo < 0 or hi >= vocab:
            ids_node, W = self.inbound_nodes
            raise GraphError(f"{self.label}: {ids_node.label} has ids from {lo} to {hi}, but "
                             f"the vocabulary has {vocab} entries (0 .. {vocab - 1}, the rows "
                             f"of {W.label}).\nhelp: check the ids, or give the table more "
                             "rows.")

    def backward(self) -> None:
        G = self.upstream_gradient()
        ids, W = self.inbound_nodes
        if self.needs_grad[1]:
            w, xp = W.value, self.xp
            flat = xp.reshape(ids.value, (-1,))
            G2 = xp.reshape(G, (flat.shape[0], w.shape[1]))
            self.gradients[W] = self.ops.scatter_add_rows(
                flat, G2, w.shape[0], out=self.buffers["dW", _shape(w), G.dtype])


class MatMul(Node):
    """The matrix product a @ b, as torch.matmul: broadcast over leading dimensions, a 1-D
    operand taken as a row (a) or a column (b) and its dimension dropped from the result."""

    def __init__(self, a: Node, b: Node, *, name: str | None = None):
        Node.__init__(self, [a, b], name=name)

    def _matrices(self, a: Any, b: Any) -> tuple[Any, Any, tuple[int, ...], tuple[int, ...]]:
        """a and b as (..., n, k) and (..., k, m) arrays, their broadcast leading dimensions,
        and the result's shape."""
        xp = self.xp
        if a.ndim == 0 or b.ndim == 0 or a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
            A, B = self.inbound_nodes
            raise GraphError(f"{self.label}: a has shape {_shape(a)} and b {_shape(b)}; "
                             "expected a (..., n, k) and b (..., k, m) with a.shape[-1] == "
                             f"b.shape[-2].\nhelp: check {A.label} and {B.label} (transpose "
                             "one of them?).")
        a2 = a if a.ndim > 1 else xp.reshape(a, (1, -1))
        b2 = b if b.ndim > 1 else xp.reshape(b, (-1, 1))
        batch = _broadcast(self, _shape(a2)[:-2], _shape(b2)[:-2],
                           what="the leading (batch) dimensions of a and b")
        shape = batch + _shape(a)[-2:-1] + (_shape(b)[-1:] if b.ndim > 1 else ())
        return a2, b2, batch, shape

    def _rows(self, x: Any, name: str) -> Any:
        """x (..., k) as one (rows, k) matrix: a view where x's strides allow one, else x
        copied into the kept buffer `name`."""
        shape = (-1, x.shape[-1])
        into = self.ops.reshape_into
        if into is None:
            return self.xp.reshape(x, shape)
        shape = (math.prod(x.shape[:-1]), x.shape[-1])
        return into(x, shape, self.buffers[name, shape, x.dtype])

    def forward(self) -> None:
        a, b = (n.value for n in self.inbound_nodes)
        shape = self._matrices(a, b)[3]
        if a.ndim > 2 and b.ndim == 2:  # (..., k) @ (k, m): one (rows, k) @ (k, m) product
            rows = self._rows(a, "a_rows")
            value = self.ops.matmul(rows, b, out=self.buffers["value", (rows.shape[0],
                                                                        b.shape[1]), a.dtype])
            self.value = self.xp.reshape(value, shape)
            return
        self.value = self.ops.matmul(a, b, out=self.buffers["value", shape, a.dtype])

    def backward(self) -> None:
        G = self.upstream_gradient()
        xp, ops = self.xp, self.ops
        a, b = (n.value for n in self.inbound_nodes)
        if a.ndim > 2 and b.ndim == 2:
            self._rows_backward(G, a, b)
            return
        a2, b2, batch, _ = self._matrices(a, b)
        G2 = xp.reshape(G, batch + (a2.shape[-2], b2.shape[-1]))
        need_a, need_b = self.needs_grad
        da = db = None
        if need_a:
            da = ops.matmul(G2, xp.matrix_transpose(b2),
                            out=self.buffers["da", _shape(G2)[:-1] + (b2.shape[-2],), G.dtype])
            da = xp.reshape(_unbroadcast(self, da, _shape(a2), "da_sum"), _shape(a))
        if need_b:
            db = ops.matmul(xp.matrix_transpose(a2), G2,
                            out=self.buffers["db", _shape(G2)[:-2] + (a2.shape[-1],
                                                                      G2.shape[-1]), G.dtype])
            db = xp.reshape(_unbroadcast(self, db, _shape(b2), "db_sum"), _shape(b))
        _send(self, (da, db))

    def _rows_backward(self, G: Any, a: Any, b: Any) -> None:
        """The gradients of a (..., k) @ b (k, m) as 2-D products over a's rows (as Linear's
        N-D path, and torch.matmul): da = G b^T, and db = a^T G summed over every leading
        axis by the one (k, rows) @ (rows, m) product, into its kept buffer."""
        xp, ops, buffers = self.xp, self.ops, self.buffers
        need_a, need_b = self.needs_grad
        G2 = self._rows(G, "G_rows")
        da = db = None
        if need_a:
            da = ops.matmul(G2, xp.matrix_transpose(b),
                            out=buffers["da", (G2.shape[0], b.shape[0]), G.dtype])
            da = xp.reshape(da, _shape(a))
        if need_b:
            rows = self._rows(a, "a_rows")  # the forward's copy, where it made one
            db = ops.matmul(xp.matrix_transpose(rows), G2, out=buffers["db", _shape(b),
                                                                        G.dtype])
        _send(self, (da, db))


class Mul(Node):
    """a * b elementwise, broadcasting both ways."""

    def __init__(self, a: Node, b: Node, *, name: str | None = None):
        Node.__init__(self, [a, b], name=name)

    def forward(self) -> None:
        a, b = (n.value for n in self.inbound_nodes)
        shape = _broadcast(self, _shape(a), _shape(b), what="a and b")
        self.value = self.ops.multiply(a, b, out=self.buffers["value", shape, a.dtype])

    def backward(self) -> None:
        G = self.upstream_gradient()
        ops, buffers = self.ops, self.buffers
        a, b = (n.value for n in self.inbound_nodes)
        need_a, need_b = self.needs_grad
        da = db = None
        if need_a:
            da = ops.multiply(G, b, out=buffers["da", _shape(G), G.dtype])
            da = _unbroadcast(self, da, _shape(a), "da_sum")
        if need_b:
            db = ops.multiply(G, a, out=buffers["db", _shape(G), G.dtype])
            db = _unbroadcast(self, db, _shape(b), "db_sum")
        _send(self, (da, db))


class BiasAdd(Node):
    """x + b, b broadcasting against x (as torch's `x + b`: a bias (n,) added to every row of
    an (..., n) x); b's gradient is summed back to b's shape. x keeps its shape: a b that
    would make it larger is refused (Mul broadcasts both ways)."""

    def __init__(self, x: Node, b: Node, *, name: str | None = None):
        Node.__init__(self, [x, b], name=name)

    def forward(self) -> None:
        x, b = (n.value for n in self.inbound_nodes)
        if _broadcast(self, _shape(x), _shape(b), what="x and b") != _shape(x):
            X, B = self.inbound_nodes
            raise GraphError(f"{self.label}: b has shape {_shape(b)}, which would broadcast x "
                             f"{_shape(x)} to a larger shape.\nhelp: check {B.label}: a bias "
                             f"is (n,) for x (..., n).")
        self.value = self.ops.add(x, b, out=self.buffers["value", _shape(x), x.dtype])

    def backward(self) -> None:
        G = self.upstream_gradient()
        _send(self, (G, _unbroadcast(self, G, _shape(self.inbound_nodes[1].value), "db")))


class Scale(Node):
    """x times a Python number c."""

    def __init__(self, x: Node, c: float, *, name: str | None = None):
        Node.__init__(self, [x], name=name)
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
            raise GraphError(f"{self.label}: c={c!r} must be a finite Python number.\nhelp: "
                             "e.g. Scale(x, 0.125); multiply by an array with Mul(x, y).")
        self.c = float(c)

    def forward(self) -> None:
        x = self.inbound_nodes[0].value
        self.value = self.ops.multiply(x, self.c, out=self.buffers["value", _shape(x), x.dtype])

    def backward(self) -> None:
        G = self.upstream_gradient()
        self.gradients[self.inbound_nodes[0]] = self.ops.multiply(
            G, self.c, out=self.buffers["grad", _shape(G), G.dtype])


class Reshape(Node):
    """x with a new shape of as many elements, as torch.reshape: one entry may be -1 (the
    size that makes the count fit). An entry None keeps x's size at that position, for the
    sizes a graph does not know when it is built: Reshape(x, (None, None, heads, -1)) splits
    the last dimension of an (N, T, dim) x into heads, whatever N and T are fed."""

    def __init__(self, x: Node, shape: Sequence[int | None], *, name: str | None = None):
        Node.__init__(self, [x], name=name)
        try:
            self.shape = tuple(shape)
        except TypeError:
            self.shape = (shape,)
        if (not all(n is None or isinstance(n, int) and not isinstance(n, bool) and n >= -1
                    for n in self.shape) or self.shape.count(-1) > 1):
            raise GraphError(f"{self.label}: shape {shape!r} must be a tuple of sizes >= 0 "
                                 "(or None, x's size there) with at most one -1.\nhelp: e.g. "
                                 "Reshape(x, (-1, 64)) or Reshape(x, (None, None, 4, -1)).")

    def _target(self, x: Any) -> tuple[int, ...]:
        past = [i for i, n in enumerate(self.shape) if n is None and i >= x.ndim]
        if past:
            raise GraphError(f"{self.label}: shape {self.shape} keeps x's size at position "
                             f"{past[0]} (None), but x has shape {_shape(x)} ({x.ndim}-D).\n"
                             "help: use None only at positions x has, or give the size.")
        shape = tuple(x.shape[i] if n is None else n for i, n in enumerate(self.shape))
        count, known = math.prod(x.shape), math.prod(n for n in shape if n != -1)
        if -1 in shape and known and count % known == 0:
            shape = tuple(count // known if n == -1 else n for n in shape)
        if math.prod(shape) != count or -1 in shape:
            raise GraphError(f"{self.label}: x has shape {_shape(x)} ({count} values), which "
                             f"does not fit shape {self.shape}.\nhelp: make the sizes multiply "
                             f"to {count}, or use -1 for one of them.")
        return shape

    def forward(self) -> None:
        x = self.inbound_nodes[0].value
        shape = self._target(x)
        into = self.ops.reshape_into  # a view, or a copy into a kept buffer (a transposed x)
        self.value = (self.xp.reshape(x, shape) if into is None
                      else into(x, shape, self.buffers["value", shape, x.dtype]))

    def backward(self) -> None:
        G = self.upstream_gradient()
        x = self.inbound_nodes[0]
        shape, into = _shape(x.value), self.ops.reshape_into
        self.gradients[x] = (self.xp.reshape(G, shape) if into is None
                             else into(G, shape, self.buffers["grad", shape, G.dtype]))


class Transpose(Node):
    """x with its axes permuted, as torch.permute: output axis i is input axis axes[i]."""

    def __init__(self, x: Node, axes: Sequence[int], *, name: str | None = None):
        Node.__init__(self, [x], name=name)
        try:
            self.axes = tuple(axes)
        except TypeError:
            self.axes = (axes,)
        n = len(self.axes)
        if (not all(isinstance(a, int) and not isinstance(a, bool) for a in self.axes)
                or sorted(a % n if -n <= a < n else a + 2 * n for a in self.axes)
                != list(range(n))):
            raise GraphError(f"{self.label}: axes {axes!r} is not a permutation of 0 .. "
                             f"{n - 1}.\nhelp: name every axis once, e.g. (0, 2, 1, 3).")
        self.axes = tuple(a % n for a in self.axes)

    def forward(self) -> None:
        x = self.inbound_nodes[0].value
        if x.ndim != len(self.axes):
            raise GraphError(f"{self.label}: x has shape {_shape(x)} ({x.ndim}-D) but axes "
                             f"{self.axes} permute {len(self.axes)} axes.\nhelp: give one "
                             "entry per axis of x.")
        self.value = self.xp.permute_dims(x, self.axes)

    def backward(self) -> None:
        G = self.upstream_gradient()
        inverse = tuple(sorted(range(len(self.axes)), key=self.axes.__getitem__))
        self.gradients[self.inbound_nodes[0]] = self.xp.permute_dims(G, inverse)


class Concat(Node):
    """The inputs joined along `axis`, as torch.cat: every other dimension must match."""

    def __init__(self, nodes: Sequence[Node], axis: int = 0, *, name: str | None = None):
        Node.__init__(self, list(nodes), name=name)
        if not self.inbound_nodes:
            raise GraphError("Concat needs at least one node.\nhelp: Concat([a, b], axis=-1).")
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise GraphError(f"{self.label}: axis {axis!r} must be an integer.\nhelp: e.g. "
                             "axis=-1.")
        self.axis = axis

    def forward(self) -> None:
        values = [n.value for n in self.inbound_nodes]
        ndim = values[0].ndim
        axis = _axis(self, self.axis, max(ndim, 1))
        shapes = [_shape(v) for v in values]
        if any(len(s) != ndim or s[:axis] + s[axis + 1:] != shapes[0][:axis] +
               shapes[0][axis + 1:] for s in shapes):
            listing = ", ".join(f"{n.label} {s}" for n, s in zip(self.inbound_nodes, shapes))
            raise GraphError(f"{self.label}: the inputs' shapes ({listing}) differ outside "
                             f"axis {self.axis}.\nhelp: every dimension but the joined one must "
                             "match.")
        self._sizes = [s[axis] for s in shapes]
        self.value = self.xp.concat(values, axis=axis)

    def backward(self) -> None:
        G = self.upstream_gradient()
        axis = _axis(self, self.axis, G.ndim)
        grads, start = [], 0
        for size in self._sizes:
            index = (slice(None),) * axis + (slice(start, start + size), ...)
            grads.append(G[index])
            start += size
        _send(self, grads)


class Slice(Node):
    """x[start:stop] along `axis`, with Python's slice rules (negative or None bounds, clipped
    to the axis)."""

    def __init__(self, x: Node, start: int | None, stop: int | None, axis: int = 0, *,
                 name: str | None = None):
        Node.__init__(self, [x], name=name)
        for what, v in (("start", start), ("stop", stop), ("axis", axis)):
            if isinstance(v, bool) or not (isinstance(v, int) or (v is None and what != "axis")):
                raise GraphError(f"{self.label}: {what}={v!r} must be an integer"
                                 f"{'' if what == 'axis' else ' or None'}.\nhelp: e.g. "
                                 "Slice(x, 0, 16, axis=-1).")
        self.start, self.stop, self.axis = start, stop, axis

    def _index(self, shape: tuple[int, ...]) -> tuple[int, tuple, int, int]:
        axis = _axis(self, self.axis, len(shape))
        start, stop, _ = slice(self.start, self.stop).indices(shape[axis])
        stop = max(start, stop)
        return axis, (slice(None),) * axis + (slice(start, stop), ...), start, stop

    def forward(self) -> None:
        x = self.inbound_nodes[0].value
        self.value = x[self._index(_shape(x))[1]]

    def backward(self) -> None:
        G = self.upstream_gradient()
        x = self.inbound_nodes[0].value
        xp, shape = self.xp, _shape(x)
        axis, index, start, stop = self._index(shape)
        out = self.buffers["grad", shape, G.dtype]
        if out is not None:  # G written between zeros, into a kept array
            self.gradients[self.inbound_nodes[0]] = _between_zeros(self.ops, G, out, axis,
                                                                   start, stop)
            return
        parts = []
        for size in (start, None, shape[axis] - stop):  # G put back between zeros
            if size is None:
                parts.append(G)
            elif size:
                parts.append(xp.zeros(shape[:axis] + (size,) + shape[axis + 1:], dtype=G.dtype,
                                      device=self.device.native))
        self.gradients[self.inbound_nodes[0]] = (parts[0] if len(parts) == 1
                                                 else xp.concat(parts, axis=axis))


class GELU(Node):
    """x Phi(x), Phi the standard normal distribution function, as torch.nn.functional.gelu:
    `approximate="none"` as 0.5 (1 + erf(x / sqrt 2)) (the device's erf, `ops.erf`),
    "tanh" as 0.5 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))). torch's formulas, value and
    gradient: 1 + erf and 1 + tanh cancel in the far negative tail, here as in torch (an error
    of float64 rounding next to 1; exp underflows to 0 there, so no NaN at any x). Where the
    device's ops have `gelu` / `gelu_backward` (torch), that one kernel runs instead."""

    def __init__(self, x: Node, approximate: str = "none", *, name: str | None = None):
        Node.__init__(self, [x], name=name)
        if approximate not in ("none", "tanh"):
            raise GraphError(f"{self.label}: approximate={approximate!r} must be 'none' or "
                             "'tanh'.\nhelp: use 'none' (exact, torch's default) or 'tanh'.")
        self.approximate = approximate

    def forward(self) -> None:
        x = self.inbound_nodes[0].value
        ops, buffers, shape, dtype = self.ops, self.buffers, _shape(x), x.dtype
        value = buffers["value", shape, dtype]  # scratch until the last line
        if ops.gelu is not None:  # the library's one kernel (torch's gelu)
            self.value = ops.gelu(x, self.approximate, out=value)
            return
        cdf = buffers["cdf", shape, dtype]
        if self.approximate == "none":
            z = ops.multiply(x, _SQRT1_2, out=value)
            e = ops.erf(z, out=cdf)  # in place on NumPy (kept scratch: backends/numpy.py)
            cdf = ops.multiply(ops.add(e, 1.0, out=e), 0.5, out=e)
        else:
            cube = ops.multiply(ops.multiply(x, x, out=value), x, out=value)
            inner = ops.add(x, ops.multiply(cube, _KAPPA, out=cube), out=cube)
            self.t = ops.tanh(ops.multiply(inner, _SQRT_2_OVER_PI, out=inner),
                              out=buffers["t", shape, dtype])
            cdf = ops.multiply(ops.add(self.t, 1.0, out=cdf), 0.5, out=cdf)
        self.cdf = cdf
        self.value = ops.multiply(x, cdf, out=value)

    def backward(self) -> None:
        G = self.upstream_gradient()
        x, ops, buffers = self.inbound_nodes[0].value, self.ops, self.buffers
        shape, dtype = _shape(x), x.dtype
        slope = buffers["grad", shape, dtype]
        if ops.gelu_backward is not None:  # the library's one kernel (torch's gelu_backward)
            self.gradients[self.inbound_nodes[0]] = _flush_subnormals(
                self, ops.gelu_backward(G, x, self.approximate, out=slope), "flush")
            return
        if self.approximate == "none":  # Phi(x) + x phi(x); exp underflows to 0 in the tails
            density = ops.multiply(ops.multiply(x, x, out=slope), -0.5, out=slope)
            density = ops.multiply(ops.exp(density, out=density), _INV_SQRT_2PI, out=density)
            slope = ops.add(self.cdf, ops.multiply(x, density, out=density), out=density)
        else:  # cdf + (0.5 x) (1 - t^2) (sqrt(2/pi) (1 + 3 kappa x^2))
            work = buffers["slope_work", (2,) + shape, dtype]
            a, b = (None, None) if work is None else (work[0], work[1])
            inner = ops.multiply(ops.multiply(x, x, out=a), 3.0 * _KAPPA, out=a)
            inner = ops.multiply(ops.add(inner, 1.0, out=inner), _SQRT_2_OVER_PI, out=inner)
            tt = ops.subtract(1.0, ops.multiply(self.t, self.t, out=slope), out=slope)
            product = ops.multiply(ops.multiply(x, 0.5, out=b), tt, out=tt)
            product = ops.multiply(product, inner, out=product)
            slope = ops.add(self.cdf, product, out=product)
        self.gradients[self.inbound_nodes[0]] = _flush_subnormals(  # x phi(x) past x = -13
            self, ops.multiply(G, slope, out=slope), "flush")


class SiLU(Node):
    """x sigmoid(x) (swish), as torch.nn.functional.silu; the sigmoid in the split form of
    gpuflow.Sigmoid (`_sigmoid`: no exp of a positive number, no overflow in either tail)."""

    def __init__(self, x: Node, *, name: str | None = None):
        Node.__init__(self, [x], name=name)

    def forward(self) -> None:
        x = self.inbound_nodes[0].value
        self.sigmoid, self.complement = _sigmoid(self.xp, x)  # 1 - sigmoid, no cancelling
        self.value = x * self.sigmoid

    def backward(self) -> None:
        G = self.upstream_gradient()
        x = self.inbound_nodes[0].value
        self.gradients[self.inbound_nodes[0]] = G * (self.sigmoid * (1.0 + x * self.complement))
