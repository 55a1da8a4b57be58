"""The losses: MSE and SoftmaxCrossEntropy, each a node that ends a graph (`is_loss`).

In float16 or bfloat16 a loss's sums are computed in float32 and only the mean is rounded to
the graph's dtype (`accumulation_dtype`): a float16 sum of 40,000 losses of 2.7 would be inf.
"""

from __future__ import annotations

from typing import Any

from ..errors import GraphError
from .core import Input, Node, accumulation_dtype
from .shapes import _device_range, _flush_subnormals


class MSE(Node):
    """Mean of (y - a)^2 over all elements; y and a are flattened to columns, as in MiniFlow:
    `self.diff` is y - a as a column (m, 1), `self.m` the number of elements. In float16 or
    bfloat16 the squares are summed in float32 and the mean rounded to that dtype."""

    is_loss = True

    def __init__(self, y: Node, a: Node, *, name: str | None = None):
        Node.__init__(self, [y, a], name=name)

    def forward(self) -> None:
        y, a = self.inbound_nodes
        xp, yv, av = self.xp, y.value, a.value
        if yv.ndim != 2 or yv.shape[1] != 1 or yv.shape != av.shape:
            # MiniFlow's columns (m, 1), so lesson code reading `diff` sees its shape; e.g.
            # y (n,) and a (n, 1) are compared as columns. Gradients keep the inputs' shapes.
            yv, av = xp.reshape(yv, (-1, 1)), xp.reshape(av, (-1, 1))
            if yv.shape[0] != av.shape[0]:
                raise GraphError(
                    f"{self.label}: y has shape {tuple(y.value.shape)} ({yv.shape[0]} values) "
                    f"but a has shape {tuple(a.value.shape)} ({av.shape[0]} values); they must "
                    f"have as many elements.\nhelp: check {y.label} and {a.label}.")
        self.diff = diff = self.ops.subtract(yv, av, out=self.buffers["diff", yv.shape, av.dtype])
        flat = xp.reshape(diff, (-1,))
        self.m = flat.shape[0]
        wide = accumulation_dtype(xp, flat.dtype)
        if wide is None:
            self.value = (flat @ flat) / self.m  # a new scalar each step: callers keep losses
        else:  # float16: the squares and their sum in float32, only the mean rounded
            flat = xp.astype(flat, wide)
            self.value = xp.astype((flat @ flat) / self.m, diff.dtype)

    def backward(self) -> None:
        g = self.upstream_gradient()
        y, a = self.inbound_nodes
        scale = (2.0 / self.m) * g
        ops, diff, need_y, need_a = self.ops, self.diff, *self.needs_grad
        if need_y:
            dy = ops.multiply(diff, scale, out=self.buffers["dy", diff.shape, diff.dtype])
            self.gradients[y] = self._shaped(dy, y.value)
        if need_a:
            da = ops.multiply(diff, -scale, out=self.buffers["da", diff.shape, diff.dtype])
            self.gradients[a] = self._shaped(da, a.value)

    def _shaped(self, grad: Any, like: Any) -> Any:
        return grad if grad.shape == like.shape else self.xp.reshape(grad, like.shape)


class SoftmaxCrossEntropy(Node):
    """Mean of -log softmax(logits)[label] over the counted positions, via log-sum-exp, as
    torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1),
    ignore_index=ignore_index).

    labels: integer class indices, shape (batch,) with logits (batch, classes), or any shape
    (N, T, ...) with logits (N, T, ..., classes) (a sequence's positions are rows). A label
    equal to `ignore_index` (-100, as PyTorch's) counts neither in the loss nor in the mean,
    and its row gets zero gradient; with every label ignored the mean is 0 / 0 = NaN, as in
    torch. In float16 or bfloat16 the sums are taken in float32 and the mean rounded to that
    dtype.
    """

    is_loss = True
    integer_inputs = (0,)

    def __init__(self, labels: Node, logits: Node, *, ignore_index: int = -100,
                 name: str | None = None):
        Node.__init__(self, [labels, logits], name=name)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise GraphError(f"{self.label}: ignore_index={ignore_index!r} must be an integer."
                             "\nhelp: the default -100 is PyTorch's.")
        self.ignore_index = ignore_index
        if isinstance(labels, Input):  # host feeds of this label may be ignore_index
            labels.expect_classes(ignore=ignore_index)
        self._class_range = None  # arange(classes) on the device, made once
        self._checked = None      # (classes, label dtype) the labels were last checked for
        self._count_cache: tuple = (None, None, None)  # (n, dtype, n as a device scalar)

    def release(self) -> None:
        """Also forget the labels' check (made again on the next device)."""
        self._class_range = self._checked = None
        self._count_cache = (None, None, None)
        Node.release(self)

    def forward(self) -> None:
        labels, logits = self.inbound_nodes
        xp = self.xp
        z, y = logits.value, labels.value
        if z.ndim < 2 or y.ndim != z.ndim - 1 or tuple(y.shape) != tuple(z.shape[:-1]):
            raise GraphError(
                f"{self.label}: labels have shape {tuple(y.shape)} and logits "
                f"{tuple(z.shape)}; expected labels (batch,) and logits (batch, classes), or "
                "labels (N, T) and logits (N, T, classes).\n"
                f"help: feed {labels.label} one integer class per row of {logits.label}.")
        if z.ndim > 2:  # every position a row
            z, y = xp.reshape(z, (-1, z.shape[-1])), xp.reshape(y, (-1,))
        n, k = z.shape
        if self._checked != (k, y.dtype):
            # First forward: check these labels here; later host labels are checked on feed.
            if not xp.isdtype(y.dtype, "integral"):
                raise GraphError(
                    f"{self.label}: labels have dtype {y.dtype}; expected integer class "
                    f"indices.\nhelp: feed {labels.label} an integer array "
                    "(e.g. y.astype('int64')).")
            self._checked = (k, y.dtype)
            if isinstance(labels, Input):  # later host labels are range-checked on feed
                labels.expect_classes(k)
            self._check_labels_on_device(y, k)
        if (self._class_range is None or self._class_range.shape[0] != k
                or self._class_range.dtype != y.dtype):
            self._class_range = xp.arange(k, dtype=y.dtype, device=self.device.native)
        ops, buffers, dtype = self.ops, self.buffers, z.dtype
        column = buffers["column", (n, 1), dtype]
        shifted = ops.subtract(z, ops.max(z, axis=1, keepdims=True, out=column),
                               out=buffers["shifted", (n, k), dtype])
        self.exp = ops.exp(shifted, out=buffers["exp", (n, k), dtype])
        self.total = ops.sum(self.exp, axis=1, keepdims=True, out=buffers["total", (n, 1), dtype])
        y = xp.reshape(y, (-1, 1))
        self.onehot = ops.equal(y, self._class_range, dtype, out=buffers["onehot", (n, k), dtype])
        self.n = n
        log_total = ops.log(self.total, out=column)
        wide = accumulation_dtype(xp, dtype)
        if getattr(labels, "ignore_absent", None) == self.ignore_index:
            # labels checked on the host to hold no ignore_index: every row counts, no mask
            # (the same numbers as the masked route, whose mask is then all ones)
            self.valid, self.count = None, self._row_count(n, dtype if wide is None else wide)
        else:
            # 1 for a counted row, 0 for an ignored one (whose one-hot row is 0 unless
            # ignore_index names a class)
            valid = ops.equal(y, self.ignore_index, dtype, out=buffers["valid", (n, 1), dtype])
            self.valid = valid = ops.subtract(1.0, valid, out=valid)
            if 0 <= self.ignore_index < k:
                self.onehot = ops.multiply(self.onehot, valid, out=self.onehot)
            log_total = ops.multiply(log_total, valid, out=column)
            self.count = xp.sum(valid) if wide is None else xp.sum(valid, dtype=wide)
        # -mean(log softmax[label]) = (sum of log-sum-exp - sum of the labels' logits) / count
        # over the counted rows, since each one-hot row sums to 1 (0 for an ignored row).
        picked = ops.multiply(self.onehot, shifted, out=shifted)  # shifted is not needed again
        if wide is None:  # new scalars each step
            self.value = (xp.sum(log_total) - xp.sum(picked)) / self.count
        else:  # float16: the sums in float32 (they overflow past 65504), the mean rounded to
            # the graph's dtype
            total = xp.sum(log_total, dtype=wide) - xp.sum(picked, dtype=wide)
            self.value = xp.astype(total / self.count, dtype)

    def _row_count(self, n: int, dtype: Any) -> Any:
        """n as a 0-d array of `dtype` on the device, made once per (n, dtype): the count the
        masked route sums, so that both routes divide by the same number."""
        if self._count_cache[:2] != (n, dtype):
            self._count_cache = (n, dtype, self.xp.asarray(n, dtype=dtype,
                                                           device=self.device.native))
        return self._count_cache[2]

    def _check_labels_on_device(self, y: Any, k: int) -> None:
        xp = self.xp
        y = xp.where(y == self.ignore_index, xp.zeros_like(y), y)  # ignored labels are fine
        lo, hi = _device_range(self, y, "label check")  # once, at the first step
        if lo < 0 or hi >= k:
            raise GraphError(f"{self.label}: labels range from {lo:g} to {hi:g}, but the logits "
                             f"have {k} classes (0 .. {k - 1}) (labels equal to ignore_index "
                             f"{self.ignore_index} are skipped).\nhelp: check the labels, or "
                             "the number of outputs of the last layer.")

    def backward(self) -> None:
        g = self.upstream_gradient()
        labels, logits = self.inbound_nodes
        if self.needs_grad[1]:
            xp, exp, valid = self.xp, self.exp, self.valid
            grad = self.ops.divide(exp, self.total,   # softmax
                                   out=self.buffers["grad", exp.shape, exp.dtype])
            grad -= self.onehot
            if valid is None:  # every row counted (n >= 1: an empty batch is refused)
                grad *= xp.astype(g / self.count, exp.dtype, copy=False)
            else:
                # g / count on the counted rows, 0 on the ignored ones (and everywhere when
                # every label is ignored, as in torch: the count taken as 1 then)
                count = xp.maximum(self.count, 1)  # the count is a whole number >= 0
                grad *= self.ops.multiply(valid, xp.astype(g / count, exp.dtype, copy=False),
                                          out=self.buffers["scale", valid.shape, valid.dtype])
            # softmax / count is subnormal for a logit ~88 below its row's max (float32)
            grad = _flush_subnormals(self, grad, "flush")
            shape = logits.value.shape
            self.gradients[logits] = grad if grad.ndim == len(shape) else xp.reshape(grad, shape)
