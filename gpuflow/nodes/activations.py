"""The activation nodes: Sigmoid, Tanh and ReLU of the MiniFlow lessons, and Softmax; each
elementwise (Softmax over the last axis), its `backward` mirroring its `forward` (see nodes/core.py
for what a node reads and writes)."""

from __future__ import annotations

from .core import Node


class Sigmoid(Node):
    """The logistic function, accurate to a few ulp at every x, with no overflow:
    exp(min(x, 0)) / (1 + exp(-|x|)), i.e. 1 / (1 + exp(-x)) for x >= 0 and e / (1 + e) with
    e = exp(x) for x < 0 (no exp of a positive number, no cancellation in either tail)."""

    def __init__(self, node: Node, *, name: str | None = None):
        Node.__init__(self, [node], name=name)
        self._constants: tuple = (None,)  # (dtype, -1, 0, 1) on the device, made once

    def forward(self) -> None:
        x = self.inbound_nodes[0].value
        ops, buffers, shape, dtype = self.ops, self.buffers, x.shape, x.dtype
        if self._constants[0] is not dtype:  # -1, 0, 1 as 0-d arrays: NumPy takes them ~2x
            self._constants = (dtype, *(self.xp.asarray(c, dtype=dtype, device=self.device.native)
                                        for c in (-1.0, 0.0, 1.0)))  # faster than floats
        _, minus_one, zero, one = self._constants
        d, v, w = buffers["denom", shape, dtype], buffers["value", shape, dtype], \
            buffers["exp", shape, dtype]  # None where arrays are not kept
        # Negations by multiply, not x - 2 max(x, 0): that is inf - inf = NaN at x = +inf.
        e = ops.maximum(ops.multiply(x, minus_one, out=d), x, out=w)    # |x|
        e = ops.exp(ops.multiply(e, minus_one, out=w), out=w)           # exp(-|x|) <= 1
        # exp(min(x, 0)) is 1 for x > 0 and e for x <= 0: max(e, [x > 0]) (at 0 both are 1)
        s = ops.maximum(ops.greater(x, zero, dtype, out=v), e, out=v)
        self.exp = e
        self.denom = ops.add(e, one, out=d)                             # 1 + exp(-|x|)
        self.value = ops.divide(s, self.denom, out=v)

    def backward(self) -> None:
        G = self.upstream_gradient()
        # s (1 - s) = e / (1 + e)^2 for both signs of x: exact in both tails, where 1 - s
        # would round to 0 for large x.
        e, denom = self.exp, self.denom
        out = self.buffers["grad", e.shape, e.dtype]
        grad = self.ops.divide(self.ops.divide(e, denom, out=out), denom, out=out)
        grad *= G
        self.gradients[self.inbound_nodes[0]] = grad


class Tanh(Node):
    """Hyperbolic tangent."""

    def __init__(self, node: Node, *, name: str | None = None):
        Node.__init__(self, [node], name=name)

    def forward(self) -> None:
        x = self.inbound_nodes[0].value
        self.value = self.ops.tanh(x, out=self.buffers["value", x.shape, x.dtype])

    def backward(self) -> None:
        G = self.upstream_gradient()
        t, ops = self.value, self.ops
        out = self.buffers["grad", t.shape, t.dtype]
        grad = ops.subtract(1.0, ops.multiply(t, t, out=out), out=out)   # (1 - t^2) G
        grad *= G
        self.gradients[self.inbound_nodes[0]] = grad


class ReLU(Node):
    """max(x, 0)."""

    def __init__(self, node: Node, *, name: str | None = None):
        Node.__init__(self, [node], name=name)

    def forward(self) -> None:
        # maximum, not clip: array-api-compat's clip for CuPy masks, and so synchronises.
        x = self.inbound_nodes[0].value
        self.value = self.ops.maximum(x, 0.0, out=self.buffers["value", x.shape, x.dtype])

    def backward(self) -> None:
        G = self.upstream_gradient()
        # G where the output is positive, else 0, as (output > 0) * G: eight times faster than
        # where(output > 0, G, 0.0) on NumPy, three times on torch.
        value = self.value
        grad = self.ops.greater(value, 0.0, G.dtype,
                                out=self.buffers["grad", value.shape, G.dtype])
        grad *= G
        self.gradients[self.inbound_nodes[0]] = grad


class Softmax(Node):
    """Probabilities over the last dimension: exp(x - max) / sum(exp(x - max))."""

    def __init__(self, x: Node, *, name: str | None = None):
        Node.__init__(self, [x], name=name)

    def forward(self) -> None:
        xp, x = self.xp, self.inbound_nodes[0].value
        e = xp.exp(x - xp.max(x, axis=-1, keepdims=True))
        self.value = e / xp.sum(e, axis=-1, keepdims=True)

    def backward(self) -> None:
        G = self.upstream_gradient()
        xp, s = self.xp, self.value
        self.gradients[self.inbound_nodes[0]] = s * (G - xp.sum(G * s, axis=-1, keepdims=True))
