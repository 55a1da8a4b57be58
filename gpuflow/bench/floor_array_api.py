"""The floor for any other array-API library (array_api_strict): the step in plain standard
calls, new arrays each step, no gradient for the data."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from gpuflow.backends import Device, special

from .variants import Variant
from .workloads import LEARNING_RATE, AnyWorkload, ConvWorkload, GPTWorkload, Workload


class ArrayApiFloor(Variant):
    """(c) for array_api_strict (or any namespace): plain standard ops, no dX."""

    def __init__(self, w: Workload, device: Device, dtype: str,
                 weights: Sequence[np.ndarray], data: tuple[np.ndarray, np.ndarray]) -> None:
        xp, dev = device.xp, device.native
        self.device, self.xp, self.dev, self.w = device, xp, dev, w
        self.dt = device.dtype(dtype)
        put = lambda a: xp.asarray(np.asarray(a, dtype=dtype), device=dev)  # noqa: E731
        self.W = [put(a) for a in weights[0::2]]
        self.b = [put(a) for a in weights[1::2]]
        self.xh, self.yh = data
        self.classes = xp.arange(w.sizes[-1], dtype=xp.int64, device=dev)

    def softmax_ce(self, out: Any, y: Any) -> tuple[Any, Any]:
        """(mean softmax cross-entropy of logits `out` for labels y, d loss / d out)."""
        xp, n = self.xp, out.shape[0]
        shifted = out - xp.max(out, axis=1, keepdims=True)
        e = xp.exp(shifted)
        total = xp.sum(e, axis=1, keepdims=True)
        onehot = xp.astype(xp.reshape(y, (-1, 1)) == self.classes, self.dt)
        loss = -xp.sum(onehot * (shifted - xp.log(total))) / n
        return loss, (e / total - onehot) / n

    def step(self) -> Any:
        xp = self.xp
        x = xp.asarray(self.xh, device=self.dev)
        y = xp.asarray(self.yh, device=self.dev)
        last = len(self.W) - 1
        hs, es = [x], []
        for i, (W, b) in enumerate(zip(self.W, self.b)):
            z = hs[-1] @ W + b
            if i < last:
                if self.w.activation == "relu":
                    z = xp.clip(z, min=0.0)
                else:  # sigmoid as gpuflow's node: exp(min(z, 0)) / (1 + exp(-|z|))
                    e = xp.exp(-xp.abs(z))
                    es.append((e, 1.0 + e))
                    z = xp.maximum(xp.astype(z > 0.0, z.dtype), e) / es[-1][1]
            hs.append(z)
        out = hs[-1]
        if self.w.loss == "mse":
            m = out.shape[0] * out.shape[1]
            d = y - out
            loss = xp.sum(d * d) / m
            G = (-2.0 / m) * d
        else:
            loss, G = self.softmax_ce(out, y)
        for i in range(last, -1, -1):
            dW = hs[i].T @ G
            db = xp.sum(G, axis=0)
            if i > 0:
                s = hs[i]
                G = G @ self.W[i].T
                G = xp.where(s > 0.0, G, 0.0) if self.w.activation == "relu" else (
                    G * (es[i - 1][0] / es[i - 1][1] / es[i - 1][1]))  # s (1 - s), exactly
            # reassigned, not updated in place: some array-API libraries' arrays are immutable
            self.W[i] = self.W[i] - LEARNING_RATE * dW
            self.b[i] = self.b[i] - LEARNING_RATE * db
        return loss

    def read(self, loss: Any) -> float:
        return float(self.device.to_host(loss, what="floor loss read"))


class ConvArrayApiFloor(ArrayApiFloor):
    """(c) W5/W6 in plain array-API calls, NCHW: im2col by kh * kw strided slices stacked, one
    matmul; the data's gradient of a (stride 1) convolution as the convolution of the padded
    gradient with the flipped kernel; pooling by four strided views. Nothing written in place."""

    def __init__(self, w: ConvWorkload, device: Device, dtype: str,
                 weights: Sequence[np.ndarray], data: tuple[np.ndarray, np.ndarray]) -> None:
        xp, dev = device.xp, device.native
        self.device, self.xp, self.dev, self.w = device, xp, dev, w
        self.dt = device.dtype(dtype)
        self.params = [xp.asarray(np.asarray(a, dtype=dtype), device=dev) for a in weights]
        self.plan = w.plan()
        self.xh, self.yh = data
        self.classes = xp.arange(w.classes, dtype=xp.int64, device=dev)

    def _pad(self, x: Any, p: int) -> Any:
        """x (N, C, H, W) with p zeros on each side of H and W (the standard has no pad)."""
        if p == 0:
            return x
        xp = self.xp
        n, c, h, w = x.shape
        rows = xp.zeros((n, c, p, w), dtype=x.dtype, device=self.dev)
        x = xp.concat([rows, x, rows], axis=2)
        cols = xp.zeros((n, c, h + 2 * p, p), dtype=x.dtype, device=self.dev)
        return xp.concat([cols, x, cols], axis=3)

    def _conv(self, x: Any, W: Any, p: int) -> tuple[Any, Any]:
        """(cols (N, C k k, Ho Wo), W2 @ cols (N, O, Ho Wo)) of x (N, C, H, W), stride 1."""
        xp = self.xp
        n, k = x.shape[0], W.shape[2]
        x = self._pad(x, p)
        oh, ow = x.shape[2] - k + 1, x.shape[3] - k + 1
        cols = xp.stack([x[:, :, i:i + oh, j:j + ow] for i in range(k) for j in range(k)],
                        axis=2)
        cols = xp.reshape(cols, (n, -1, oh * ow))
        return cols, xp.reshape(W, (W.shape[0], -1)) @ cols

    def _pool_backward(self, x: Any, out: Any, G: Any) -> Any:
        """The gradient of 2x2 max pooling's input x: to each window's first maximum."""
        xp = self.xp
        taken = None
        parts = []
        for a, b in ((0, 0), (0, 1), (1, 0), (1, 1)):
            hit = x[:, :, a::2, b::2] == out
            if taken is not None:
                hit = xp.logical_and(hit, xp.logical_not(taken))
                taken = xp.logical_or(taken, hit)
            else:
                taken = hit
            parts.append(xp.where(hit, G, xp.zeros_like(G)))
        n, c, h2, w2 = G.shape
        rows = [xp.reshape(xp.stack(parts[2 * a:2 * a + 2], axis=-1), (n, c, h2, 2 * w2))
                for a in (0, 1)]
        return xp.reshape(xp.stack(rows, axis=3), (n, c, 2 * h2, 2 * w2))

    def step(self) -> Any:
        xp, plan = self.xp, self.plan
        x = xp.asarray(self.xh, device=self.dev)
        y = xp.asarray(self.yh, device=self.dev)
        saved: list[tuple[Any, ...]] = []
        it = iter(self.params)
        h = x
        for i, (spec, _, shape_out) in enumerate(plan):
            if spec[0] == "conv":
                W, b = next(it), next(it)
                cols, z = self._conv(h, W, spec[3])
                z = xp.clip(z + xp.reshape(b, (1, -1, 1)), min=0.0)
                saved.append((h, cols, z))
                h = xp.reshape(z, (h.shape[0], *shape_out))
            elif spec[0] == "pool":
                v = [h[:, :, a::2, b::2] for a in (0, 1) for b in (0, 1)]
                z = xp.maximum(xp.maximum(v[0], v[1]), xp.maximum(v[2], v[3]))
                saved.append((h, z))
                h = z
            else:
                W, b = next(it), next(it)
                flat = xp.reshape(h, (h.shape[0], -1))
                z = flat @ W + b
                if i < len(plan) - 1:
                    z = xp.clip(z, min=0.0)
                saved.append((h, flat, z))
                h = z
        loss, G = self.softmax_ce(h, y)
        grads: list[Any] = []
        for i in range(len(plan) - 1, -1, -1):
            spec = plan[i][0]
            if spec[0] == "fc":
                h, flat, z = saved[i]
                if i < len(plan) - 1:
                    G = xp.where(z > 0.0, G, 0.0)
                W = self._weight(i)
                grads += [xp.sum(G, axis=0), flat.T @ G]
                G = xp.reshape(G @ W.T, h.shape)
            elif spec[0] == "pool":
                h, z = saved[i]
                G = self._pool_backward(h, z, G)
            else:
                h, cols, z = saved[i]
                W = self._weight(i)
                G = xp.where(z > 0.0, xp.reshape(G, z.shape), 0.0)
                grads += [xp.sum(G, axis=(0, 2)),
                          xp.reshape(xp.tensordot(G, cols, axes=([0, 2], [0, 2])), W.shape)]
                if i > 0:
                    k, p = W.shape[2], spec[3]
                    Wt = xp.permute_dims(xp.flip(W, axis=(2, 3)), (1, 0, 2, 3))
                    G4 = xp.reshape(G, (G.shape[0], W.shape[0], *plan[i][2][1:]))
                    _, dx = self._conv(G4, Wt, k - 1 - p)
                    G = xp.reshape(dx, h.shape)
        # reassigned, not updated in place: some array-API libraries' arrays are immutable
        self.params = [p - LEARNING_RATE * g for p, g in zip(self.params, reversed(grads))]
        return loss

    def _weight(self, layer: int) -> Any:
        """The weight array of layer `layer` of the plan."""
        index = sum(2 for spec, _, _ in self.plan[:layer] if spec[0] != "pool")
        return self.params[index]


class GPTArrayApiFloor(ArrayApiFloor):
    """(c) W7 in plain array-API calls: the GPT's forward and backward written out (LayerNorm,
    the attention's softmax and its gradient, the exact GELU with gpuflow's portable erf, the
    embeddings' scatter-add as gpuflow's portable route, a one-hot matmul); no gradient for
    the ids. Nothing written in place."""

    def __init__(self, w: GPTWorkload, device: Device, dtype: str,
                 weights: Sequence[np.ndarray], data: tuple[np.ndarray, np.ndarray]) -> None:
        xp, dev = device.xp, device.native
        self.device, self.xp, self.dev, self.w = device, xp, dev, w
        self.dt = device.dtype(dtype)
        self.params = {k: xp.asarray(np.asarray(a, dtype=dtype), device=dev)
                       for k, a in zip(w.names(), weights)}
        self.xh, self.yh = data
        self.classes = xp.arange(w.vocab, dtype=xp.int64, device=dev)
        t = xp.arange(w.context, device=dev)
        self.allowed = xp.reshape(t, (-1, 1)) >= t   # causal: position i sees j <= i

    def _ln(self, x: Any, g: Any, b: Any) -> tuple[Any, tuple[Any, Any]]:
        """LayerNorm over the last axis (eps 1e-5, biased variance, as torch's)."""
        xp = self.xp
        xc = x - xp.mean(x, axis=-1, keepdims=True)
        rstd = 1.0 / xp.sqrt(xp.mean(xc * xc, axis=-1, keepdims=True) + 1e-5)
        xhat = xc * rstd
        return xhat * g + b, (xhat, rstd)

    def _ln_back(self, dh: Any, saved: tuple[Any, Any], g: Any) -> tuple[Any, Any, Any]:
        """(dx, dgamma, dbeta) of a LayerNorm from d out and what _ln saved."""
        xp = self.xp
        xhat, rstd = saved
        dxhat = dh * g
        dx = rstd * (dxhat - xp.mean(dxhat, axis=-1, keepdims=True)
                     - xhat * xp.mean(dxhat * xhat, axis=-1, keepdims=True))
        return dx, xp.sum(dh * xhat, axis=(0, 1)), xp.sum(dh, axis=(0, 1))

    def _heads(self, x: Any) -> Any:
        """(N, T, C) -> (N, H, T, C / H)."""
        n, t, c = x.shape
        h = self.w.heads
        return self.xp.permute_dims(self.xp.reshape(x, (n, t, h, c // h)), (0, 2, 1, 3))

    def _merge(self, x: Any) -> Any:
        """(N, H, T, d) -> (N, T, H d)."""
        n, h, t, d = x.shape
        return self.xp.reshape(self.xp.permute_dims(x, (0, 2, 1, 3)), (n, t, h * d))

    def step(self) -> Any:
        xp, P, w = self.xp, self.params, self.w
        mT, rows = xp.matrix_transpose, lambda a: xp.reshape(a, (-1, a.shape[-1]))  # noqa
        ids = xp.asarray(self.xh, device=self.dev)
        y = xp.asarray(self.yh, device=self.dev)
        n, t = ids.shape
        c, flat = w.dim, xp.reshape(ids, (-1,))
        scale = 1.0 / math.sqrt(c // w.heads)
        x = xp.reshape(xp.take(P["tok_emb.weight"], flat, axis=0), (n, t, c)) + \
            P["pos_emb.weight"][:t, :]
        saved = []
        for i in range(w.layers):
            B = {k[len(f"blocks.{i}."):]: a for k, a in P.items() if k.startswith(f"blocks.{i}.")}
            h1, ln1 = self._ln(x, B["ln1.weight"], B["ln1.bias"])
            qkv = h1 @ mT(B["attn.in_proj_weight"]) + B["attn.in_proj_bias"]
            q, k, v = (self._heads(qkv[..., j * c:(j + 1) * c]) for j in range(3))
            s = xp.where(self.allowed[:t, :t], (q @ mT(k)) * scale, -math.inf)
            e = xp.exp(s - xp.max(s, axis=-1, keepdims=True))
            p = e / xp.sum(e, axis=-1, keepdims=True)
            o = self._merge(p @ v)
            x = x + (o @ mT(B["attn.out_proj.weight"]) + B["attn.out_proj.bias"])
            h2, ln2 = self._ln(x, B["ln2.weight"], B["ln2.bias"])
            u = h2 @ B["mlp.0.weight"] + B["mlp.0.bias"]
            cdf = 0.5 * (1.0 + special.erf(xp, u * math.sqrt(0.5)))
            g = u * cdf
            x = x + (g @ B["mlp.2.weight"] + B["mlp.2.bias"])
            saved.append((B, h1, ln1, q, k, v, p, o, h2, ln2, u, cdf, g))
        hf, lnf = self._ln(x, P["ln_f.weight"], P["ln_f.bias"])
        logits = hf @ P["head.weight"] + P["head.bias"]
        loss, G = self.softmax_ce(rows(logits), xp.reshape(y, (-1,)))
        grads = {"head.weight": mT(rows(hf)) @ G, "head.bias": xp.sum(G, axis=0)}
        dx, grads["ln_f.weight"], grads["ln_f.bias"] = self._ln_back(
            xp.reshape(G @ mT(P["head.weight"]), (n, t, c)), lnf, P["ln_f.weight"])
        for i in range(w.layers - 1, -1, -1):
            B, h1, ln1, q, k, v, p, o, h2, ln2, u, cdf, g = saved[i]
            d: dict[str, Any] = {}
            Gr = rows(dx)
            d["mlp.2.weight"], d["mlp.2.bias"] = mT(rows(g)) @ Gr, xp.sum(Gr, axis=0)
            slope = cdf + u * (xp.exp(-0.5 * (u * u)) * (1.0 / math.sqrt(2.0 * math.pi)))
            du = rows((Gr @ mT(B["mlp.2.weight"])) * rows(slope))
            d["mlp.0.weight"], d["mlp.0.bias"] = mT(rows(h2)) @ du, xp.sum(du, axis=0)
            dh, d["ln2.weight"], d["ln2.bias"] = self._ln_back(
                xp.reshape(du @ mT(B["mlp.0.weight"]), (n, t, c)), ln2, B["ln2.weight"])
            dx = dx + dh
            Gr = rows(dx)
            d["attn.out_proj.weight"] = mT(Gr) @ rows(o)
            d["attn.out_proj.bias"] = xp.sum(Gr, axis=0)
            do = self._heads(xp.reshape(Gr @ B["attn.out_proj.weight"], (n, t, c)))
            dp = do @ mT(v)
            ds = p * (dp - xp.sum(dp * p, axis=-1, keepdims=True)) * scale
            dqkv = rows(xp.concat([self._merge(ds @ k), self._merge(mT(ds) @ q),
                                   self._merge(mT(p) @ do)], axis=-1))
            d["attn.in_proj_weight"] = mT(dqkv) @ rows(h1)
            d["attn.in_proj_bias"] = xp.sum(dqkv, axis=0)
            dh, d["ln1.weight"], d["ln1.bias"] = self._ln_back(
                xp.reshape(dqkv @ B["attn.in_proj_weight"], (n, t, c)), ln1, B["ln1.weight"])
            dx = dx + dh
            grads.update({f"blocks.{i}.{key}": a for key, a in d.items()})
        grads["tok_emb.weight"] = special.scatter_add_rows(xp, flat, rows(dx), w.vocab)
        dpos = xp.sum(dx, axis=0)
        if t < w.context:
            dpos = xp.concat([dpos, xp.zeros((w.context - t, c), dtype=dpos.dtype,
                                             device=self.dev)])
        grads["pos_emb.weight"] = dpos
        # reassigned, not updated in place: some array-API libraries' arrays are immutable
        self.params = {k: a - LEARNING_RATE * grads[k] for k, a in P.items()}
        return loss


def make_floor(w: AnyWorkload, device: Device, dtype: str,
               weights: Sequence[np.ndarray], data: tuple[np.ndarray, np.ndarray]) -> Variant:
    """The floor in plain array-API calls on `device`."""
    if isinstance(w, GPTWorkload):
        return GPTArrayApiFloor(w, device, dtype, weights, data)
    if isinstance(w, ConvWorkload):
        return ConvArrayApiFloor(w, device, dtype, weights, data)
    return ArrayApiFloor(w, device, dtype, weights, data)


def torch_twin(device: Device) -> str | None:
    """The torch device for PyTorch eager: the CPU, unless the device is a GPU, whose torch
    twin this generic floor does not know."""
    return None if device.is_gpu else "cpu"
