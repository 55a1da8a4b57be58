"""Recurrent layers over whole sequences, layouts and numbers as PyTorch's: LSTM.

The time loop runs inside the node, forward and backward (backpropagation through time), so a
graph holds one node per layer, not one per step.
"""

from __future__ import annotations

from typing import Any

from ..errors import GraphError
from .core import Node
from .sequence import _send, _shape, _sigmoid


def _stack_steps(node: Node, steps: list, name: str) -> Any:
    """xp.stack(steps, axis=1) ((N, ...) each, one per time step), into the node's buffer
    `name` where the library writes there."""
    stack = node.ops.stack
    if stack is None:
        return node.xp.stack(steps, axis=1)
    first = steps[0]
    shape = (first.shape[0], len(steps)) + tuple(first.shape[1:])
    return stack(steps, axis=1, out=node.buffers[name, shape, first.dtype])


class LSTM(Node):
    """One LSTM layer over a whole sequence, as torch.nn.LSTM(batch_first=True) with one layer
    and a zero initial state: x (N, T, input), W_ih (4H, input), W_hh (4H, H), b_ih and b_hh
    (4H,), the gates stacked i, f, g, o as PyTorch's, give the hidden states (N, T, H):

        i, f, o = sigmoid(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)  (their rows of W, b)
        g = tanh(...);  c_t = f c_{t-1} + i g;  h_t = o tanh(c_t);  h_0 = c_0 = 0

    The input projection of every step is one matrix product before the time loop; the
    backward runs backpropagation through time inside the node (one (N, 4H) @ (4H, H) product
    a step), then W_ih's, W_hh's and x's gradients as one product each.
    """

    def __init__(self, x: Node, W_ih: Node, W_hh: Node, b_ih: Node, b_hh: Node, *,
                 name: str | None = None):
        Node.__init__(self, [x, W_ih, W_hh, b_ih, b_hh], name=name)

    def _check(self, x: Any, w_ih: Any, w_hh: Any, b_ih: Any, b_hh: Any) -> int:
        """The hidden size H; GraphError naming the inputs if the shapes do not fit."""
        X, W_ih, W_hh, B_ih, B_hh = self.inbound_nodes
        rows = w_hh.shape[0] if w_hh.ndim == 2 else 0
        H = rows // 4
        if (w_hh.ndim != 2 or rows != 4 * H or H < 1 or _shape(w_hh) != (4 * H, H)
                or x.ndim != 3 or x.shape[1] < 1 or w_ih.ndim != 2
                or _shape(w_ih) != (4 * H, x.shape[-1])
                or _shape(b_ih) != (4 * H,) or _shape(b_hh) != (4 * H,)):
            raise GraphError(
                f"{self.label}: x {_shape(x)}, W_ih {_shape(w_ih)}, W_hh {_shape(w_hh)}, b_ih "
                f"{_shape(b_ih)}, b_hh {_shape(b_hh)}; expected x (N, T, input) with T >= 1, "
                "W_ih (4H, input), W_hh (4H, H), b_ih and b_hh (4H,), the gates stacked i, f, "
                f"g, o as torch.nn.LSTM's.\nhelp: check {X.label}, {W_ih.label}, {W_hh.label}, "
                f"{B_ih.label} and {B_hh.label} (gf.lstm builds them for a hidden size H).")
        return H

    def forward(self) -> None:
        x, w_ih, w_hh, b_ih, b_hh = (n.value for n in self.inbound_nodes)
        H = self._check(x, w_ih, w_hh, b_ih, b_hh)
        xp, ops, buffers = self.xp, self.ops, self.buffers
        N, T, n_in = x.shape
        dtype = x.dtype
        xw = ops.matmul(xp.reshape(x, (N * T, n_in)), xp.matrix_transpose(w_ih),
                        out=buffers["xw", (N * T, 4 * H), dtype])
        xw += b_ih + b_hh
        xw = xp.reshape(xw, (N, T, 4 * H))
        self.gates: list[tuple[Any, ...]] = []  # per step: i, f, g, o, 1 - i, 1 - f, 1 - o
        self.cells: list[Any] = []              # c_t and tanh(c_t) per step
        hs, c = [], None
        for t in range(T):
            z = xw[:, t, :]
            if t:
                z = z + hs[-1] @ xp.matrix_transpose(w_hh)
            s, s1 = _sigmoid(xp, z)
            i, f, o = s[:, :H], s[:, H:2 * H], s[:, 3 * H:]
            g = xp.tanh(z[:, 2 * H:3 * H])
            c = i * g if c is None else f * c + i * g
            tc = xp.tanh(c)
            hs.append(o * tc)
            self.gates.append((i, f, g, o, s1[:, :H], s1[:, H:2 * H], s1[:, 3 * H:]))
            self.cells.append((c, tc))
        self.value = _stack_steps(self, hs, "value")

    def backward(self) -> None:
        G = self.upstream_gradient()
        X, W_ih, W_hh, B_ih, B_hh = self.inbound_nodes
        xp, ops, buffers = self.xp, self.ops, self.buffers
        x, w_ih, w_hh, h = X.value, W_ih.value, W_hh.value, self.value
        N, T, n_in = x.shape
        H, dtype = h.shape[-1], G.dtype
        dz: list[Any] = [None] * T  # the gates' pre-activation gradients, (N, 4H) per step
        dh = dc = None              # from step t + 1 into step t
        for t in reversed(range(T)):
            i, f, g, o, i1, f1, o1 = self.gates[t]
            c, tc = self.cells[t]
            dh = G[:, t, :] if dh is None else G[:, t, :] + dh
            dct = dh * o * (1.0 - tc * tc)
            dc = dct if dc is None else dc + dct
            df = dc * self.cells[t - 1][0] * f * f1 if t else xp.zeros_like(dc)
            dz[t] = xp.concat([dc * g * i * i1, df, dc * i * (1.0 - g * g), dh * tc * o * o1],
                              axis=-1)
            if t:
                dh = dz[t] @ w_hh
                dc = dc * f
        dZ = _stack_steps(self, dz, "dz")
        flat = xp.reshape(dZ, (N * T, 4 * H))
        need_x, need_ih, need_hh, need_bih, need_bhh = self.needs_grad
        dx = dw_ih = dw_hh = db = None
        if need_x:
            dx = xp.reshape(ops.matmul(flat, w_ih, out=buffers["dx", (N * T, n_in), dtype]),
                            (N, T, n_in))
        if need_ih:
            dw_ih = ops.matmul(xp.matrix_transpose(flat), xp.reshape(x, (N * T, n_in)),
                               out=buffers["dW_ih", (4 * H, n_in), dtype])
        if need_hh:  # step t's gates against h_{t-1}: steps 1 .. T-1 (h_0 = 0)
            later = xp.reshape(dZ[:, 1:, :], (N * (T - 1), 4 * H))
            earlier = xp.reshape(h[:, :-1, :], (N * (T - 1), H))
            dw_hh = ops.matmul(xp.matrix_transpose(later), earlier,
                               out=buffers["dW_hh", (4 * H, H), dtype])
        if need_bih or need_bhh:
            db = ops.sum(flat, axis=0, out=buffers["db", (4 * H,), dtype])
        _send(self, (dx, dw_ih, dw_hh, db, db))
