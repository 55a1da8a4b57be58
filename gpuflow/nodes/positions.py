"""Learned position embeddings: the first T rows of a table, T the length of the sequence fed
(nanoGPT's `wpe(arange(T))`), so one graph runs any length up to the table's."""

from __future__ import annotations

from ..errors import GraphError
from .core import Node
from .shapes import _between_zeros


class Positions(Node):
    """W[:T] for ids (..., T) and a table W (context, dim): (T, dim), added to the token
    embeddings (N, T, dim) by broadcasting. Ids give only their length (no gradient); W's
    gradient is the upstream gradient in its first T rows, zero below. A T larger than the
    table is a GraphError naming both."""

    integer_inputs = (0,)

    def __init__(self, ids: Node, W: Node, *, name: str | None = None):
        Node.__init__(self, [ids, W], name=name)

    def forward(self) -> None:
        ids, W = self.inbound_nodes
        t, w = ids.value.shape[-1] if ids.value.ndim else 0, W.value
        if w.ndim != 2 or not 1 <= t <= w.shape[0]:
            raise GraphError(f"{self.label}: {ids.label} has shape {tuple(ids.value.shape)} "
                             f"({t} positions) but the position table {W.label} has shape "
                             f"{tuple(w.shape)}: room for {w.shape[0] if w.ndim else 0} "
                             "positions.\nhelp: feed at most that many tokens a row (crop the "
                             "context to its last ones), or build the model with a longer "
                             "context.")
        self.value = w[:t, ...]

    def backward(self) -> None:
        G = self.upstream_gradient()
        if self.needs_grad[1]:
            xp, w = self.xp, self.inbound_nodes[1].value
            rest = w.shape[0] - G.shape[0]
            out = self.buffers["grad", tuple(w.shape), G.dtype] if rest else None
            if out is not None:  # G over zeros, in a kept array
                grad = _between_zeros(self.ops, G, out, 0, 0, G.shape[0])
            else:
                grad = G if not rest else xp.concat([G, xp.zeros(
                    (rest, w.shape[1]), dtype=G.dtype, device=self.device.native)])
            self.gradients[self.inbound_nodes[1]] = grad
