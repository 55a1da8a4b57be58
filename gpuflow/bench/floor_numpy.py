"""The floor for NumPy devices ('cpu'): the step hand-written in NumPy, in place, into buffers
allocated once, `out=` everywhere. `NdarrayFloor` takes the library as `xp`, so CuPy's floor is
the same class (floor_cupy.py)."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from gpuflow.backends import Device, special

from .variants import Variant
from .workloads import LEARNING_RATE, AnyWorkload, ConvWorkload, GPTWorkload, Workload


def softmax_ce(xp: Any, out: Any, y: Any, rows: Any, col: Any, col2: Any) -> Any:
    """Mean softmax cross-entropy of logits `out` (n, classes) for labels y, returned; `out`
    becomes d loss / d logits in place. rows: arange(n); col, col2: (n, 1) buffers."""
    n = out.shape[0]
    xp.max(out, axis=1, keepdims=True, out=col)
    out -= col                                # shifted logits
    picked = out[rows, y]
    xp.exp(out, out=out)
    xp.sum(out, axis=1, keepdims=True, out=col)
    xp.log(col, out=col2)
    loss = (col2.sum() - picked.sum()) / n
    out /= col                                # softmax
    out[rows, y] -= 1.0
    out *= 1.0 / n                            # d loss / d logits
    return loss


class NdarrayFloor(Variant):
    """(c) for NumPy and CuPy: in place, preallocated buffers, out= everywhere."""

    def __init__(self, w: Workload, xp: Any, dtype: str, weights: Sequence[np.ndarray],
                 data: tuple[np.ndarray, np.ndarray], sync: Callable[[], None] | None = None,
                 upload: Callable[[np.ndarray], Any] | None = None) -> None:
        dt, put = self._setup(w, xp, dtype, sync, upload)
        self.W = [put(a) for a in weights[0::2]]
        self.b = [put(a) for a in weights[1::2]]
        self.dW = [xp.empty_like(a) for a in self.W]
        self.db = [xp.empty_like(a) for a in self.b]
        n = w.batch
        self.z = [xp.empty((n, s), dtype=dt) for s in w.sizes[1:]]   # pre-activation = h
        self.g = [xp.empty((n, s), dtype=dt) for s in w.sizes[1:-1]]  # hidden gradients
        self.tmp = [xp.empty((n, s), dtype=dt) for s in w.sizes[1:-1]]
        self.e = [xp.empty((n, s), dtype=dt) for s in w.sizes[1:-1]]  # sigmoid: exp(-|z|)
        self.d = [xp.empty((n, s), dtype=dt) for s in w.sizes[1:-1]]  # sigmoid: 1 + exp(-|z|)
        self.mask = [xp.empty((n, s), dtype=bool) for s in w.sizes[1:-1]]
        self.col = xp.empty((n, 1), dtype=dt)
        self.col2 = xp.empty((n, 1), dtype=dt)
        self.rows = xp.arange(n)
        self.xh, self.yh = data

    def _setup(self, w: Any, xp: Any, dtype: str, sync: Callable[[], None] | None,
               upload: Callable[[np.ndarray], Any] | None) -> tuple[Any, Callable[[Any], Any]]:
        """The fields every ndarray floor has; returns (dtype, host array -> xp array)."""
        self.xp, self.w, self._sync = xp, w, sync
        self.upload = upload or (lambda a: a)
        dt = np.dtype(dtype)
        return dt, lambda a: xp.asarray(np.ascontiguousarray(a, dtype=dt))

    def step(self) -> Any:
        xp, z = self.xp, self.z
        x, y = self.upload(self.xh), self.upload(self.yh)
        last = len(self.W) - 1
        h = x
        for i, (W, b) in enumerate(zip(self.W, self.b)):
            xp.matmul(h, W, out=z[i])
            z[i] += b
            if i < last:
                if self.w.activation == "relu":
                    xp.maximum(z[i], 0, out=z[i])
                else:  # sigmoid as gpuflow's node: exp(min(z, 0)) / (1 + exp(-|z|))
                    e, d = self.e[i], self.d[i]
                    xp.abs(z[i], out=e)
                    xp.negative(e, out=e)
                    xp.exp(e, out=e)
                    xp.add(e, 1.0, out=d)
                    xp.greater(z[i], 0, out=z[i])
                    xp.maximum(z[i], e, out=z[i])
                    xp.divide(z[i], d, out=z[i])
            h = z[i]
        out = z[last]
        if self.w.loss == "mse":
            m = out.size
            d = self.col
            xp.subtract(y, out, out=d)
            flat = d.ravel()
            loss = xp.dot(flat, flat) / m
            xp.multiply(d, -2.0 / m, out=out)   # d loss / d out
        else:
            loss = softmax_ce(xp, out, y, self.rows, self.col, self.col2)
        G = out
        for i in range(last, -1, -1):
            inp = x if i == 0 else z[i - 1]
            xp.matmul(inp.T, G, out=self.dW[i])
            xp.sum(G, axis=0, out=self.db[i])
            if i > 0:
                g = self.g[i - 1]
                xp.matmul(G, self.W[i].T, out=g)
                s = z[i - 1]
                if self.w.activation == "relu":
                    xp.greater(s, 0, out=self.mask[i - 1])
                    g *= self.mask[i - 1]
                else:  # s (1 - s) = e / (1 + e)^2, as gpuflow's node
                    t = self.tmp[i - 1]
                    xp.divide(self.e[i - 1], self.d[i - 1], out=t)
                    t /= self.d[i - 1]
                    g *= t
                G = g
        for p, dp in zip(self.W + self.b, self.dW + self.db):
            dp *= LEARNING_RATE
            p -= dp
        return loss

    def read(self, loss: Any) -> float:
        return float(loss)

    def sync(self) -> None:
        if self._sync is not None:
            self._sync()


class _Conv:
    """Convolution (stride 1, zero padding) + ReLU on activations laid out (C, N, H, W), so that
    im2col's columns (C kh kw, N Ho Wo) make each pass one GEMM whose result is already in that
    layout. im2col and col2im are kh * kw strided slice copies into buffers kept across steps."""

    def __init__(self, xp: Any, dt: Any, W: Any, b: Any, n: int, shape_in: tuple[int, ...],
                 padding: int, first: bool) -> None:
        c, h, w = shape_in
        o, _, k, _ = W.shape
        self.xp, self.k, self.p, self.first = xp, k, padding, first
        self.h, self.w = h, w
        self.oh, self.ow = h + 2 * padding - k + 1, w + 2 * padding - k + 1
        self.W2, self.b2 = W.reshape(o, c * k * k), b.reshape(o, 1)   # views of the weights
        self.dW, self.db = xp.empty_like(self.W2), xp.empty_like(self.b2)
        hp, wp = h + 2 * padding, w + 2 * padding
        self.xpad = xp.zeros((c, n, hp, wp), dtype=dt) if padding else None  # borders stay 0
        self.cols = xp.empty((c, k, k, n, self.oh, self.ow), dtype=dt)
        self.cols2 = self.cols.reshape(c * k * k, n * self.oh * self.ow)
        self.out = xp.empty((o, n * self.oh * self.ow), dtype=dt)
        self.mask = xp.empty(self.out.shape, dtype=bool)
        self.shape_out = (o, n, self.oh, self.ow)
        if not first:  # the data's gradient is never needed
            self.dcols = xp.empty_like(self.cols2)
            self.dxpad = xp.empty((c, n, hp, wp), dtype=dt)

    def forward(self, x: Any) -> Any:
        """x (C, N, H, W) (any strides) -> ReLU(conv) (O, N, Ho, Wo)."""
        xp, k, p, oh, ow = self.xp, self.k, self.p, self.oh, self.ow
        src = x
        if p:
            self.xpad[:, :, p:p + self.h, p:p + self.w] = x
            src = self.xpad
        for i in range(k):
            for j in range(k):
                self.cols[:, i, j] = src[:, :, i:i + oh, j:j + ow]
        xp.matmul(self.W2, self.cols2, out=self.out)
        self.out += self.b2
        xp.maximum(self.out, 0, out=self.out)
        return self.out.reshape(self.shape_out)

    def backward(self, G: Any) -> Any:
        """G (O, N, Ho, Wo), the gradient of the ReLU's output (scaled in place) -> the input's
        gradient (C, N, H, W) (None for the first layer); fills dW, db."""
        xp, k, p, oh, ow = self.xp, self.k, self.p, self.oh, self.ow
        G2 = G.reshape(self.out.shape)
        xp.greater(self.out, 0, out=self.mask)
        G2 *= self.mask
        xp.matmul(G2, self.cols2.T, out=self.dW)
        xp.sum(G2, axis=1, keepdims=True, out=self.db)
        if self.first:
            return None
        xp.matmul(self.W2.T, G2, out=self.dcols)
        dcols = self.dcols.reshape(self.cols.shape)
        self.dxpad.fill(0)
        for i in range(k):
            for j in range(k):
                self.dxpad[:, :, i:i + oh, j:j + ow] += dcols[:, i, j]
        return self.dxpad[:, :, p:p + self.h, p:p + self.w]


class _MaxPool:
    """2x2 max pooling, stride 2, on (C, N, H, W): the maximum of four strided views; the
    gradient goes to the first maximum of each window (row-major, as PyTorch)."""

    def __init__(self, xp: Any, dt: Any, n: int, shape_in: tuple[int, ...]) -> None:
        c, h, w = shape_in
        if h % 2 or w % 2:
            raise ValueError(f"the bench's pooling floor needs even sizes, got {h}x{w}")
        self.xp = xp
        self.out = xp.empty((c, n, h // 2, w // 2), dtype=dt)
        self.eq = xp.empty(self.out.shape, dtype=bool)
        self.taken = xp.empty(self.out.shape, dtype=bool)
        self.dx = xp.empty((c, n, h, w), dtype=dt)

    def forward(self, x: Any) -> Any:
        xp, out = self.xp, self.out
        self.views = [x[:, :, a::2, b::2] for a in (0, 1) for b in (0, 1)]
        xp.maximum(self.views[0], self.views[1], out=out)
        xp.maximum(out, self.views[2], out=out)
        xp.maximum(out, self.views[3], out=out)
        return out

    def backward(self, G: Any) -> Any:
        xp, eq, taken = self.xp, self.eq, self.taken
        taken.fill(False)
        for (a, b), v in zip(((0, 0), (0, 1), (1, 0), (1, 1)), self.views):
            xp.equal(v, self.out, out=eq)
            xp.greater(eq, taken, out=eq)        # a maximum not taken by an earlier entry
            xp.multiply(G, eq, out=self.dx[:, :, a::2, b::2])
            xp.logical_or(taken, eq, out=taken)
        return self.dx


class ConvNdarrayFloor(NdarrayFloor):
    """(c) W5/W6 for NumPy and CuPy: conv + ReLU + max-pool layers on (C, N, H, W) activations
    (im2col + one GEMM per pass), then Linear layers as NdarrayFloor's; in place, buffers kept
    across steps, no gradient for the data."""

    def __init__(self, w: ConvWorkload, xp: Any, dtype: str, weights: Sequence[np.ndarray],
                 data: tuple[np.ndarray, np.ndarray], sync: Callable[[], None] | None = None,
                 upload: Callable[[np.ndarray], Any] | None = None) -> None:
        dt, put = self._setup(w, xp, dtype, sync, upload)
        self.params = [put(a) for a in weights]
        n = w.batch
        self.layers: list[Any] = []
        self.dense: list[tuple[Any, Any, Any, Any, Any, Any]] = []  # W, b, dW, db, z, mask
        it = iter(self.params)
        for spec, shape_in, shape_out in w.plan():
            if spec[0] == "conv":
                self.layers.append(_Conv(xp, dt, next(it), next(it), n, shape_in, spec[3],
                                         first=not self.layers))
            elif spec[0] == "pool":
                self.layers.append(_MaxPool(xp, dt, n, shape_in))
            else:
                if not self.dense:
                    self.image = (shape_in[0], n, shape_in[1], shape_in[2])
                W, b = next(it), next(it)
                z = xp.empty((n, spec[1]), dtype=dt)
                self.dense.append((W, b, xp.empty_like(W), xp.empty_like(b), z,
                                   xp.empty(z.shape, dtype=bool)))
        chw = self.dense[0][0].shape[0]
        self.flat = xp.empty((n, chw), dtype=dt)
        self.dflat = xp.empty((n, chw), dtype=dt)
        self.gimage = xp.empty(self.image, dtype=dt)
        self.col, self.col2 = xp.empty((n, 1), dtype=dt), xp.empty((n, 1), dtype=dt)
        self.rows = xp.arange(n)
        self.xh, self.yh = data

    def step(self) -> Any:
        xp, dense = self.xp, self.dense
        x, y = self.upload(self.xh), self.upload(self.yh)
        h = x.transpose(1, 0, 2, 3)                     # (C, N, H, W), copied by im2col
        for layer in self.layers:
            h = layer.forward(h)
        c, n, hh, ww = self.image
        self.flat.reshape(n, c, hh, ww)[...] = h.transpose(1, 0, 2, 3)  # PyTorch's flatten order
        h = self.flat
        for i, (W, b, _, _, z, _) in enumerate(dense):
            xp.matmul(h, W, out=z)
            z += b
            if i < len(dense) - 1:
                xp.maximum(z, 0, out=z)
            h = z
        G = dense[-1][4]
        loss = softmax_ce(xp, G, y, self.rows, self.col, self.col2)
        for i in range(len(dense) - 1, -1, -1):
            W, _, dW, db, _, _ = dense[i]
            inp = self.flat if i == 0 else dense[i - 1][4]
            xp.matmul(inp.T, G, out=dW)
            xp.sum(G, axis=0, out=db)
            if i == 0:
                xp.matmul(G, W.T, out=self.dflat)
            else:  # the previous layer's output is read no more: its buffer takes its gradient
                z, mask = dense[i - 1][4:]
                xp.greater(z, 0, out=mask)
                xp.matmul(G, W.T, out=z)
                z *= mask
                G = z
        self.gimage[...] = self.dflat.reshape(n, c, hh, ww).transpose(1, 0, 2, 3)
        G = self.gimage
        for layer in reversed(self.layers):
            G = layer.backward(G)
        grads = [g for layer in self.layers if isinstance(layer, _Conv)
                 for g in (layer.dW, layer.db)] + [g for d in dense for g in d[2:4]]
        for p, dp in zip(self.params, grads):
            dp *= LEARNING_RATE
            p -= dp.reshape(p.shape)
        return loss


def _layer_norm(x: Any, g: Any, b: Any, xhat: Any, rstd: Any, out: Any) -> None:
    """out = LayerNorm(x) over axis 1 of x (M, C) (eps 1e-5, as torch's); keeps xhat, rstd."""
    np.mean(x, axis=1, keepdims=True, out=rstd)
    np.subtract(x, rstd, out=xhat)
    np.multiply(xhat, xhat, out=out)
    np.mean(out, axis=1, keepdims=True, out=rstd)
    rstd += 1e-5
    np.sqrt(rstd, out=rstd)
    np.divide(1.0, rstd, out=rstd)
    xhat *= rstd
    np.multiply(xhat, g, out=out)
    out += b


def _layer_norm_back(dh: Any, xhat: Any, rstd: Any, g: Any, dg: Any, db: Any, tmp: Any,
                     col: Any, dx: Any) -> None:
    """dx += the input's gradient of a LayerNorm, d out = dh (M, C), overwritten; dg, db."""
    np.multiply(dh, xhat, out=tmp)
    np.sum(tmp, axis=0, out=dg)
    np.sum(dh, axis=0, out=db)
    dh *= g                                   # d xhat
    np.multiply(dh, xhat, out=tmp)
    np.mean(tmp, axis=1, keepdims=True, out=col)
    np.multiply(xhat, col, out=tmp)
    dh -= tmp
    np.mean(dh, axis=1, keepdims=True, out=col)
    dh -= col
    dh *= rstd
    dx += dh


class GPTNdarrayFloor(Variant):
    """(c) W7 for NumPy: the GPT's forward and backward written out on (N T, C) rows, matmuls
    into buffers kept across steps, LayerNorm and the softmax in place; the exact GELU with
    gpuflow's portable erf (NumPy has none), which allocates its temporaries."""

    def __init__(self, w: GPTWorkload, dtype: str, weights: Sequence[np.ndarray],
                 data: tuple[np.ndarray, np.ndarray]) -> None:
        self.w = w
        dt = np.dtype(dtype)
        self.params = {k: np.array(a, dtype=dt) for k, a in zip(w.names(), weights)}
        self.grads = {k: np.empty_like(a) for k, a in self.params.items()}
        n, t, c, H = w.batch, w.context, w.dim, w.heads
        m, hid = n * t, w.mlp_ratio * c
        new = lambda *shape: np.empty(shape, dtype=dt)  # noqa: E731
        self.blocks = [{"x": new(m, c), "h1": new(m, c), "xhat1": new(m, c), "rstd1": new(m, 1),
                        "qkv": new(m, 3 * c), "p": new(n, H, t, t), "o4": new(n, H, t, c // H),
                        "o": new(m, c), "xmid": new(m, c), "h2": new(m, c), "xhat2": new(m, c),
                        "rstd2": new(m, 1), "u": new(m, hid), "cdf": new(m, hid),
                        "g": new(m, hid)} for _ in range(w.layers)]
        self.x, self.hf, self.xhatf, self.rstdf = new(m, c), new(m, c), new(m, c), new(m, 1)
        self.logits, self.col, self.col2 = new(m, w.vocab), new(m, 1), new(m, 1)
        self.dx, self.dh, self.tmp, self.dcol = new(m, c), new(m, c), new(m, c), new(m, 1)
        self.dg, self.dhid, self.dqkv = new(m, hid), new(m, hid), new(m, 3 * c)
        self.ds, self.dqkv5 = new(n, H, t, t), new(3, n, H, t, c // H)
        self.col4 = new(n, H, t, 1)
        self.blocked = np.triu(np.ones((t, t), dtype=bool), 1)
        self.rows = np.arange(m)
        self.xh, self.yh = data

    def step(self) -> Any:
        P, D, w = self.params, self.grads, self.w
        ids, y = self.xh, self.yh
        n, t = ids.shape
        c, H = w.dim, w.heads
        m, d = n * t, c // H
        scale = 1.0 / math.sqrt(d)
        flat = ids.reshape(-1)
        x = self.x if w.layers == 0 else self.blocks[0]["x"]
        np.take(P["tok_emb.weight"], flat, axis=0, out=x)
        x.reshape(n, t, c)[...] += P["pos_emb.weight"][:t]
        for i, S in enumerate(self.blocks):
            B = lambda k: P[f"blocks.{i}.{k}"]  # noqa: E731
            x = S["x"]
            _layer_norm(x, B("ln1.weight"), B("ln1.bias"), S["xhat1"], S["rstd1"], S["h1"])
            np.matmul(S["h1"], B("attn.in_proj_weight").T, out=S["qkv"])
            S["qkv"] += B("attn.in_proj_bias")
            q, k, v = S["qkv"].reshape(n, t, 3, H, d).transpose(2, 0, 3, 1, 4)
            p = S["p"]
            np.matmul(q, k.transpose(0, 1, 3, 2), out=p)
            p *= scale
            p[..., self.blocked] = -np.inf
            np.max(p, axis=-1, keepdims=True, out=self.col4)
            p -= self.col4
            np.exp(p, out=p)
            np.sum(p, axis=-1, keepdims=True, out=self.col4)
            p /= self.col4
            np.matmul(p, v, out=S["o4"])
            S["o"].reshape(n, t, H, d)[...] = S["o4"].transpose(0, 2, 1, 3)
            xmid = S["xmid"]
            np.matmul(S["o"], B("attn.out_proj.weight").T, out=xmid)
            xmid += B("attn.out_proj.bias")
            xmid += x
            _layer_norm(xmid, B("ln2.weight"), B("ln2.bias"), S["xhat2"], S["rstd2"], S["h2"])
            u = S["u"]
            np.matmul(S["h2"], B("mlp.0.weight"), out=u)
            u += B("mlp.0.bias")
            S["cdf"][...] = special.erf(np, u * math.sqrt(0.5))
            S["cdf"] += 1.0
            S["cdf"] *= 0.5
            np.multiply(u, S["cdf"], out=S["g"])
            x = self.blocks[i + 1]["x"] if i + 1 < len(self.blocks) else self.x
            np.matmul(S["g"], B("mlp.2.weight"), out=x)
            x += B("mlp.2.bias")
            x += xmid
        _layer_norm(x, P["ln_f.weight"], P["ln_f.bias"], self.xhatf, self.rstdf, self.hf)
        G = self.logits
        np.matmul(self.hf, P["head.weight"], out=G)
        G += P["head.bias"]
        loss = softmax_ce(np, G, y.reshape(-1), self.rows, self.col, self.col2)
        np.matmul(self.hf.T, G, out=D["head.weight"])
        np.sum(G, axis=0, out=D["head.bias"])
        dx, dh, tmp, col = self.dx, self.dh, self.tmp, self.dcol
        dx.fill(0)
        np.matmul(G, P["head.weight"].T, out=dh)
        _layer_norm_back(dh, self.xhatf, self.rstdf, P["ln_f.weight"], D["ln_f.weight"],
                         D["ln_f.bias"], tmp, col, dx)
        for i in range(len(self.blocks) - 1, -1, -1):
            S = self.blocks[i]
            B = lambda k: P[f"blocks.{i}.{k}"]  # noqa: E731
            dB = lambda k: D[f"blocks.{i}.{k}"]  # noqa: E731
            np.matmul(S["g"].T, dx, out=dB("mlp.2.weight"))
            np.sum(dx, axis=0, out=dB("mlp.2.bias"))
            du = self.dhid
            np.matmul(dx, B("mlp.2.weight").T, out=du)
            u, slope = S["u"], self.dg      # slope = Phi(u) + u phi(u)
            np.multiply(u, u, out=slope)
            slope *= -0.5
            np.exp(slope, out=slope)
            slope *= u
            slope *= 1.0 / math.sqrt(2.0 * math.pi)
            slope += S["cdf"]
            du *= slope
            np.matmul(S["h2"].T, du, out=dB("mlp.0.weight"))
            np.sum(du, axis=0, out=dB("mlp.0.bias"))
            np.matmul(du, B("mlp.0.weight").T, out=dh)
            _layer_norm_back(dh, S["xhat2"], S["rstd2"], B("ln2.weight"), dB("ln2.weight"),
                             dB("ln2.bias"), tmp, col, dx)
            np.matmul(dx.T, S["o"], out=dB("attn.out_proj.weight"))
            np.sum(dx, axis=0, out=dB("attn.out_proj.bias"))
            np.matmul(dx, B("attn.out_proj.weight"), out=tmp)
            do = tmp.reshape(n, t, H, d).transpose(0, 2, 1, 3)
            q, k, v = S["qkv"].reshape(n, t, 3, H, d).transpose(2, 0, 3, 1, 4)
            p, ds, dq5 = S["p"], self.ds, self.dqkv5
            np.matmul(p.transpose(0, 1, 3, 2), do, out=dq5[2])           # dv
            np.matmul(do, v.transpose(0, 1, 3, 2), out=ds)               # d p
            np.multiply(ds, p, out=ds)
            np.sum(ds, axis=-1, keepdims=True, out=self.col4)
            ds -= p * self.col4
            ds *= scale                                                   # d scores
            np.matmul(ds, k, out=dq5[0])                                  # dq
            np.matmul(ds.transpose(0, 1, 3, 2), q, out=dq5[1])            # dk
            self.dqkv.reshape(n, t, 3, H, d)[...] = dq5.transpose(1, 3, 0, 2, 4)
            np.matmul(self.dqkv.T, S["h1"], out=dB("attn.in_proj_weight"))
            np.sum(self.dqkv, axis=0, out=dB("attn.in_proj_bias"))
            np.matmul(self.dqkv, B("attn.in_proj_weight"), out=dh)
            _layer_norm_back(dh, S["xhat1"], S["rstd1"], B("ln1.weight"), dB("ln1.weight"),
                             dB("ln1.bias"), tmp, col, dx)
        D["tok_emb.weight"].fill(0)
        np.add.at(D["tok_emb.weight"], flat, dx)
        D["pos_emb.weight"].fill(0)
        np.sum(dx.reshape(n, t, c), axis=0, out=D["pos_emb.weight"][:t])
        for key, param in P.items():
            grad = D[key]
            grad *= LEARNING_RATE
            param -= grad
        return loss

    def read(self, loss: Any) -> float:
        return float(loss)


def make_floor(w: AnyWorkload, device: Device, dtype: str,
               weights: Sequence[np.ndarray], data: tuple[np.ndarray, np.ndarray]) -> Variant:
    """The hand-written NumPy floor."""
    if isinstance(w, GPTWorkload):
        return GPTNdarrayFloor(w, dtype, weights, data)
    if isinstance(w, ConvWorkload):
        return ConvNdarrayFloor(w, np, dtype, weights, data)
    return NdarrayFloor(w, np, dtype, weights, data)


def torch_twin(device: Device) -> str:
    """The torch device that runs on the same hardware, for PyTorch eager."""
    return "cpu"
