"""Image nodes, NCHW layout, weights laid out as PyTorch does: Conv2D, MaxPool2D, AvgPool2D,
Flatten.

The portable route runs on every array-API library: im2col stacks the kh * kw strided slices
of the (zero-padded, channels-first) input into one column matrix for the whole batch, one
matmul makes the convolution, and col2im adds the column gradients back through the same
slices. It uses only what ops return (concatenation for padding, no `x[...] = v`), so it runs
on libraries with immutable arrays (JAX) as well. Where a device's `ops` has more, the nodes
use it: `ops.stack` into a kept buffer, `ops.col2im` adding in place (NumPy, CuPy, torch), and
the library's own convolution, `ops.conv2d` / `ops.conv2d_backward` (torch: oneDNN, cuDNN).
"""

from __future__ import annotations

from typing import Any

from ..errors import GraphError
from .core import Node


def _pair(value: Any, what: str, kind: str, *, minimum: int) -> tuple[int, int]:
    """An int or an (h, w) pair as a pair of ints >= `minimum`; GraphError otherwise."""
    try:
        pair = (value, value) if isinstance(value, int) else tuple(value)
    except TypeError:  # neither an int nor a sequence
        pair = ()
    if (len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            or min(pair) < minimum):
        raise GraphError(f"{kind}: {what} {value!r} must be an int >= {minimum} or an (h, w) "
                         f"pair of them.\nhelp: pass e.g. {what}={max(minimum, 1)}.")
    return pair


def _out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def pad2d(xp: Any, x: Any, ph: int, pw: int, device: Any) -> Any:
    """x (N, C, H, W) with ph zero rows above and below and pw zero columns left and right,
    by concatenation (the array API standard has no pad)."""
    if ph == 0 and pw == 0:
        return x
    n, c, h, w = x.shape
    if ph:
        rows = xp.zeros((n, c, ph, w), dtype=x.dtype, device=device)
        x = xp.concat([rows, x, rows], axis=2)
    if pw:
        cols = xp.zeros((n, c, h + 2 * ph, pw), dtype=x.dtype, device=device)
        x = xp.concat([cols, x, cols], axis=3)
    return x


def _dilate(xp: Any, g: Any, stride: int, axis: int, device: Any) -> Any:
    """g with stride - 1 zeros between its entries along `axis` (2 or 3)."""
    if stride == 1:
        return g
    zeros = xp.zeros(g.shape, dtype=g.dtype, device=device)
    woven = xp.stack([g] + [zeros] * (stride - 1), axis=axis + 1)
    shape = list(g.shape)
    shape[axis] *= stride
    woven = xp.reshape(woven, tuple(shape))
    keep = (g.shape[axis] - 1) * stride + 1
    return woven[:, :, :keep, ...] if axis == 2 else woven[..., :keep]


def _place(xp: Any, g: Any, offset: int, stride: int, size: int, axis: int,
           device: Any) -> Any:
    """g's entries at offset, offset + stride, ... of a zero axis of length `size`."""
    g = _dilate(xp, g, stride, axis, device)
    after = size - offset - g.shape[axis]
    parts = []
    for count in (offset, None, after):
        if count is None:
            parts.append(g)
        elif count:
            shape = list(g.shape)
            shape[axis] = count
            parts.append(xp.zeros(tuple(shape), dtype=g.dtype, device=device))
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=axis)


def col2im(xp: Any, parts: list, kh: int, kw: int, sh: int, sw: int, hp: int, wp: int,
           device: Any) -> Any:
    """The adjoint of im2col's slices (`_slices`): parts[i * kw + j] (A, B, Ho, Wo) added back
    through the slice of offset (i, j) into an (A, B, Hp, Wp) array of zeros, without writing
    into any array."""
    n, c, ho, wo = parts[0].shape
    if (sh, sw) == (kh, kw):  # windows tile the input: a reshape puts every entry in place
        tiles = xp.reshape(xp.stack(parts, axis=2), (n, c, kh, kw, ho, wo))
        tiles = xp.reshape(xp.permute_dims(tiles, (0, 1, 4, 2, 5, 3)), (n, c, ho * kh, wo * kw))
        return _place(xp, _place(xp, tiles, 0, 1, hp, 2, device), 0, 1, wp, 3, device)
    total = None
    for i in range(kh):  # one row of the kernel at a time: the wide placement once per row
        row = None
        for j in range(kw):
            part = _place(xp, parts[i * kw + j], j, sw, wp, 3, device)
            row = part if row is None else row + part
        part = _place(xp, row, i, sh, hp, 2, device)
        total = part if total is None else total + part
    return total


def _padded(node: Node, x: Any, ph: int, pw: int) -> Any:
    """`pad2d`, into the node's kept buffer where the device writes into arrays: x copied into
    its middle (x * 1.0, exact), the zero border written when the buffer is new."""
    if ph == 0 and pw == 0:
        return x  # im2col's stack copies it anyway
    shape = (x.shape[0], x.shape[1], x.shape[2] + 2 * ph, x.shape[3] + 2 * pw)
    out = node.buffers["xpad", shape, x.dtype] if node.ops.writes_out else None
    if out is None:
        return pad2d(node.xp, x, ph, pw, node.device.native)
    if node.__dict__.get("_zero_border") is not out:
        _zero(node, (out[:, :, :ph], out[:, :, shape[2] - ph:], out[:, :, :, :pw],
                     out[:, :, :, shape[3] - pw:]))
        node._zero_border = out
    node.ops.multiply(x, 1.0, out=_crop(out, ph, pw))
    return out


def _zero(node: Node, views: tuple) -> None:
    """Zeros written into each (non-empty) view of a kept buffer: x > x is false for every x,
    NaN included (no `x[...] = 0`: see gpuflow/runtime/buffers.py)."""
    for view in views:
        if 0 not in view.shape:
            node.ops.greater(view, view, view.dtype, out=view)


def _crop(x: Any, ph: int, pw: int) -> Any:
    """x without the padding added by `pad2d`."""
    h, w = x.shape[2] - 2 * ph, x.shape[3] - 2 * pw
    return x[:, :, ph:ph + h, pw:pw + w] if (ph or pw) else x


def _check_image(node: Node, x: Any, what: str = "x") -> None:
    if x.ndim != 4:
        raise GraphError(f"{node.label}: {what} has shape {tuple(x.shape)} ({x.ndim}-D); expected "
                         "4-D (batch, channels, height, width).\nhelp: reshape the data, e.g. "
                         "x.reshape(n, 1, 8, 8) for one-channel 8x8 images.")


class Conv2D(Node):
    """2-D cross-correlation, as torch.nn.functional.conv2d.

    x (N, C_in, H, W), W (C_out, C_in, kh, kw), b (C_out,) or None; stride and padding (zeros)
    an int or an (h, w) pair. value: (N, C_out, Ho, Wo), Ho = (H + 2 ph - kh) // sh + 1.
    """

    def __init__(self, x: Node, W: Node, b: Node | None = None, *, stride: Any = 1,
                 padding: Any = 0, name: str | None = None):
        Node.__init__(self, [x, W] + ([b] if b is not None else []), name=name)
        self.stride = _pair(stride, "stride", self.label, minimum=1)
        self.padding = _pair(padding, "padding", self.label, minimum=0)

    def _shapes(self, x: Any, w: Any) -> tuple[int, int]:
        """(Ho, Wo), after checking the shapes of x, W and b."""
        _check_image(self, x)
        (sh, sw), (ph, pw) = self.stride, self.padding
        if w.ndim != 4 or w.shape[1] != x.shape[1]:
            raise GraphError(
                f"{self.label}: x has shape {tuple(x.shape)} ({x.shape[1]} channels) but W has "
                f"shape {tuple(w.shape)}; W must be (C_out, C_in, kh, kw) with C_in == "
                f"x.shape[1].\nhelp: make in_channels {x.shape[1]}, or check the layer "
                "before.")
        kh, kw = w.shape[2:]
        hp, wp = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
        if kh > hp or kw > wp:
            raise GraphError(
                f"{self.label}: kernel {kh}x{kw} is larger than the padded input {hp}x{wp} "
                f"(x {tuple(x.shape)}, padding {self.padding}).\nhelp: use a smaller kernel, "
                "more padding, or fewer pooling layers before this one.")
        if len(self.inbound_nodes) == 3:
            b = self.inbound_nodes[2].value
            if tuple(b.shape) != (w.shape[0],):
                raise GraphError(f"{self.label}: b has shape {tuple(b.shape)} but W has "
                                 f"{w.shape[0]} output channels; b must be ({w.shape[0]},).\n"
                                 f"help: check the size of {self.inbound_nodes[2].label}.")
        return _out_size(x.shape[2], kh, sh, ph), _out_size(x.shape[3], kw, sw, pw)

    def forward(self) -> None:
        xp, x, w = self.xp, self.inbound_nodes[0].value, self.inbound_nodes[1].value
        ho, wo = self._shapes(x, w)
        bias = self.inbound_nodes[2].value if len(self.inbound_nodes) == 3 else None
        native = self.ops.conv2d  # the library's own (torch: oneDNN, cuDNN)
        if native is not None:
            self.value = native(x, w, bias, self.stride, self.padding)
            return
        (sh, sw), (ph, pw) = self.stride, self.padding
        n, cout, (kh, kw) = x.shape[0], w.shape[0], w.shape[2:]
        # Channels first, (C_in, N, H, W): the columns of the whole batch are then one
        # (C_in kh kw, N Ho Wo) matrix, and the convolution one matmul (one GEMM call).
        xpad = _padded(self, xp.permute_dims(x, (1, 0, 2, 3)), ph, pw)
        cols = _stack(self, _slices(xpad, kh, kw, sh, sw, ho, wo), "cols")
        self.cols = xp.reshape(cols, (-1, n * ho * wo))              # (C_in kh kw, N Ho Wo)
        out = self.ops.matmul(xp.reshape(w, (cout, -1)), self.cols,
                              out=self.buffers["out", (cout, n * ho * wo), x.dtype])
        if bias is not None:
            out = self.ops.add(out, xp.reshape(bias, (cout, 1)), out=out)
        out = xp.reshape(out, (cout, n, ho, wo))
        self.value = xp.permute_dims(out, (1, 0, 2, 3))              # (N, C_out, Ho, Wo)

    def backward(self) -> None:
        G = self.upstream_gradient()
        xp, X, Wn = self.xp, self.inbound_nodes[0], self.inbound_nodes[1]
        x, w = X.value, Wn.value
        need = self.needs_grad
        native = self.ops.conv2d_backward
        if native is not None:
            grads = native(G, x, w, self.stride, self.padding, need)
            for node, grad, wanted in zip(self.inbound_nodes, grads, need):
                if wanted:
                    self.gradients[node] = grad
            return
        (sh, sw), (ph, pw) = self.stride, self.padding
        n, cout, ho, wo = G.shape
        c, kh, kw = w.shape[1:]
        G2 = self.ops.multiply(xp.permute_dims(G, (1, 0, 2, 3)), 1.0,  # (C_out, N, Ho, Wo)
                               out=self.buffers["G2", (cout, n, ho, wo), G.dtype])
        G2 = xp.reshape(G2, (cout, -1))                               # (C_out, N Ho Wo)
        w2 = xp.reshape(w, (cout, -1))
        if need[0]:
            dcols = self.ops.matmul(xp.matrix_transpose(w2), G2,
                                    out=self.buffers["dcols", self.cols.shape, G.dtype])
            dcols = xp.reshape(dcols, (c, kh * kw, n, ho, wo))
            parts = [dcols[:, k, ...] for k in range(kh * kw)]
            dpad = _col2im(self, parts, kh, kw, sh, sw, x.shape[2] + 2 * ph,
                           x.shape[3] + 2 * pw)                       # (C_in, N, Hp, Wp)
            self.gradients[X] = xp.permute_dims(_crop(dpad, ph, pw), (1, 0, 2, 3))
        if need[1]:
            dW = self.ops.matmul(G2, xp.matrix_transpose(self.cols),
                                 out=self.buffers["dW", (cout, c * kh * kw), G.dtype])
            self.gradients[Wn] = xp.reshape(dW, w.shape)
        if len(need) == 3 and need[2]:
            self.gradients[self.inbound_nodes[2]] = self.ops.sum(
                G2, axis=1, out=self.buffers["db", (cout,), G.dtype])


def _slices(x: Any, kh: int, kw: int, sh: int, sw: int, ho: int, wo: int) -> list:
    """The kh * kw strided slices of x (N, C, H, W) that im2col stacks, (N, C, Ho, Wo) each."""
    return [x[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]


def _stack(node: Node, parts: list, name: str) -> Any:
    """xp.stack(parts, axis=1), into the node's buffer `name` where the library writes there."""
    stack = node.ops.stack
    if stack is None:
        return node.xp.stack(parts, axis=1)
    a, b, ho, wo = parts[0].shape
    return stack(parts, axis=1,
                 out=node.buffers[name, (a, len(parts), b, ho, wo), parts[0].dtype])


def _col2im(node: Node, parts: list, kh: int, kw: int, sh: int, sw: int, hp: int,
            wp: int) -> Any:
    """`col2im`, or the device's own (adding in place into a kept buffer) where it has one."""
    own = node.ops.col2im
    if own is None:
        return col2im(node.xp, parts, kh, kw, sh, sw, hp, wp, node.device.native)
    shape, dtype = (*parts[0].shape[:2], hp, wp), parts[0].dtype
    out = node.buffers["dx", shape, dtype]
    if out is None:  # buffers not kept (reuse_buffers=False): a new array to add into
        out = node.xp.zeros(shape, dtype=dtype, device=node.device.native)
    return own(parts, kh, kw, sh, sw, out=out)


class _Pool2D(Node):
    """Shared by the poolings: window size, stride (default: the size), shape checks."""

    def __init__(self, x: Node, size: Any = 2, *, stride: Any = None, name: str | None = None):
        Node.__init__(self, [x], name=name)
        self.size = _pair(size, "size", self.label, minimum=1)
        self.stride = self.size if stride is None else _pair(stride, "stride", self.label,
                                                              minimum=1)

    def _out_shape(self, x: Any) -> tuple[int, int]:
        """(Ho, Wo), after checking x's shape against the window."""
        _check_image(self, x)
        (kh, kw), (sh, sw) = self.size, self.stride
        if kh > x.shape[2] or kw > x.shape[3]:
            raise GraphError(f"{self.label}: window {kh}x{kw} is larger than the input "
                             f"{x.shape[2]}x{x.shape[3]} (x {tuple(x.shape)}).\nhelp: use a "
                             "smaller window, or fewer pooling layers before this one.")
        return _out_size(x.shape[2], kh, sh, 0), _out_size(x.shape[3], kw, sw, 0)

    def _windows(self, x: Any, ho: int, wo: int) -> list:
        """x's pooling windows as kh * kw strided slices (N, C, Ho, Wo), one per window entry."""
        (kh, kw), (sh, sw) = self.size, self.stride
        return _slices(x, kh, kw, sh, sw, ho, wo)

    def _unwindows(self, parts: list) -> Any:
        """The gradient for x from the gradients for each window entry (N, C, Ho, Wo)."""
        x = self.inbound_nodes[0].value
        (kh, kw), (sh, sw) = self.size, self.stride
        return _col2im(self, parts, kh, kw, sh, sw, x.shape[2], x.shape[3])


class MaxPool2D(_Pool2D):
    """Maximum over size x size windows (stride: the size by default), as torch's max_pool2d;
    the gradient goes to each window's maximum, the first one on ties (none from a window
    holding NaN).

    Routes: the library's own (`ops.max_pool2d`: torch); windows that tile the input (stride
    == size, the usual case) one axis at a time, the maximum along W then along H, whose
    gradients are written straight into strided views of the result; other windows as kh * kw
    strided slices added back by col2im."""

    def forward(self) -> None:
        x = self.inbound_nodes[0].value
        ho, wo = self._out_shape(x)
        native = self.ops.max_pool2d
        if native is not None:
            self.value, self.argmax = native(x, self.size, self.stride)
        elif self.size == self.stride:
            # Separable: a window's first maximum is its first row's (of the rows holding the
            # maximum) first maximum, so ties still go where PyTorch sends them.
            (kh, kw) = self.size
            self.cols = _slices(x, 1, kw, 1, kw, kh * ho, wo)       # (N, C, kh ho, wo) each
            self.wide = _maximum(self, self.cols, "wide")
            self.rows = _slices(self.wide, kh, 1, kh, 1, ho, wo)    # (N, C, ho, wo) each
            self.value = _maximum(self, self.rows, "value")
        else:
            self.windows = self._windows(x, ho, wo)
            self.value = _maximum(self, self.windows, "value")

    def backward(self) -> None:
        G = self.upstream_gradient()
        x = self.inbound_nodes[0].value
        native = self.ops.max_pool2d_backward
        if native is not None:
            dx = native(G, x, self.argmax, self.size, self.stride)
        elif self.size == self.stride:
            (kh, kw) = self.size
            dwide = _first_max_gradient(self, self.rows, self.value, G, (kh, 1), "dwide",
                                        self.wide.shape)
            dx = _first_max_gradient(self, self.cols, self.wide, dwide, (1, kw), "dx", x.shape)
        else:
            parts = [self.buffers[f"part{k}", G.shape, G.dtype] for k in range(len(self.windows))]
            dx = self._unwindows(_first_max_parts(self, self.windows, self.value, G, parts))
        self.gradients[self.inbound_nodes[0]] = dx


def _maximum(node: Node, entries: list, name: str) -> Any:
    """The elementwise maximum of `entries` (elementwise: faster than a reduction over a short
    axis), into the node's buffer `name`."""
    ops, first = node.ops, entries[0]
    if len(entries) == 1:
        return first
    top = node.buffers[name, first.shape, first.dtype]
    for entry in entries[1:]:
        top = ops.maximum(first if entry is entries[1] else top, entry, out=top)
    return top


def _first_max_parts(node: Node, entries: list, top: Any, G: Any, views: list | None) -> list:
    """G times 1 where the entry is `top`, the maximum, and no earlier entry was (PyTorch
    picks the first on ties), for each entry; each written into views[k] where given. A window
    holding NaN (its maximum NaN, equal to nothing) sends no gradient; torch's CPU kernel sends
    it to the last NaN."""
    ops, buffers, dtype = node.ops, node.buffers, G.dtype
    views = views or [None] * len(entries)
    if len(entries) == 2:  # (2x2 pooling, one axis at a time): the second only if greater
        e0, e1 = entries
        first = ops.equal(e0, top, dtype, out=buffers["taken", G.shape, dtype])
        second = ops.greater(e1, e0, dtype, out=buffers["first", G.shape, dtype])
        return [ops.multiply(first, G, out=views[0]), ops.multiply(second, G, out=views[1])]
    parts, taken = [], None
    for entry, view in zip(entries, views):
        if taken is None:
            first = taken = ops.equal(entry, top, dtype, out=buffers["taken", G.shape, dtype])
        else:
            first = ops.equal(entry, top, dtype, out=buffers["first", G.shape, dtype])
            free = ops.subtract(1.0, taken, out=buffers["free", G.shape, dtype])
            first = ops.multiply(first, free, out=first)
            if entry is not entries[-1]:
                taken = ops.add(taken, first, out=taken)
        parts.append(ops.multiply(first, G, out=view))
    return parts


def _first_max_gradient(node: Node, entries: list, top: Any, G: Any, size: tuple, name: str,
                        shape: tuple) -> Any:
    """The gradient, of `shape`, of `top`, the maximum over windows of `size` that tile it
    (stride: the size), whose entries are `entries` (N, C, Ho, Wo); G is top's gradient."""
    out, views = _tile_views(node, shape, G.dtype, size, G.shape[2:], name)
    parts = _first_max_parts(node, entries, top, G, views)
    if out is not None:
        return out
    (kh, kw) = size
    return col2im(node.xp, parts, kh, kw, kh, kw, shape[2], shape[3], node.device.native)


def _tile_views(node: Node, shape: tuple, dtype: Any, size: tuple, out_size: tuple,
                name: str) -> tuple[Any, list | None]:
    """(out, views): an array of `shape` (N, C, H, W) to write the gradients of windows of
    `size` that tile it into, and views[i * kw + j], its strided slice of offset (i, j), one per
    window entry (N, C, Ho, Wo); rows and columns past the last window are zero. (None, None)
    where the device cannot write into arrays (then col2im puts the parts together)."""
    if not node.ops.writes_out:
        return None, None
    (kh, kw), (ho, wo) = size, out_size
    out = node.buffers[name, tuple(shape), dtype]
    if out is None:  # buffers not kept (reuse_buffers=False): a new array
        out = node.xp.zeros(tuple(shape), dtype=dtype, device=node.device.native)
    else:
        _zero(node, (out[:, :, kh * ho:, :], out[:, :, :kh * ho, kw * wo:]))
    return out, _slices(out, kh, kw, kh, kw, ho, wo)


class AvgPool2D(_Pool2D):
    """Mean over size x size windows (stride: the size by default), as torch's avg_pool2d."""

    def forward(self) -> None:
        x = self.inbound_nodes[0].value
        ho, wo = self._out_shape(x)
        native = self.ops.avg_pool2d
        if native is not None:
            self.value = native(x, self.size, self.stride)
            return
        windows = self._windows(x, ho, wo)
        ops, first = self.ops, windows[0]
        total = ops.multiply(first, 1.0, out=self.buffers["value", first.shape, first.dtype])
        for entry in windows[1:]:
            total = ops.add(total, entry, out=total)
        self.value = ops.multiply(total, 1.0 / len(windows), out=total)

    def backward(self) -> None:
        G = self.upstream_gradient()
        x = self.inbound_nodes[0].value
        native = self.ops.avg_pool2d_backward
        if native is not None:
            self.gradients[self.inbound_nodes[0]] = native(G, x, self.size, self.stride)
            return
        count = self.size[0] * self.size[1]
        out, views = (_tile_views(self, x.shape, G.dtype, self.size, G.shape[2:], "dx")
                      if self.size == self.stride else (None, None))
        if out is not None:  # each window entry's share written in place
            for view in views:
                self.ops.multiply(G, 1.0 / count, out=view)
            self.gradients[self.inbound_nodes[0]] = out
            return
        share = self.ops.multiply(G, 1.0 / count, out=self.buffers["share", G.shape, G.dtype])
        self.gradients[self.inbound_nodes[0]] = self._unwindows([share] * count)


class Flatten(Node):
    """(N, ...) to (N, prod(...)): image features into a Linear layer."""

    def __init__(self, x: Node, *, name: str | None = None):
        Node.__init__(self, [x], name=name)

    def forward(self) -> None:
        x = self.inbound_nodes[0].value
        if x.ndim < 2:
            raise GraphError(f"{self.label}: x has shape {tuple(x.shape)}; expected a batch "
                             "(N, ...) of at least 2 dimensions.\nhelp: feed a batch, e.g. "
                             "x.reshape(1, -1) for one example.")
        self.value = self.xp.reshape(x, (x.shape[0], -1))

    def backward(self) -> None:
        G = self.upstream_gradient()
        x = self.inbound_nodes[0].value
        self.gradients[self.inbound_nodes[0]] = self.xp.reshape(G, x.shape)
