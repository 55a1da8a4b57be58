"""Shape helpers of the sequence nodes (gpuflow/nodes/sequence.py, positions.py, recurrent.py):
broadcasting and its adjoint (a gradient summed back to an input's shape, into a kept buffer),
axes, a gradient put back between zeros, gradients sent to inbound nodes, and float32
subnormals flushed to zero."""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import GraphError
from .core import Node


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape)


def _broadcast(node: Node, *shapes: tuple[int, ...], what: str = "") -> tuple[int, ...]:
    """The broadcast of `shapes` (NumPy's rules); GraphError naming `node` if they do not."""
    out: list[int] = []
    for i in range(1, max(map(len, shapes), default=0) + 1):
        sizes = {s[-i] for s in shapes if len(s) >= i} - {1}
        if len(sizes) > 1:
            listing = " and ".join(str(s) for s in shapes)
            raise GraphError(f"{node.label}: {what or 'the inputs'} have shapes {listing}, which "
                             "do not broadcast (each dimension must match or be 1).\nhelp: "
                             "reshape the inputs, or check the layer before.")
        out.append(sizes.pop() if sizes else 1)
    return tuple(reversed(out))


def _unbroadcast(node: Node, grad: Any, shape: tuple[int, ...], name: str) -> Any:
    """`grad` summed over the dimensions broadcasting added to an input of `shape`, the sum
    written into `node`'s kept buffer `name`."""
    if _shape(grad) == shape:
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape)
                                      if n == 1 and grad.shape[lead + i] != 1)
    if axes:
        kept = tuple(n for i, n in enumerate(grad.shape) if i not in axes)
        grad = node.ops.sum(grad, axis=axes, out=node.buffers[name, kept, grad.dtype])
    return node.xp.reshape(grad, shape)


def _send(node: Node, grads: Sequence[Any]) -> None:
    """Store each needed gradient for its inbound node; one node met twice gets their sum."""
    out: dict[Node, Any] = {}
    for n, g, need in zip(node.inbound_nodes, grads, node.needs_grad):
        if need and g is not None:
            out[n] = out[n] + g if n in out else g
    node.gradients.update(out)


def _device_range(node: Node, a: Any, what: str) -> tuple[Any, Any]:
    """(min, max) of a non-empty array on `node`'s device, read to the host: the first step's
    check of fed labels or ids (an allowed transfer, once)."""
    from ..backends import LEDGER
    xp = node.xp
    with LEDGER.allowed():
        return (node.device.item(xp.min(a), what=what), node.device.item(xp.max(a), what=what))


def _axis(node: Node, axis: Any, ndim: int) -> int:
    """`axis` (negative counts from the end) as an index into `ndim` dimensions."""
    if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise GraphError(f"{node.label}: axis {axis!r} is not an axis of a {ndim}-D input (-{ndim}"
                         f" .. {ndim - 1}).\nhelp: pass an integer axis in that range.")
    return axis % ndim


def _between_zeros(ops: Any, G: Any, out: Any, axis: int, start: int, stop: int) -> Any:
    """`out` with G at [start:stop] along `axis` and zeros elsewhere (Slice's and Positions'
    gradient). The zeros are written at every step (x > x is false for every x, NaN
    included), as a kept array may have been written since."""
    lead = (slice(None),) * axis
    for lo, hi in ((0, start), (stop, out.shape[axis])):
        if hi > lo:
            part = out[lead + (slice(lo, hi), ...)]
            ops.greater(part, part, out.dtype, out=part)
    ops.copy(G, out=out[lead + (slice(start, stop), ...)])
    return out


# float32's largest subnormal number, 2^-126 (1 - 2^-23): its smallest normal one times 1 - eps
_LARGEST_SUBNORMAL32 = 2.0 ** -126 * (1.0 - 2.0 ** -23)


def _flush_subnormals(node: Node, a: Any, name: str) -> Any:
    """`a` with its float32 subnormal entries (|a| < 1.2e-38) set to 0, in place: a CPU BLAS
    without flush-to-zero runs a matmul on them up to 100x slower (a GPT's steps on the cpu
    device, once attention and GELU's tail made them). float16 keeps its subnormals (they
    carry its small gradients), and float64's are never reached; other dtypes pass through,
    as does every array of a device whose results are never subnormal (`flushes_subnormals`:
    XLA). The device's `ops.flush_subnormals` where it has one (torch: one pass; NumPy: three),
    else four portable passes."""
    if a.dtype != node.xp.float32 or node.device.flushes_subnormals:
        return a
    ops, out, largest = node.ops, node.buffers[name, _shape(a), a.dtype], _LARGEST_SUBNORMAL32
    if ops.flush_subnormals is not None:
        return ops.flush_subnormals(a, largest, out)
    size = ops.maximum(a, ops.multiply(a, -1.0, out=out), out=out)  # |a|
    return ops.multiply(a, ops.greater(size, largest, a.dtype, out=size),
                        out=a)  # |a| > the largest subnormal; NaN * 0: NaN
