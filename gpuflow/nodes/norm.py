"""Regularisation and normalisation nodes: Dropout, BatchNorm, LayerNorm.

Dropout and BatchNorm behave differently in training and in evaluation (`node.training`, set by
the graph: training in `forward_and_backward` / `Graph.step`, evaluation in `forward_pass` /
`Graph.run`).
"""

from __future__ import annotations

import math
from typing import Any

from ..runtime.amp import low_precision_name
from ..errors import GraphError
from .core import Node


def _check_vector(node: Node, which: Node, size: int, what: str) -> None:
    shape = tuple(which.value.shape)
    if shape != (size,):
        raise GraphError(f"{node.label}: {what} has shape {shape} but x has {size} "
                         f"{'channels' if isinstance(node, BatchNorm) else 'features'}; "
                         f"{what} must be ({size},).\nhelp: check the size of {which.label}.")


def _statistics_dtype(node: Node, dtype: Any) -> Any:
    """float32 for a float16/bfloat16 x (whose mean of squares overflows float16 past 65504),
    else None (x's own dtype), as torch's autocast computes normalisations."""
    return node.xp.float32 if low_precision_name(dtype) is not None else None


def _normalisation_backward(node: Node) -> None:
    """BatchNorm's and LayerNorm's backward: `node._gradients(G, gamma)` gives [dx, dgamma,
    dbeta], in float32 when the forward pass widened float16/bfloat16, each sent back in G's
    dtype."""
    G = node.upstream_gradient()
    gamma = node.inbound_nodes[1]
    wide = _statistics_dtype(node, G.dtype)
    if wide is None:
        grads = node._gradients(G, gamma.value)
    else:
        xp = node.xp
        grads = [None if g is None else xp.astype(g, G.dtype)
                 for g in node._gradients(xp.astype(G, wide), xp.astype(gamma.value, wide))]
    for inbound, grad in zip(node.inbound_nodes, grads):
        if grad is not None:
            node.gradients[inbound] = grad


def _mix(seed: int, step: int) -> int:
    """A 63-bit generator seed from (seed, step), well mixed in every bit (SplitMix64's
    finaliser): torch's CPU generator keeps only a seed's low 32 bits."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) >> 1


class Dropout(Node):
    """Inverted dropout: in training, each entry is zeroed with probability p and the others
    scaled by 1 / (1 - p); in evaluation, the identity.

    The masks are drawn on the graph's device, with no host round trip: the k-th training
    step's mask from `device.rng(s)`, s a hash of (seed, k). So the same seed gives the same masks,
    step after step, on the same device, and `state_dict()` ({'steps': k}, saved by
    checkpoints) resumes the sequence exactly. Across devices the masks are the same on 'cpu'
    and the array_api_strict devices (NumPy's generator) and differ between libraries (torch,
    CuPy, CPU or GPU each have their own generator); the keep rate and the scaling hold
    everywhere. A float16/bfloat16 graph draws its numbers in float32 (so its masks are those
    of a float32 graph on the same device) and applies the mask in its own dtype. The step
    counter is gpuflow's own: checkpoints keep it, weight files (`export_weights`,
    `load_weights`) leave it out, as torch.nn.Dropout has no state.
    """

    # state_dict() keys that checkpoints keep and weight files leave out (weights.py)
    checkpoint_only_state = ("steps",)

    def __init__(self, x: Node, p: float = 0.5, *, seed: int = 0, name: str | None = None):
        Node.__init__(self, [x], name=name)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise GraphError(f"{self.label}: p={p!r} must be a number in [0, 1) (the probability "
                             "of zeroing an entry).\nhelp: pass e.g. p=0.5.")
        self.p = float(p)
        self.seed = int(seed)
        self.steps = 0        # masks drawn so far
        self.mask: Any = None  # this step's mask, scaled (None: the identity)
        self._seed_in: Any = None  # set only while a compiled step is traced (plan.put_seeds)

    def forward(self) -> None:
        x = self.inbound_nodes[0].value
        if not self.training or self.p == 0.0:
            self.mask = None
            self.value = x
            return
        # `_seed_in`: the seed as an argument of a compiled step (gpuflow/compiled.py), which
        # computes _mix(seed, steps) itself, so the masks follow the same sequence as here.
        rng = self.device.rng(_mix(self.seed, self.steps) if self._seed_in is None
                              else self._seed_in)
        self.steps += 1
        ops, buffers = self.ops, self.buffers
        # float16/bfloat16 x: u in float32 (not every generator draws those, NumPy's does
        # not), so the masks are those of a float32 graph; the mask itself in x's dtype.
        wide = _statistics_dtype(self, x.dtype) or x.dtype
        u = rng.uniform(x.shape, wide, out=buffers["mask", x.shape, wide])
        out = u if wide == x.dtype else buffers["keep", x.shape, x.dtype]
        mask = ops.greater(u, self.p, x.dtype, out=out)    # kept with probability 1 - p
        self.mask = ops.multiply(mask, 1.0 / (1.0 - self.p), out=mask)
        self.value = ops.multiply(x, self.mask, out=buffers["value", x.shape, x.dtype])

    def backward(self) -> None:
        G = self.upstream_gradient()
        if self.mask is None:
            grad = G
        else:
            grad = self.ops.multiply(G, self.mask, out=self.buffers["grad", G.shape, G.dtype])
        self.gradients[self.inbound_nodes[0]] = grad

    def state_dict(self) -> dict[str, int]:
        """{'steps': masks drawn so far}: where the mask sequence resumes."""
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the mask sequence from `state_dict()`'s form."""
        if set(state) != {"steps"} or int(state["steps"]) < 0:
            raise GraphError(f"{self.label}: state {state!r} does not match; expected "
                             "{'steps': n >= 0}.\nhelp: load the state saved from a Dropout.")
        self.steps = int(state["steps"])


class BatchNorm(Node):
    """Batch normalisation per channel over x (N, C) or (N, C, H, W), as torch's BatchNorm1d/2d.

    gamma, beta: (C,). In training, the batch's mean and (biased) variance normalise x, and the
    running statistics move towards them: running = (1 - momentum) running + momentum batch,
    with the unbiased variance, as PyTorch does. In evaluation, the running statistics
    normalise x. `state_dict()` / `load_state_dict()` hold the running statistics.
    For float16/bfloat16 x (mixed precision), as torch's autocast: the statistics, running ones
    included, in float32 (a float16 variance overflows past 65504); the value and gradients in
    x's dtype.
    """

    def __init__(self, x: Node, gamma: Node, beta: Node, *, momentum: float = 0.1,
                 eps: float = 1e-5, name: str | None = None):
        Node.__init__(self, [x, gamma, beta], name=name)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   for v in (momentum, eps)) or not 0.0 <= momentum <= 1.0 or not eps > 0.0:
            raise GraphError(f"{self.label}: momentum={momentum!r} must be in [0, 1] and "
                             f"eps={eps!r} > 0.\nhelp: use the defaults, momentum=0.1, "
                             "eps=1e-5.")
        self.momentum, self.eps = float(momentum), float(eps)
        self.running_mean: Any = None  # (C,) on the device, made at the first forward
        self.running_var: Any = None

    def _layout(self, x: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(the axes statistics reduce over, the shape a (C,) vector broadcasts as)."""
        if x.ndim == 2:
            return (0,), (1, x.shape[1])
        if x.ndim == 4:
            return (0, 2, 3), (1, x.shape[1], 1, 1)
        raise GraphError(f"{self.label}: x has shape {tuple(x.shape)}; expected (N, C) or "
                         "(N, C, H, W).\nhelp: BatchNorm normalises each channel of a batch; "
                         "use LayerNorm for the last dimension of other shapes.")

    def _statistics(self, channels: int, dtype: Any) -> tuple[Any, Any]:
        """The running mean and variance on this device in `dtype` (zeros and ones at first)."""
        xp, device = self.xp, self.device
        mean, var = self.running_mean, self.running_var
        if mean is None or tuple(mean.shape) != (channels,):
            mean = xp.zeros((channels,), dtype=dtype, device=device.native)
            var = xp.ones((channels,), dtype=dtype, device=device.native)
        elif not device.owns(mean) or mean.dtype != dtype:  # loaded from host arrays
            mean = device.feed(mean, dtype, what=f"{self.label}.running_mean")
            var = device.feed(var, dtype, what=f"{self.label}.running_var")
        self.running_mean, self.running_var = mean, var
        return mean, var

    def forward(self) -> None:
        X, gamma, beta = self.inbound_nodes
        x = X.value
        self._layout(x)
        _check_vector(self, gamma, x.shape[1], "gamma")
        _check_vector(self, beta, x.shape[1], "beta")
        wide = _statistics_dtype(self, x.dtype)
        if wide is None:
            self.value = self._normalise(x, gamma.value, beta.value)
        else:  # statistics, running statistics and xhat in float32; the value in x's dtype
            xp = self.xp
            value = self._normalise(*(xp.astype(v, wide) for v in (x, gamma.value, beta.value)))
            self.value = xp.astype(value, x.dtype)

    def _normalise(self, x: Any, gamma: Any, beta: Any) -> Any:
        """The forward pass with x, gamma and beta all in one dtype; returns the value."""
        xp, ops, buffers = self.xp, self.ops, self.buffers
        axes, shape = self._layout(x)
        channels, dtype = x.shape[1], x.dtype
        running_mean, running_var = self._statistics(channels, dtype)
        self.batch_statistics = self.training
        self.count = count = math.prod(x.shape) // channels  # values per channel
        if self.training:
            if count < 2:
                raise GraphError(f"{self.label}: x has shape {tuple(x.shape)}, one value per "
                                 "channel: a batch variance needs at least two.\nhelp: train "
                                 "with batches of two or more examples (evaluation takes one).")
            mean = ops.sum(x, axis=axes, keepdims=True, out=buffers["mean", shape, dtype])
            mean = ops.multiply(mean, 1.0 / count, out=mean)
            centred = ops.subtract(x, mean, out=buffers["xhat", x.shape, dtype])
            square = ops.multiply(centred, centred, out=buffers["work", x.shape, dtype])
            var = ops.sum(square, axis=axes, keepdims=True, out=buffers["var", shape, dtype])
            var = ops.multiply(var, 1.0 / count, out=var)
            m = self.momentum
            self.running_mean = (1.0 - m) * running_mean + m * xp.reshape(mean, (channels,))
            self.running_var = ((1.0 - m) * running_var
                                + (m * count / (count - 1)) * xp.reshape(var, (channels,)))
        else:
            centred = ops.subtract(x, xp.reshape(running_mean, shape),
                                   out=buffers["xhat", x.shape, dtype])
            var = xp.reshape(running_var, shape)
        self.inv_std = 1.0 / xp.sqrt(var + self.eps)                         # (1, C[, 1, 1])
        self.xhat = ops.multiply(centred, self.inv_std, out=centred)
        value = ops.multiply(self.xhat, xp.reshape(gamma, shape),
                             out=buffers["value", x.shape, dtype])
        return ops.add(value, xp.reshape(beta, shape), out=value)

    def backward(self) -> None:
        _normalisation_backward(self)

    def _gradients(self, G: Any, gamma: Any) -> list[Any]:
        """[dx, dgamma, dbeta] (None where not needed) with G, gamma and xhat in one dtype."""
        xp, ops, buffers, xhat = self.xp, self.ops, self.buffers, self.xhat
        axes, shape = self._layout(xhat)
        need_x, need_gamma, need_beta = self.needs_grad
        dtype, gamma_r = G.dtype, xp.reshape(gamma, shape)
        dx = None
        # sum(G xhat) per channel: the gradient for gamma, and (times gamma) the variance's term.
        work = ops.multiply(G, xhat, out=buffers["work", G.shape, dtype])
        dgamma = ops.sum(work, axis=axes, keepdims=True, out=buffers["dgamma", shape, dtype])
        dbeta = ops.sum(G, axis=axes, keepdims=True, out=buffers["dbeta", shape, dtype])
        if need_x:
            scale = gamma_r * self.inv_std
            dx = ops.multiply(G, scale, out=buffers["dx", G.shape, dtype])
            if self.batch_statistics:  # the mean and variance depend on x too:
                # dx = gamma inv_std (G - mean(G) - xhat mean(G xhat)), means per channel
                term = ops.multiply(xhat, dgamma * (scale / self.count), out=work)
                dx = ops.subtract(dx, term, out=dx)
                dx = ops.subtract(dx, dbeta * (scale / self.count), out=dx)
        return [dx, xp.reshape(dgamma, (-1,)) if need_gamma else None,
                xp.reshape(dbeta, (-1,)) if need_beta else None]

    def state_arrays(self) -> dict[str, Any]:
        """The running statistics as they are (for Graph(check_finite=True)); none before the
        first forward pass."""
        if self.running_mean is None:
            return {}
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    def state_dict(self) -> dict[str, Any]:
        """{'running_mean': (C,), 'running_var': (C,)}: copies, on the graph's device (host
        arrays before the graph first runs)."""
        if self.running_mean is None:
            from ..backends.numpy import host_zeros
            channels = self.inbound_nodes[1].value.shape[0]
            return {"running_mean": host_zeros((channels,)),
                    "running_var": host_zeros((channels,)) + 1.0}
        xp = self.xp
        return {"running_mean": xp.asarray(self.running_mean, copy=True),
                "running_var": xp.asarray(self.running_var, copy=True)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the running statistics from `state_dict()`'s form (host or device arrays)."""
        gamma = self.inbound_nodes[1].value
        keys = {"running_mean", "running_var"}
        shapes = {tuple(getattr(v, "shape", ())) for v in state.values()}
        channels = gamma.shape[0] if gamma is not None else next(iter(shapes), (0,))[0]
        if set(state) != keys or shapes != {(channels,)}:
            found = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
            raise GraphError(f"{self.label}: state {found} does not match; expected "
                             f"running_mean and running_var of shape ({channels},).\nhelp: "
                             "load the state saved from a BatchNorm with as many channels.")
        mean, var = state["running_mean"], state["running_var"]
        if self.device is not None and gamma is not None:  # placed now, not inside a step
            dtype = _statistics_dtype(self, gamma.dtype) or gamma.dtype
            mean, var = (self.device.feed(v, dtype, what=f"{self.label} state")
                         for v in (mean, var))
        self.running_mean, self.running_var = mean, var


class LayerNorm(Node):
    """Normalisation over the last dimension of x (..., D), as torch's LayerNorm(D):
    (x - mean) / sqrt(var + eps) * gamma + beta, gamma and beta (D,). For float16/bfloat16 x,
    the statistics in float32 (as BatchNorm), the value and gradients in x's dtype."""

    def __init__(self, x: Node, gamma: Node, beta: Node, *, eps: float = 1e-5,
                 name: str | None = None):
        Node.__init__(self, [x, gamma, beta], name=name)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0.0:
            raise GraphError(f"{self.label}: eps={eps!r} must be > 0.\nhelp: use eps=1e-5.")
        self.eps = float(eps)
        self._fused: Any = None  # (x, mean, rstd) where the library's kernel ran forward

    def release(self) -> None:
        """Also let go of the fused kernel's saved arrays (on the device the graph leaves)."""
        self._fused = None
        Node.release(self)

    def forward(self) -> None:
        X, gamma, beta = self.inbound_nodes
        xp, x = self.xp, X.value
        _check_vector(self, gamma, x.shape[-1], "gamma")
        _check_vector(self, beta, x.shape[-1], "beta")
        wide = _statistics_dtype(self, x.dtype)
        if wide is None:
            self.value = self._normalise(x, gamma.value, beta.value)
        else:  # statistics and xhat in float32 (torch's autocast); the value in x's dtype
            value = self._normalise(*(xp.astype(v, wide) for v in (x, gamma.value, beta.value)))
            self.value = xp.astype(value, x.dtype)

    def _normalise(self, x: Any, gamma: Any, beta: Any) -> Any:
        """The forward pass with x, gamma and beta all in one dtype; returns the value. Where
        the device's ops have `layer_norm` (torch's native_layer_norm), that one kernel runs,
        and `layer_norm_backward` in the backward pass."""
        ops, buffers, dtype = self.ops, self.buffers, x.dtype
        scale = 1.0 / x.shape[-1]  # sums times 1/D: means in one reduction each
        rows = tuple(x.shape[:-1]) + (1,)
        self._fused = None
        if ops.layer_norm is not None:
            out = (buffers["value", tuple(x.shape), dtype], buffers["mean", rows, dtype],
                   buffers["inv_std", rows, dtype])
            value, mean, rstd = ops.layer_norm(x, gamma, beta, self.eps,
                                               out=None if any(o is None for o in out) else out)
            self._fused = (x, mean, rstd)
            return value
        mean = ops.sum(x, axis=-1, keepdims=True, out=buffers["mean", rows, dtype])
        mean = ops.multiply(mean, scale, out=mean)
        centred = ops.subtract(x, mean, out=buffers["xhat", tuple(x.shape), dtype])
        square = ops.multiply(centred, centred, out=buffers["work", tuple(x.shape), dtype])
        var = ops.sum(square, axis=-1, keepdims=True, out=buffers["inv_std", rows, dtype])
        var = ops.add(ops.multiply(var, scale, out=var), self.eps, out=var)
        self.inv_std = ops.divide(1.0, ops.sqrt(var, out=var), out=var)
        self.xhat = ops.multiply(centred, self.inv_std, out=centred)
        value = ops.multiply(self.xhat, gamma, out=buffers["value", tuple(x.shape), dtype])
        return ops.add(value, beta, out=value)

    def backward(self) -> None:
        _normalisation_backward(self)

    def _gradients(self, G: Any, gamma: Any) -> list[Any]:
        """[dx, dgamma, dbeta] (None where not needed) with G, gamma and xhat in one dtype."""
        if self._fused is not None:
            x, mean, rstd = self._fused
            return list(self.ops.layer_norm_backward(G, x, mean, rstd, gamma,
                                                     tuple(self.needs_grad)))
        ops, buffers, xhat = self.ops, self.buffers, self.xhat
        shape, dtype = tuple(xhat.shape), G.dtype
        rows, batch_axes = shape[:-1] + (1,), tuple(range(xhat.ndim - 1))
        need_x, need_gamma, need_beta = self.needs_grad
        dx = dgamma = dbeta = None
        work = buffers["work", shape, dtype]
        if need_x:  # dx = (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) inv_std
            dxhat = ops.multiply(G, gamma, out=buffers["dx", shape, dtype])
            scale = 1.0 / xhat.shape[-1]
            mean = ops.sum(dxhat, axis=-1, keepdims=True, out=buffers["mean", rows, dtype])
            mean = ops.multiply(mean, scale, out=mean)
            product = ops.multiply(dxhat, xhat, out=work)
            mean_product = ops.sum(product, axis=-1, keepdims=True,
                                   out=buffers["mean_product", rows, dtype])
            mean_product = ops.multiply(mean_product, scale, out=mean_product)
            dxhat = ops.subtract(dxhat, mean, out=dxhat)
            dxhat = ops.subtract(dxhat, ops.multiply(xhat, mean_product, out=work), out=dxhat)
            dx = ops.multiply(dxhat, self.inv_std, out=dxhat)
        if need_gamma:
            dgamma = ops.sum(ops.multiply(G, xhat, out=work), axis=batch_axes,
                             out=buffers["dgamma", shape[-1:], dtype])
        if need_beta:
            dbeta = ops.sum(G, axis=batch_axes, out=buffers["dbeta", shape[-1:], dtype])
        return [dx, dgamma, dbeta]
