"""ScaledDotProductAttention, as torch.nn.functional.scaled_dot_product_attention (a sequence
node: gpuflow/nodes/sequence.py re-exports it)."""

from __future__ import annotations

import math
from typing import Any

from ..errors import GraphError
from .core import Node
from .shapes import _broadcast, _flush_subnormals, _send, _shape, _unbroadcast


class ScaledDotProductAttention(Node):
    """softmax(q k^T / sqrt(d)) v, as torch.nn.functional.scaled_dot_product_attention.

    q (N, H, T_q, d), k (N, H, T_k, d), v (N, H, T_k, d_v) (any leading dimensions that
    broadcast) give (N, H, T_q, d_v). causal: position i attends to j <= i (torch's
    is_causal, aligned at the top left when T_q != T_k). mask: a boolean array broadcasting to
    (T_q, T_k) or (N, H, T_q, T_k), True where attention is allowed, False where blocked (not
    with causal). A row with every position blocked gives 0, as torch does. The softmax
    subtracts each row's maximum (no overflow); the backward runs inside the node. Where the
    device's ops have `softmax` / `softmax_backward` (torch), those kernels run, without a
    mask (causal or none: no row is blocked everywhere).
    """

    def __init__(self, q: Node, k: Node, v: Node, *, causal: bool = False, mask: Any = None,
                 name: str | None = None):
        Node.__init__(self, [q, k, v], name=name)
        if not isinstance(causal, bool):
            raise GraphError(f"{self.label}: causal={causal!r} must be True or False.\nhelp: "
                             "causal=True for a decoder's self-attention.")
        if causal and mask is not None:
            raise GraphError(f"{self.label}: pass causal=True or a mask, not both (as torch).\n"
                             "help: fold the causal pattern into the mask (True where "
                             "allowed).")
        if mask is not None and not hasattr(mask, "shape"):  # a list: a NumPy array
            from ..backends.numpy import host_array
            try:
                mask = host_array(mask, f"{self.label} mask")
            except GraphError as exc:
                raise GraphError(str(exc)) from None
        if mask is not None and getattr(mask.dtype, "kind", "b") != "b":
            raise GraphError(f"{self.label}: mask has dtype {mask.dtype}; expected a boolean "
                             "array (True where attention is allowed).\nhelp: pass mask != 0, "
                             "or a boolean array.")
        self.causal, self.mask = causal, mask
        self._keep: Any = None  # (key, the mask on the device)
        self._bias: Any = None  # (key, 0 / -inf where allowed / blocked, the mask)

    def _allowed(self, scores_shape: tuple[int, ...]) -> Any:
        """The boolean (…, T_q, T_k) array of allowed positions on the device, or None."""
        if not self.causal and self.mask is None:
            return None
        tq, tk = scores_shape[-2:]
        key = (self.device, tq, tk) if self.causal else (self.device,)
        if self._keep is None or self._keep[0] != key:
            xp, native = self.xp, self.device.native
            if self.causal:
                rows = xp.reshape(xp.arange(tq, device=native), (-1, 1))
                keep = rows >= xp.arange(tk, device=native)
            else:
                keep = self.device.put(self.mask, what=f"{self.label} mask")
                if not xp.isdtype(keep.dtype, "bool"):
                    raise GraphError(f"{self.label}: mask has dtype {keep.dtype}; expected a "
                                     "boolean array (True where attention is allowed).\nhelp: "
                                     "pass mask != 0, or a boolean array.")
            self._keep = (key, keep)
        keep = self._keep[1]
        if keep.ndim > len(scores_shape) or any(
                m not in (1, s) for m, s in zip(_shape(keep)[::-1], scores_shape[::-1])):
            raise GraphError(f"{self.label}: mask has shape {_shape(keep)}, which does not "
                             f"broadcast to the attention scores {scores_shape} (N, H, T_q, "
                             f"T_k).\nhelp: pass a ({tq}, {tk}) boolean mask, or one that "
                             "broadcasts to the scores.")
        return keep

    def forward(self) -> None:
        q, k, v = (n.value for n in self.inbound_nodes)
        xp = self.xp
        if (min(q.ndim, k.ndim, v.ndim) < 2 or q.shape[-1] != k.shape[-1]
                or k.shape[-2] != v.shape[-2]):
            raise GraphError(f"{self.label}: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}; "
                             "expected q (N, H, T_q, d), k (N, H, T_k, d), v (N, H, T_k, d_v)."
                             "\nhelp: split the heads with Reshape and Transpose first.")
        batch = _broadcast(self, _shape(q)[:-2], _shape(k)[:-2], _shape(v)[:-2],
                           what="the leading dimensions of q, k and v")
        self.scale = 1.0 / math.sqrt(q.shape[-1])
        ops, buffers, dtype = self.ops, self.buffers, q.dtype
        shape = batch + (q.shape[-2], k.shape[-2])
        scores = ops.matmul(q, xp.matrix_transpose(k), out=buffers["p", shape, dtype])
        scores = ops.multiply(scores, self.scale, out=scores)
        allowed = self._allowed(shape)
        if allowed is not None:  # where(allowed, scores, -inf), as scores + (0 or -inf)
            scores = ops.add(scores, self._blocking(allowed, dtype), out=scores)
        if ops.softmax is not None and self.mask is None:  # the library's softmax kernel (no
            # row is blocked everywhere, where it would give NaN, not 0)
            p = ops.softmax(scores, out=buffers["p_fused", shape, dtype])
            self.p = _flush_subnormals(self, p, "flush")
            self.value = ops.matmul(self.p, v, out=buffers["value", shape[:-1] + v.shape[-1:],
                                                           dtype])
            return
        top = ops.max(scores, axis=-1, keepdims=True, out=buffers["top", shape[:-1] + (1,),
                                                                  dtype])
        if allowed is not None:  # a row blocked everywhere: top -inf taken as the lowest
            top = ops.maximum(top, float(xp.finfo(dtype).min), out=top)  # number: exp(-inf) = 0
        e = ops.exp(ops.subtract(scores, top, out=scores), out=scores)
        total = ops.sum(e, axis=-1, keepdims=True, out=top)
        if allowed is not None:  # every row that is not blocked everywhere sums to >= 1
            total = ops.maximum(total, 1.0, out=total)
        self.p = _flush_subnormals(self, ops.divide(e, total, out=e), "flush")  # 88 below the max
        self.value = ops.matmul(self.p, v, out=buffers["value", shape[:-1] + v.shape[-1:],
                                                       dtype])

    def _blocking(self, allowed: Any, dtype: Any) -> Any:
        """0 where `allowed`, -inf where not, in `dtype` (made once per mask and dtype)."""
        key = (id(allowed), dtype)
        if self._bias is None or self._bias[0] != key:
            xp = self.xp
            zero = xp.zeros(allowed.shape, dtype=dtype, device=self.device.native)
            self._bias = (key, xp.where(allowed, zero, -math.inf), allowed)
        return self._bias[1]

    def backward(self) -> None:
        G = self.upstream_gradient()
        xp, ops, buffers, p = self.xp, self.ops, self.buffers, self.p
        q, k, v = (n.value for n in self.inbound_nodes)
        need_q, need_k, need_v = self.needs_grad
        batch, dtype = _shape(p)[:-2], G.dtype
        dv = dq = dk = None
        if need_v:
            dv = ops.matmul(xp.matrix_transpose(p), G,
                            out=buffers["dv", batch + _shape(v)[-2:], dtype])
            dv = _unbroadcast(self, dv, _shape(v), "dv_sum")
        if need_q or need_k:
            dp = ops.matmul(G, xp.matrix_transpose(v), out=buffers["ds", _shape(p), dtype])
            # softmax': ds = p (dp - sum(dp p)) scale
            if ops.softmax_backward is not None and self.mask is None:
                ds = ops.softmax_backward(dp, p, out=buffers["work", _shape(p), dtype])
            else:
                rows = ops.sum(ops.multiply(dp, p, out=buffers["work", _shape(p), dtype]),
                               axis=-1, keepdims=True,
                               out=buffers["rows", batch + (p.shape[-2], 1), dtype])
                ds = ops.multiply(p, ops.subtract(dp, rows, out=dp), out=dp)
            ds = _flush_subnormals(self, ops.multiply(ds, self.scale, out=ds), "flush")
            if need_q:
                dq = ops.matmul(ds, k, out=buffers["dq", batch + _shape(q)[-2:], dtype])
                dq = _unbroadcast(self, dq, _shape(q), "dq_sum")
            if need_k:
                dk = ops.matmul(xp.matrix_transpose(ds), q,
                                out=buffers["dk", batch + _shape(k)[-2:], dtype])
                dk = _unbroadcast(self, dk, _shape(k), "dk_sum")
        _send(self, (dq, dk, dv))

