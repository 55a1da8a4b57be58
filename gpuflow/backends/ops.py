"""The operations of a training step, `Ops`: the part of the backend contract (see base.py)
that node and optimizer code calls as `self.ops.<op>`, every op and optional route declared
here."""

from __future__ import annotations

from typing import Any, Callable

from . import special


class Ops:
    """The array operations a training step makes, each able to write into an `out` array.

    The array API standard has no `out=`; NumPy, CuPy and torch do, and writing into buffers a
    node keeps from step to step (`Node.buffers`) is what makes a step allocation-free. Every
    function returns its result: `out` itself where the backend writes there, a new array
    where it cannot. `out` may be None (compute a new array). This generic version, built on
    the array namespace and used for libraries without `out=` (array_api_strict, JAX), ignores
    `out`; `writes_out` says which.

    Elementwise: add, subtract, multiply, divide, maximum (x1, x2, out=None); tanh, exp, log,
    sqrt (x, out=None); greater and equal (x1, x2, dtype, out=None) give 1 or 0 in `dtype`.
    Reductions of floating arrays: sum, max (x, axis=None, keepdims=False, out=None).
    matmul (x1, x2, out=None). `out` must have the result's shape and dtype.
    Beyond the standard (portable versions in `special`, a library's own where it has one):
    erf (x, out=None); take_rows (table, ids, out=None), the rows table[ids] of a 2-D table
    for 1-D integer ids; scatter_add_rows (ids, values, rows, out=None), its adjoint: a
    (rows, dim) array adding each row of values (M, dim) into row ids[i]; copy (x, out=None),
    x's values written into `out` (a new array without one).

    Optional routes (`OPTIONAL`, declared below, each None here): a library's own kernel for
    work that nodes and optimizers otherwise do with the ops above. Code asks
    `ops.<route> is not None` (or takes `ops.<route>` and tests it) and runs the portable route
    where it is None; a backend that has one defines it (a method, or an entry of the table
    `UfuncOps` binds).

    To add an op: write its generic version here; if its signature is the NumPy ufunc's own
    (`f(x1, x2, out=None)`), add its name to `LIBRARY_NAMED`, and each `UfuncOps` backend puts
    its library's function of that name into the table of routes it binds. To add an optional
    route: declare it below with None and a one-line docstring, add it to `OPTIONAL`, and
    define it in the backends that have one.
    """

    writes_out = False
    # Ops whose NumPy-style signature (arrays, then out=) libraries share under the same name.
    LIBRARY_NAMED = ("matmul", "add", "subtract", "multiply", "divide", "maximum",
                     "tanh", "exp", "log", "sqrt")

    # Optional routes: None (the portable route runs) unless a backend defines one.
    OPTIONAL = ("matmul_add", "subtract_scaled", "stack", "col2im", "conv2d", "conv2d_backward",
                "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
                "reshape_into", "gelu", "gelu_backward", "layer_norm", "layer_norm_backward",
                "softmax", "softmax_backward", "flush_subnormals")
    matmul_add: Callable[..., Any] | None = None
    """(x1, x2, x3, out=None) -> x1 @ x2 + x3 in one kernel (gpuflow.Linear; torch's addmm)."""
    subtract_scaled: Callable[..., Any] | None = None
    """(x, y, alpha) -> x -= alpha * y in place, one rounding (SGD's step; torch's sub_)."""
    stack: Callable[..., Any] | None = None
    """(arrays, axis=0, out=None) -> xp.stack written into `out` (im2col's columns)."""
    col2im: Callable[..., Any] | None = None
    """(parts, kh, kw, sh, sw, out) -> gpuflow.nodes.conv.col2im added in place into `out`."""
    conv2d: Callable[..., Any] | None = None
    """(x, w, bias, stride, padding) -> gpuflow.Conv2D's value by the library's convolution."""
    conv2d_backward: Callable[..., Any] | None = None
    """(G, x, w, stride, padding, need) -> (dx, dW[, db]), None where `need` says no."""
    max_pool2d: Callable[..., Any] | None = None
    """(x, size, stride) -> (value, argmax): gpuflow.MaxPool2D's value and where each max is."""
    max_pool2d_backward: Callable[..., Any] | None = None
    """(G, x, argmax, size, stride) -> dx of gpuflow.MaxPool2D."""
    avg_pool2d: Callable[..., Any] | None = None
    """(x, size, stride) -> gpuflow.AvgPool2D's value."""
    avg_pool2d_backward: Callable[..., Any] | None = None
    """(G, x, size, stride) -> dx of gpuflow.AvgPool2D."""
    reshape_into: Callable[..., Any] | None = None
    """(x, shape, out) -> xp.reshape(x, shape): a view where x's strides allow one, else x
    copied into `out` (of `shape`: a head merge after a Transpose; gpuflow.Reshape)."""
    gelu: Callable[..., Any] | None = None
    """(x, approximate, out=None) -> gpuflow.GELU's value in one kernel (torch's gelu)."""
    gelu_backward: Callable[..., Any] | None = None
    """(G, x, approximate, out=None) -> G times GELU's slope at x (torch's gelu_backward)."""
    layer_norm: Callable[..., Any] | None = None
    """(x, gamma, beta, eps, out=None) -> (value, mean, rstd) of gpuflow.LayerNorm over the last
    axis, `out` None or such a triple (torch's native_layer_norm; float32 and float64)."""
    layer_norm_backward: Callable[..., Any] | None = None
    """(G, x, mean, rstd, gamma, need) -> (dx, dgamma, dbeta), None where `need` says no."""
    softmax: Callable[..., Any] | None = None
    """(x, out=None) -> exp(x - max) / sum(exp(x - max)) over the last axis (torch's softmax)."""
    softmax_backward: Callable[..., Any] | None = None
    """(G, p, out=None) -> p (G - sum(G p)) over the last axis, p the softmax's value."""
    flush_subnormals: Callable[..., Any] | None = None
    """(a, largest, work) -> a with its entries |a| <= largest set to 0 in place, NaN kept
    (`work`: scratch of a's shape and dtype, or None; gpuflow.nodes.shapes._flush_subnormals)."""

    def __init__(self, xp: Any) -> None:
        self.xp = xp

    def matmul(self, x1: Any, x2: Any, out: Any = None) -> Any:
        return x1 @ x2

    def add(self, x1: Any, x2: Any, out: Any = None) -> Any:
        return x1 + x2

    def subtract(self, x1: Any, x2: Any, out: Any = None) -> Any:
        return x1 - x2

    def multiply(self, x1: Any, x2: Any, out: Any = None) -> Any:
        return x1 * x2

    def divide(self, x1: Any, x2: Any, out: Any = None) -> Any:
        return x1 / x2

    def maximum(self, x1: Any, x2: Any, out: Any = None) -> Any:
        return self.xp.maximum(x1, x2)

    def tanh(self, x: Any, out: Any = None) -> Any:
        return self.xp.tanh(x)

    def exp(self, x: Any, out: Any = None) -> Any:
        return self.xp.exp(x)

    def log(self, x: Any, out: Any = None) -> Any:
        return self.xp.log(x)

    def sqrt(self, x: Any, out: Any = None) -> Any:
        return self.xp.sqrt(x)

    def greater(self, x1: Any, x2: Any, dtype: Any, out: Any = None) -> Any:
        return self.xp.astype(x1 > x2, dtype)

    def equal(self, x1: Any, x2: Any, dtype: Any, out: Any = None) -> Any:
        return self.xp.astype(x1 == x2, dtype)

    def sum(self, x: Any, axis: Any = None, keepdims: bool = False, out: Any = None) -> Any:
        return self.xp.sum(x, axis=axis, keepdims=keepdims)

    def max(self, x: Any, axis: Any = None, keepdims: bool = False, out: Any = None) -> Any:
        return self.xp.max(x, axis=axis, keepdims=keepdims)

    def erf(self, x: Any, out: Any = None) -> Any:
        return special.erf(self.xp, x)

    def take_rows(self, table: Any, ids: Any, out: Any = None) -> Any:
        return self.xp.take(table, ids, axis=0)

    def scatter_add_rows(self, ids: Any, values: Any, rows: int, out: Any = None) -> Any:
        return special.scatter_add_rows(self.xp, ids, values, rows)

    def copy(self, x: Any, out: Any = None) -> Any:
        return self.xp.asarray(x, copy=True)


class UfuncOps(Ops):
    """`Ops` for a library `lib` whose functions take `out=` (NumPy, CuPy, torch).

    `routes` is the backend's one table of the ops it binds as they are, name -> function
    (`{"add": numpy.add, ...}`, `LIBRARY_NAMED` ops under the library's own names): called with
    no Python layer in between, as a small net's step makes hundreds of these calls. Every name
    must be an op `Ops` declares; an op not in the table runs the class's method. greater,
    equal, sum and max use `lib`'s NumPy names."""

    writes_out = True

    def __init__(self, xp: Any, lib: Any, routes: dict[str, Callable[..., Any]]) -> None:
        super().__init__(xp)
        self._lib = lib
        self._greater, self._equal = getattr(lib, "greater", None), getattr(lib, "equal", None)
        unknown = sorted(set(routes) - OP_NAMES)
        if unknown:
            raise TypeError(f"{type(self).__name__}: routes {unknown} are not ops of Ops; "
                            "declare an optional route in Ops (backends/ops.py) first")
        vars(self).update(routes)

    def greater(self, x1: Any, x2: Any, dtype: Any, out: Any = None) -> Any:
        if out is None:
            return self._lib.greater(x1, x2).astype(dtype)
        return self._greater(x1, x2, out=out)  # True/False written as 1/0 in out's dtype

    def equal(self, x1: Any, x2: Any, dtype: Any, out: Any = None) -> Any:
        if out is None:
            return self._lib.equal(x1, x2).astype(dtype)
        return self._equal(x1, x2, out=out)

    def sum(self, x: Any, axis: Any = None, keepdims: bool = False, out: Any = None) -> Any:
        return self._lib.sum(x, axis=axis, keepdims=keepdims, out=out)

    def max(self, x: Any, axis: Any = None, keepdims: bool = False, out: Any = None) -> Any:
        return self._lib.amax(x, axis=axis, keepdims=keepdims, out=out)

    def copy(self, x: Any, out: Any = None) -> Any:
        if out is None:
            return super().copy(x)
        self._lib.copyto(out, x)  # NumPy and CuPy (TorchOps: copy_)
        return out

    def stack(self, arrays: list, axis: int = 0, out: Any = None) -> Any:
        """xp.stack, into `out` (gpuflow.nodes.conv's im2col columns)."""
        return self._lib.stack(arrays, axis=axis, out=out)

    def col2im(self, parts: list, kh: int, kw: int, sh: int, sw: int, out: Any) -> Any:
        """gpuflow.nodes.conv.col2im, adding each part in place into `out` (N, C, Hp, Wp)."""
        from .windows import col2im_in_place
        return col2im_in_place(parts, kw, sh, sw, out)


# Every op and optional route of the contract: the names a backend's table of routes may bind.
OP_NAMES = frozenset(name for name, value in vars(Ops).items()
                     if callable(value) and not name.startswith("_")) | frozenset(Ops.OPTIONAL)
