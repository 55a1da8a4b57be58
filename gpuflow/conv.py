"""Image nodes, NCHW layout, weights laid out as PyTorch does: Conv2D, MaxPool2D, AvgPool2D,
Flatten.

The portable route runs on every array-API library: im2col gathers the kh * kw strided slices
of the (zero-padded) input into columns, one matmul makes the convolution, and col2im adds the
column gradients back through the same slices. It uses only what ops return (concatenation for
padding, no `x[...] = v`), so it runs on libraries with immutable arrays (JAX) as well. A
device whose `ops` has a faster route (`ops.conv2d`, `ops.im2col`, see `backends.Ops`) takes it.
"""

from __future__ import annotations

from typing import Any

from .errors import GraphError
from .nodes import Node


def _pair(value: Any, what: str, kind: str, *, minimum: int) -> tuple[int, int]:
    """An int or an (h, w) pair as a pair of ints >= `minimum`; GraphError otherwise."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
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


def im2col(xp: Any, xpad: Any, kh: int, kw: int, sh: int, sw: int, ho: int, wo: int,
           axis: int = 2) -> Any:
    """The kh * kw strided slices of a padded input (N, C, Hp, Wp), stacked as
    (N, C, kh * kw, Ho, Wo): entry [n, c, i * kw + j, y, x] is xpad[n, c, y*sh + i, x*sw + j]
    (with axis=-1, as (N, C, Ho, Wo, kh * kw))."""
    return xp.stack([xpad[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
                     for i in range(kh) for j in range(kw)], axis=axis)


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


def col2im(xp: Any, cols: Any, kh: int, kw: int, sh: int, sw: int, hp: int, wp: int,
           device: Any) -> Any:
    """The adjoint of `im2col`: cols (N, C, kh * kw, Ho, Wo) added back through the same
    slices into a (N, C, Hp, Wp) array of zeros (without writing into any array)."""
    n, c, _, ho, wo = cols.shape
    if (sh, sw) == (kh, kw):  # windows tile the input: a reshape puts every entry in place
        tiles = xp.reshape(cols, (n, c, kh, kw, ho, wo))
        tiles = xp.reshape(xp.permute_dims(tiles, (0, 1, 4, 2, 5, 3)), (n, c, ho * kh, wo * kw))
        return _place(xp, _place(xp, tiles, 0, 1, hp, 2, device), 0, 1, wp, 3, device)
    total = None
    for i in range(kh):  # one row of the kernel at a time: the wide placement once per row
        row = None
        for j in range(kw):
            part = _place(xp, cols[:, :, i * kw + j, ...], j, sw, wp, 3, device)
            row = part if row is None else row + part
        part = _place(xp, row, i, sh, hp, 2, device)
        total = part if total is None else total + part
    return total


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
        (sh, sw), (ph, pw) = self.stride, self.padding
        n, cout, (kh, kw) = x.shape[0], w.shape[0], w.shape[2:]
        fast = getattr(self.ops, "conv2d", None)
        if fast is not None:
            bias = self.inbound_nodes[2].value if len(self.inbound_nodes) == 3 else None
            self.value = fast(x, w, bias, self.stride, self.padding)
            return
        cols = im2col(xp, pad2d(xp, x, ph, pw, self.device.native), kh, kw, sh, sw, ho, wo)
        self.cols = xp.reshape(cols, (n, -1, ho * wo))           # (N, C_in kh kw, Ho Wo)
        out = xp.reshape(w, (cout, -1)) @ self.cols              # (N, C_out, Ho Wo)
        if len(self.inbound_nodes) == 3:
            out = out + xp.reshape(self.inbound_nodes[2].value, (1, cout, 1))
        self.value = xp.reshape(out, (n, cout, ho, wo))

    def backward(self) -> None:
        G = self.upstream_gradient()
        xp, X, Wn = self.xp, self.inbound_nodes[0], self.inbound_nodes[1]
        x, w = X.value, Wn.value
        need = self.needs_grad
        fast = getattr(self.ops, "conv2d_backward", None)
        if fast is not None:
            grads = fast(G, x, w, self.stride, self.padding, need)
            for node, grad, wanted in zip(self.inbound_nodes, grads, need):
                if wanted:
                    self.gradients[node] = grad
            return
        (sh, sw), (ph, pw) = self.stride, self.padding
        n, cout, ho, wo = G.shape
        kh, kw = w.shape[2:]
        G2 = xp.reshape(G, (n, cout, ho * wo))
        if need[0]:
            dcols = xp.matrix_transpose(xp.reshape(w, (cout, -1))) @ G2  # (N, C_in kh kw, L)
            dcols = xp.reshape(dcols, (n, x.shape[1], kh * kw, ho, wo))
            dpad = col2im(xp, dcols, kh, kw, sh, sw, x.shape[2] + 2 * ph, x.shape[3] + 2 * pw,
                          self.device.native)
            self.gradients[X] = _crop(dpad, ph, pw)
        if need[1]:
            dW = xp.tensordot(G2, self.cols, axes=([0, 2], [0, 2]))  # (C_out, C_in kh kw)
            self.gradients[Wn] = xp.reshape(dW, w.shape)
        if len(need) == 3 and need[2]:
            self.gradients[self.inbound_nodes[2]] = xp.sum(G, axis=(0, 2, 3))


class _Pool2D(Node):
    """Shared by the poolings: window size, stride (default: the size), shape checks."""

    def __init__(self, x: Node, size: Any = 2, *, stride: Any = None, name: str | None = None):
        Node.__init__(self, [x], name=name)
        self.size = _pair(size, "size", self.label, minimum=1)
        self.stride = self.size if stride is None else _pair(stride, "stride", self.label,
                                                              minimum=1)

    def _windows(self, x: Any) -> Any:
        """x's pooling windows as (N, C, Ho, Wo, kh * kw): the reductions run over the last,
        contiguous axis."""
        _check_image(self, x)
        (kh, kw), (sh, sw) = self.size, self.stride
        if kh > x.shape[2] or kw > x.shape[3]:
            raise GraphError(f"{self.label}: window {kh}x{kw} is larger than the input "
                             f"{x.shape[2]}x{x.shape[3]} (x {tuple(x.shape)}).\nhelp: use a "
                             "smaller window, or fewer pooling layers before this one.")
        ho, wo = _out_size(x.shape[2], kh, sh, 0), _out_size(x.shape[3], kw, sw, 0)
        return im2col(self.xp, x, kh, kw, sh, sw, ho, wo, axis=-1)

    def _unwindows(self, dwin: Any) -> Any:
        """The gradient for x from the gradient for each window entry (N, C, Ho, Wo, kh * kw)."""
        x = self.inbound_nodes[0].value
        (kh, kw), (sh, sw) = self.size, self.stride
        dwin = self.xp.permute_dims(dwin, (0, 1, 4, 2, 3))
        return col2im(self.xp, dwin, kh, kw, sh, sw, x.shape[2], x.shape[3], self.device.native)


class MaxPool2D(_Pool2D):
    """Maximum over size x size windows (stride: the size by default), as torch's max_pool2d;
    the gradient goes to each window's maximum, the first one on ties."""

    def forward(self) -> None:
        self.windows = self._windows(self.inbound_nodes[0].value)
        self.value = self.xp.max(self.windows, axis=-1)

    def backward(self) -> None:
        G = self.upstream_gradient()
        xp, win = self.xp, self.windows
        kk = win.shape[-1]
        first = xp.argmax(win, axis=-1)  # the first maximum, as PyTorch picks on ties
        entries = xp.arange(kk, dtype=first.dtype, device=self.device.native)
        mask = xp.astype(xp.expand_dims(first, axis=-1) == entries, G.dtype)
        self.gradients[self.inbound_nodes[0]] = self._unwindows(mask * xp.expand_dims(G, axis=-1))


class AvgPool2D(_Pool2D):
    """Mean over size x size windows (stride: the size by default), as torch's avg_pool2d."""

    def forward(self) -> None:
        windows = self._windows(self.inbound_nodes[0].value)
        self.value = self.xp.mean(windows, axis=-1)

    def backward(self) -> None:
        G = self.upstream_gradient()
        xp = self.xp
        kk = self.size[0] * self.size[1]
        share = xp.expand_dims(G / kk, axis=-1)
        dwin = xp.broadcast_to(share, (*G.shape, kk))
        self.gradients[self.inbound_nodes[0]] = self._unwindows(dwin)


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
