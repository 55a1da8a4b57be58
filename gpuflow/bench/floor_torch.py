"""The torch devices' floor (hand-written torch ops, no autograd) and PyTorch eager (nn layers,
torch.optim, autograd), which every device is compared with; torch's thread count, version and
CUDA memory. The benchmark's only module that imports torch."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gpuflow.backends import Device

from .variants import Variant
from .workloads import LEARNING_RATE, AnyWorkload, ConvWorkload, GPTWorkload, Workload


class TorchFloor(Variant):
    """(c) for torch devices: hand-written torch ops, no autograd, out= and in place."""

    def __init__(self, w: Workload, tdev: Any, dtype: str, weights: Sequence[np.ndarray],
                 data: tuple[np.ndarray, np.ndarray]) -> None:
        self.tdev, self.w = tdev, w
        dt = getattr(torch, dtype)
        put = lambda a: torch.as_tensor(np.ascontiguousarray(a), device=tdev).to(dt)  # noqa
        self.W = [put(a) for a in weights[0::2]]
        self.b = [put(a) for a in weights[1::2]]
        self.dW = [torch.empty_like(a) for a in self.W]
        self.db = [torch.empty_like(a) for a in self.b]
        n = w.batch
        new = lambda s, d=dt: torch.empty((n, s), dtype=d, device=tdev)  # noqa: E731
        self.z = [new(s) for s in w.sizes[1:]]
        self.g = [new(s) for s in w.sizes[1:-1]]
        self.tmp = [new(s) for s in w.sizes[1:-1]]
        self.e = [new(s) for s in w.sizes[1:-1]]  # sigmoid: exp(-|z|)
        self.d = [new(s) for s in w.sizes[1:-1]]  # sigmoid: 1 + exp(-|z|)
        self.mask = [new(s, torch.bool) for s in w.sizes[1:-1]]
        self.col, self.col2 = new(1), new(1)
        self.rows = torch.arange(n, device=tdev)
        self.xh, self.yh = data

    def _upload(self, a: np.ndarray) -> Any:
        t = torch.from_numpy(a)
        return t if self.tdev.type == "cpu" else t.to(self.tdev)

    def step(self) -> Any:
        z = self.z
        x, y = self._upload(self.xh), self._upload(self.yh)
        last = len(self.W) - 1
        h = x
        for i, (W, b) in enumerate(zip(self.W, self.b)):
            torch.addmm(b, h, W, out=z[i])
            if i < last:
                if self.w.activation == "relu":
                    z[i].clamp_(min=0)
                else:  # sigmoid as gpuflow's node: exp(min(z, 0)) / (1 + exp(-|z|))
                    e, d = self.e[i], self.d[i]
                    torch.abs(z[i], out=e).neg_().exp_()
                    torch.add(e, 1.0, out=d)
                    torch.gt(z[i], 0, out=z[i])
                    torch.maximum(z[i], e, out=z[i]).div_(d)
            h = z[i]
        out = z[last]
        if self.w.loss == "mse":
            m = out.numel()
            d = self.col
            torch.sub(y, out, out=d)
            loss = torch.dot(d.view(-1), d.view(-1)) / m
            torch.mul(d, -2.0 / m, out=out)
        else:
            n = out.shape[0]
            torch.amax(out, dim=1, keepdim=True, out=self.col)
            out.sub_(self.col)
            picked = out[self.rows, y]
            out.exp_()
            torch.sum(out, dim=1, keepdim=True, out=self.col)
            torch.log(self.col, out=self.col2)
            loss = (self.col2.sum() - picked.sum()) / n
            out.div_(self.col)
            out[self.rows, y] -= 1.0
            out.mul_(1.0 / n)
        G = out
        for i in range(last, -1, -1):
            inp = x if i == 0 else z[i - 1]
            torch.matmul(inp.T, G, out=self.dW[i])
            torch.sum(G, dim=0, out=self.db[i])
            if i > 0:
                g = self.g[i - 1]
                torch.matmul(G, self.W[i].T, out=g)
                s = z[i - 1]
                if self.w.activation == "relu":
                    torch.gt(s, 0, out=self.mask[i - 1])
                    g.mul_(self.mask[i - 1])
                else:  # s (1 - s) = e / (1 + e)^2, as gpuflow's node
                    t = self.tmp[i - 1]
                    torch.div(self.e[i - 1], self.d[i - 1], out=t).div_(self.d[i - 1])
                    g.mul_(t)
                G = g
        for p, dp in zip(self.W + self.b, self.dW + self.db):
            p.sub_(dp, alpha=LEARNING_RATE)
        return loss

    def read(self, loss: Any) -> float:
        return float(loss.item())

    def sync(self) -> None:
        if self.tdev.type == "cuda":
            torch.cuda.synchronize(self.tdev)

    def memory(self) -> dict[str, Any] | None:
        return memory(self, self.tdev)


class TorchEager(Variant):
    """(d) PyTorch eager: nn layers (Linear; Conv2d, MaxPool2d, Flatten; for W7 the GPT module
    `TorchGPT`), torch.optim.SGD, loss.backward()."""

    def __init__(self, w: AnyWorkload, tdev: Any, dtype: str, weights: Sequence[np.ndarray],
                 data: tuple[np.ndarray, np.ndarray]) -> None:
        self.tdev, self.w = tdev, w
        if isinstance(w, GPTWorkload):
            model: Any = TorchGPT.from_weights(w, weights)
        else:
            model = nn.Sequential(*(_conv_layers(w, weights) if isinstance(w, ConvWorkload)
                                    else _mlp_layers(w, weights)))
        self.model = model.to(device=tdev, dtype=getattr(torch, dtype))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE)
        self.loss_fn = nn.MSELoss() if w.loss == "mse" else nn.CrossEntropyLoss()
        self.xh, self.yh = data

    def _upload(self, a: np.ndarray) -> Any:
        t = torch.from_numpy(a)
        return t if self.tdev.type == "cpu" else t.to(self.tdev)

    def step(self) -> Any:
        x, y = self._upload(self.xh), self._upload(self.yh)
        self.opt.zero_grad(set_to_none=True)
        out = self.model(x)
        if out.ndim == 3:  # the GPT's logits (N, T, V): CE over all N T positions
            out, y = out.reshape(-1, out.shape[-1]), y.reshape(-1)
        loss = self.loss_fn(out, y)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def read(self, loss: Any) -> float:
        return float(loss.item())

    def sync(self) -> None:
        if self.tdev.type == "cuda":
            torch.cuda.synchronize(self.tdev)

    def memory(self) -> dict[str, Any] | None:
        return memory(self, self.tdev)


F64 = torch.float64  # layers made in float64 take the host weights exactly, then are cast


def _set(layer: Any, weight: np.ndarray, bias: np.ndarray) -> Any:
    """`layer` with the given host weight (in torch's layout) and bias."""
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer


def _mlp_layers(w: Workload, weights: Sequence[np.ndarray]) -> list[Any]:
    layers: list[Any] = []
    n_layers = len(w.sizes) - 1
    for i, (n_in, n_out) in enumerate(zip(w.sizes[:-1], w.sizes[1:])):
        layers.append(_set(nn.Linear(n_in, n_out, dtype=F64), weights[2 * i].T, weights[2 * i + 1]))
        if i < n_layers - 1:
            layers.append(nn.ReLU() if w.activation == "relu" else nn.Sigmoid())
    return layers


def _conv_layers(w: ConvWorkload, weights: Sequence[np.ndarray]) -> list[Any]:
    layers: list[Any] = []
    it = iter(weights)
    plan = w.plan()
    for i, (spec, shape_in, _) in enumerate(plan):
        if spec[0] == "conv":
            _, o, k, p = spec
            layers += [_set(nn.Conv2d(shape_in[0], o, k, padding=p, dtype=F64), next(it), next(it)),
                       nn.ReLU()]
        elif spec[0] == "pool":
            layers.append(nn.MaxPool2d(spec[1]))
        else:
            if len(shape_in) > 1:
                layers.append(nn.Flatten())
            W = next(it)
            layers.append(_set(nn.Linear(W.shape[0], W.shape[1], dtype=F64), W.T, next(it)))
            if i < len(plan) - 1:
                layers.append(nn.ReLU())
    return layers


class TorchConvFloor(TorchFloor):
    """(c) W5/W6 for torch devices: torch's own convolution and pooling kernels called by hand
    (F.conv2d, max_pool2d_with_indices and their aten backward functions, the ones autograd
    calls), Linear layers and the loss as TorchFloor's; no autograd graph."""

    def __init__(self, w: ConvWorkload, tdev: Any, dtype: str, weights: Sequence[np.ndarray],
                 data: tuple[np.ndarray, np.ndarray]) -> None:
        self.tdev, self.w = tdev, w
        dt = getattr(torch, dtype)
        self.params = [torch.as_tensor(np.ascontiguousarray(a), device=tdev).to(dt)
                       for a in weights]
        self.plan = w.plan()
        self.rows = torch.arange(w.batch, device=tdev)
        self.xh, self.yh = data

    def step(self) -> Any:
        aten, plan = torch.ops.aten, self.plan
        x, y = self._upload(self.xh), self._upload(self.yh)
        saved: list[tuple[Any, ...]] = []   # per layer: what its backward needs
        it = iter(self.params)
        h = x
        for i, (spec, _, _) in enumerate(plan):
            if spec[0] == "conv":
                W, b = next(it), next(it)
                z = F.conv2d(h, W, b, padding=spec[3]).relu_()
                saved.append((h, W, z))
            elif spec[0] == "pool":
                z, idx = F.max_pool2d_with_indices(h, spec[1])
                saved.append((h, idx))
            else:
                W, b = next(it), next(it)
                h2 = h.flatten(1)
                z = torch.addmm(b, h2, W)
                if i < len(plan) - 1:
                    z.relu_()
                saved.append((h, h2, W, z))
            h = z
        loss = _softmax_ce(h, y, self.rows)
        G = h
        grads: list[Any] = []
        for i in range(len(plan) - 1, -1, -1):
            spec = plan[i][0]
            kind = spec[0]
            if kind == "fc":
                h, h2, W, z = saved[i]
                if i < len(plan) - 1:
                    G = aten.threshold_backward(G, z, 0)
                grads += [G.sum(0), h2.T @ G]
                G = (G @ W.T).view(h.shape) if i > 0 else None
            elif kind == "pool":
                h, idx = saved[i]
                k = spec[1]
                G = aten.max_pool2d_with_indices_backward(G, h, [k, k], [k, k], [0, 0], [1, 1],
                                                          False, idx)
            else:
                h, W, z = saved[i]
                G = aten.threshold_backward(G, z, 0)
                p = spec[3]
                dx, dW, db = aten.convolution_backward(
                    G, h, W, [W.shape[0]], [1, 1], [p, p], [1, 1], False, [0, 0], 1,
                    [i > 0, True, True])
                grads += [db, dW]
                G = dx
        for param, grad in zip(self.params, reversed(grads)):
            param.sub_(grad, alpha=LEARNING_RATE)
        return loss


class TorchBlock(nn.Module):
    """The pre-LayerNorm GPT-2 block equal to gf.transformer_block (exact GELU, no dropout)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, dtype=F64)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, dtype=F64)
        self.ln2 = nn.LayerNorm(dim, dtype=F64)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim, dtype=F64), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim, dtype=F64))

    def forward(self, x: Any) -> Any:
        t = x.shape[1]
        blocked = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=blocked, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TorchGPT(nn.Module):
    """The torch module equal to gf.layers.gpt (tests/test_gpt.py's): its state_dict keys are
    GPTWorkload.names()."""

    def __init__(self, w: GPTWorkload) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(w.vocab, w.dim, dtype=F64)
        self.pos_emb = nn.Embedding(w.context, w.dim, dtype=F64)
        self.blocks = nn.ModuleList(TorchBlock(w.dim, w.heads, w.mlp_ratio)
                                    for _ in range(w.layers))
        self.ln_f = nn.LayerNorm(w.dim, dtype=F64)
        self.head = nn.Linear(w.dim, w.vocab, dtype=F64)

    @classmethod
    def from_weights(cls, w: GPTWorkload, weights: Sequence[np.ndarray]) -> "TorchGPT":
        """The module holding gpuflow's weights (Linear weights transposed to torch's)."""
        model = cls(w)
        model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(
            a.T if _is_linear_weight(k) else a)) for k, a in zip(w.names(), weights)})
        return model

    def forward(self, ids: Any) -> Any:
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _is_linear_weight(name: str) -> bool:
    """Whether gf.layers.gpt's parameter `name` is a Linear's W, (in, out) in gpuflow."""
    return name == "head.weight" or name.endswith((".mlp.0.weight", ".mlp.2.weight"))


class TorchGPTFloor(TorchFloor):
    """(c) W7 for torch devices: the GPT's forward and backward written out in torch ops, no
    autograd: torch's own LayerNorm, GELU and softmax kernels and their aten backward
    functions (the ones autograd calls), the attention as batched matmuls with an additive
    causal mask, the embeddings' gradient by index_add_."""

    def __init__(self, w: GPTWorkload, tdev: Any, dtype: str, weights: Sequence[np.ndarray],
                 data: tuple[np.ndarray, np.ndarray]) -> None:
        self.tdev, self.w = tdev, w
        dt = getattr(torch, dtype)
        self.params = {k: torch.as_tensor(np.ascontiguousarray(a), device=tdev).to(dt)
                       for k, a in zip(w.names(), weights)}
        t = w.context
        self.mask = torch.zeros((t, t), dtype=dt, device=tdev).masked_fill_(
            torch.ones((t, t), dtype=torch.bool, device=tdev).triu_(1), -float("inf"))
        self.rows = torch.arange(w.batch * w.context, device=tdev)
        self.xh, self.yh = data

    def step(self) -> Any:
        aten, P, w = torch.ops.aten, self.params, self.w
        ids, y = self._upload(self.xh), self._upload(self.yh)
        n, t = ids.shape
        c, H = w.dim, w.heads
        scale = 1.0 / (c // H) ** 0.5
        lnb = lambda dh, x, saved, g, b: aten.native_layer_norm_backward(  # noqa: E731
            dh, x, [c], saved[0], saved[1], g, b, [True, True, True])
        x = F.embedding(ids, P["tok_emb.weight"]) + P["pos_emb.weight"][:t]
        saved = []
        for i in range(w.layers):
            B = {k[len(f"blocks.{i}."):]: a for k, a in P.items() if k.startswith(f"blocks.{i}.")}
            h1, *ln1 = torch.native_layer_norm(x, [c], B["ln1.weight"], B["ln1.bias"], 1e-5)
            qkv = F.linear(h1, B["attn.in_proj_weight"], B["attn.in_proj_bias"])
            q, k, v = qkv.view(n, t, 3, H, c // H).permute(2, 0, 3, 1, 4)
            s = torch.matmul(q, k.transpose(-2, -1)).mul_(scale).add_(self.mask[:t, :t])
            p = torch.softmax(s, dim=-1)
            o = torch.matmul(p, v).transpose(1, 2).reshape(n * t, c)
            x_mid = x + F.linear(o, B["attn.out_proj.weight"], B["attn.out_proj.bias"]).view(
                n, t, c)
            h2, *ln2 = torch.native_layer_norm(x_mid, [c], B["ln2.weight"], B["ln2.bias"],
                                               1e-5)
            h2 = h2.view(n * t, c)
            u = torch.addmm(B["mlp.0.bias"], h2, B["mlp.0.weight"])
            g = F.gelu(u)
            saved.append((B, x, h1, ln1, q, k, v, p, o, x_mid, h2, ln2, u, g))
            x = x_mid + torch.addmm(B["mlp.2.bias"], g, B["mlp.2.weight"]).view(n, t, c)
        hf, *lnf = torch.native_layer_norm(x, [c], P["ln_f.weight"], P["ln_f.bias"], 1e-5)
        hf = hf.view(n * t, c)
        G = torch.addmm(P["head.bias"], hf, P["head.weight"])
        loss = _softmax_ce(G, y.reshape(-1), self.rows)   # G becomes d loss / d logits
        grads = {"head.weight": hf.T @ G, "head.bias": G.sum(0)}
        dx, grads["ln_f.weight"], grads["ln_f.bias"] = lnb(
            (G @ P["head.weight"].T).view(n, t, c), x, lnf, P["ln_f.weight"], P["ln_f.bias"])
        for i in range(w.layers - 1, -1, -1):
            B, x, h1, ln1, q, k, v, p, o, x_mid, h2, ln2, u, g = saved[i]
            d: dict[str, Any] = {}
            Gr = dx.view(n * t, c)
            d["mlp.2.weight"], d["mlp.2.bias"] = g.T @ Gr, Gr.sum(0)
            du = aten.gelu_backward(Gr @ B["mlp.2.weight"].T, u)
            d["mlp.0.weight"], d["mlp.0.bias"] = h2.T @ du, du.sum(0)
            dh, d["ln2.weight"], d["ln2.bias"] = lnb(
                (du @ B["mlp.0.weight"].T).view(n, t, c), x_mid, ln2, B["ln2.weight"],
                B["ln2.bias"])
            dx = dx + dh
            Gr = dx.view(n * t, c)
            d["attn.out_proj.weight"], d["attn.out_proj.bias"] = Gr.T @ o, Gr.sum(0)
            do = (Gr @ B["attn.out_proj.weight"]).view(n, t, H, c // H).transpose(1, 2)
            ds = aten._softmax_backward_data(do @ v.transpose(-2, -1), p, -1, p.dtype)
            ds.mul_(scale)
            dqkv = torch.stack([ds @ k, ds.transpose(-2, -1) @ q, p.transpose(-2, -1) @ do])
            dqkv = dqkv.permute(1, 3, 0, 2, 4).reshape(n * t, 3 * c)
            d["attn.in_proj_weight"] = dqkv.T @ h1.view(n * t, c)
            d["attn.in_proj_bias"] = dqkv.sum(0)
            dh, d["ln1.weight"], d["ln1.bias"] = lnb(
                (dqkv @ B["attn.in_proj_weight"]).view(n, t, c), x, ln1, B["ln1.weight"],
                B["ln1.bias"])
            dx = dx + dh
            grads.update({f"blocks.{i}.{key}": a for key, a in d.items()})
        grads["tok_emb.weight"] = torch.zeros_like(P["tok_emb.weight"]).index_add_(
            0, ids.reshape(-1), dx.view(n * t, c))
        grads["pos_emb.weight"] = torch.zeros_like(P["pos_emb.weight"])
        grads["pos_emb.weight"][:t] = dx.sum(0)
        for key, param in P.items():
            param.sub_(grads[key], alpha=LEARNING_RATE)
        return loss


def _softmax_ce(out: Any, y: Any, rows: Any) -> Any:
    """Mean softmax cross-entropy of logits `out` for labels y; `out` becomes its gradient."""
    n = out.shape[0]
    out.sub_(torch.amax(out, dim=1, keepdim=True))
    picked = out[rows, y]
    out.exp_()
    total = out.sum(dim=1, keepdim=True)
    loss = (total.log().sum() - picked.sum()) / n
    out.div_(total)
    out[rows, y] -= 1.0
    out.mul_(1.0 / n)
    return loss


def make_floor(w: AnyWorkload, device: Device, dtype: str, weights: Sequence[np.ndarray],
               data: tuple[np.ndarray, np.ndarray]) -> Variant:
    """The hand-written torch floor on `device`'s torch device."""
    if isinstance(w, GPTWorkload):
        return TorchGPTFloor(w, device.native, dtype, weights, data)
    if isinstance(w, ConvWorkload):
        return TorchConvFloor(w, device.native, dtype, weights, data)
    return TorchFloor(w, device.native, dtype, weights, data)


def torch_twin(device: Device) -> Any:
    """A torch device is its own twin."""
    return device.native


def torch_device(spec: Any) -> Any:
    """The torch device for a spec ("cpu", "cuda:0", a torch.device); None when it names a GPU
    and torch has no CUDA here."""
    tdev = torch.device(spec)
    if tdev.type == "cuda" and not torch.cuda.is_available():
        return None
    return tdev


def memory(v: Variant, tdev: Any) -> dict[str, Any]:
    """torch.cuda.max_memory_allocated over one step of `v` on a CUDA device; on the CPU torch's
    allocations are invisible to tracemalloc, so nothing is measured."""
    if tdev.type != "cuda":
        return {"kind": "n/a (torch CPU memory is invisible to tracemalloc)", "bytes": None}
    torch.cuda.synchronize(tdev)
    torch.cuda.reset_peak_memory_stats(tdev)
    v.step()
    v.sync()
    return {"kind": "torch.cuda.max_memory_allocated",
            "bytes": int(torch.cuda.max_memory_allocated(tdev))}


def set_threads(n: int) -> None:
    """Use n intra-op threads in torch."""
    torch.set_num_threads(n)


def library_info() -> dict[str, Any]:
    """torch's version and intra-op thread count."""
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
