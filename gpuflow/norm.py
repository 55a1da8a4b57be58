"""Regularisation and normalisation nodes: Dropout, BatchNorm, LayerNorm.

Dropout and BatchNorm behave differently in training and in evaluation (`node.training`, set by
the graph: training in `forward_and_backward` / `Graph.step`, evaluation in `forward_pass` /
`Graph.run`).
"""

from __future__ import annotations

from typing import Any

from .errors import GraphError
from .nodes import Node


def _check_vector(node: Node, which: Node, size: int, what: str) -> None:
    shape = tuple(which.value.shape)
    if shape != (size,):
        raise GraphError(f"{node.label}: {what} has shape {shape} but x has {size} "
                         f"{'channels' if isinstance(node, BatchNorm) else 'features'}; "
                         f"{what} must be ({size},).\nhelp: check the size of {which.label}.")


class Dropout(Node):
    """Inverted dropout: in training, each entry is zeroed with probability p and the others
    scaled by 1 / (1 - p); in evaluation, the identity.

    The masks are drawn on the graph's device (`device.rng(seed)`, no host round trip), one
    stream per node: the same seed gives the same masks, step after step, on the same device.
    Across devices the masks are the same on 'cpu' and the array_api_strict devices (NumPy's
    generator) and differ between libraries (torch, CuPy, CPU or GPU each have their own
    stream); the keep rate and the scaling hold everywhere.
    """

    def __init__(self, x: Node, p: float = 0.5, *, seed: int = 0, name: str | None = None):
        Node.__init__(self, [x], name=name)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise GraphError(f"{self.label}: p={p!r} must be a number in [0, 1) (the probability "
                             "of zeroing an entry).\nhelp: pass e.g. p=0.5.")
        self.p = float(p)
        self.seed = int(seed)
        self._rng: Any = None
        self._rng_device: Any = None  # the device `_rng` draws on
        self.mask: Any = None         # this step's mask, scaled (None: the identity)

    def forward(self) -> None:
        x = self.inbound_nodes[0].value
        if not self.training or self.p == 0.0:
            self.mask = None
            self.value = x
            return
        if self._rng_device is not self.device:
            self._rng, self._rng_device = self.device.rng(self.seed), self.device
        ops, buffers = self.ops, self.buffers
        u = self._rng.uniform(x.shape, x.dtype, out=buffers["mask", x.shape, x.dtype])
        mask = ops.greater(u, self.p, x.dtype, out=u)      # kept with probability 1 - p
        self.mask = ops.multiply(mask, 1.0 / (1.0 - self.p), out=mask)
        self.value = ops.multiply(x, self.mask, out=buffers["value", x.shape, x.dtype])

    def backward(self) -> None:
        G = self.upstream_gradient()
        if self.mask is None:
            grad = G
        else:
            grad = self.ops.multiply(G, self.mask, out=self.buffers["grad", G.shape, G.dtype])
        self.gradients[self.inbound_nodes[0]] = grad


class BatchNorm(Node):
    """Batch normalisation per channel over x (N, C) or (N, C, H, W), as torch's BatchNorm1d/2d.

    gamma, beta: (C,). In training, the batch's mean and (biased) variance normalise x, and the
    running statistics move towards them: running = (1 - momentum) running + momentum batch,
    with the unbiased variance, as PyTorch does. In evaluation, the running statistics
    normalise x. `state_dict()` / `load_state_dict()` hold the running statistics.
    """

    def __init__(self, x: Node, gamma: Node, beta: Node, *, momentum: float = 0.1,
                 eps: float = 1e-5, name: str | None = None):
        Node.__init__(self, [x, gamma, beta], name=name)
        if not 0.0 <= momentum <= 1.0 or not eps > 0.0:
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
        xp, x = self.xp, X.value
        axes, shape = self._layout(x)
        channels = x.shape[1]
        _check_vector(self, gamma, channels, "gamma")
        _check_vector(self, beta, channels, "beta")
        running_mean, running_var = self._statistics(channels, x.dtype)
        self.batch_statistics = self.training
        if self.training:
            count = x.shape[0] * (x.shape[2] * x.shape[3] if x.ndim == 4 else 1)
            if count < 2:
                raise GraphError(f"{self.label}: x has shape {tuple(x.shape)}, one value per "
                                 "channel: a batch variance needs at least two.\nhelp: train "
                                 "with batches of two or more examples (evaluation takes one).")
            mean = xp.mean(x, axis=axes, keepdims=True)
            centred = x - mean
            var = xp.mean(centred * centred, axis=axes, keepdims=True)
            m = self.momentum
            self.running_mean = (1.0 - m) * running_mean + m * xp.reshape(mean, (channels,))
            self.running_var = ((1.0 - m) * running_var
                                + (m * count / (count - 1)) * xp.reshape(var, (channels,)))
        else:
            centred = x - xp.reshape(running_mean, shape)
            var = xp.reshape(running_var, shape)
        self.inv_std = 1.0 / xp.sqrt(var + self.eps)
        self.xhat = centred * self.inv_std
        self.value = self.xhat * xp.reshape(gamma.value, shape) + xp.reshape(beta.value, shape)

    def backward(self) -> None:
        G = self.upstream_gradient()
        X, gamma, beta = self.inbound_nodes
        xp, xhat = self.xp, self.xhat
        axes, shape = self._layout(xhat)
        need_x, need_gamma, need_beta = self.needs_grad
        if need_x:
            dxhat = G * xp.reshape(gamma.value, shape)
            if self.batch_statistics:  # the mean and variance depend on x too
                dxhat = (dxhat - xp.mean(dxhat, axis=axes, keepdims=True)
                         - xhat * xp.mean(dxhat * xhat, axis=axes, keepdims=True))
            self.gradients[X] = dxhat * self.inv_std
        if need_gamma:
            self.gradients[gamma] = xp.sum(G * xhat, axis=axes)
        if need_beta:
            self.gradients[beta] = xp.sum(G, axis=axes)

    def state_dict(self) -> dict[str, Any]:
        """{'running_mean': (C,), 'running_var': (C,)}: copies, on the graph's device (host
        arrays before the graph first runs)."""
        if self.running_mean is None:
            from .backends.numpy import host_zeros
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
            dtype = gamma.dtype
            mean, var = (self.device.feed(v, dtype, what=f"{self.label} state")
                         for v in (mean, var))
        self.running_mean, self.running_var = mean, var


class LayerNorm(Node):
    """Normalisation over the last dimension of x (..., D), as torch's LayerNorm(D):
    (x - mean) / sqrt(var + eps) * gamma + beta, gamma and beta (D,)."""

    def __init__(self, x: Node, gamma: Node, beta: Node, *, eps: float = 1e-5,
                 name: str | None = None):
        Node.__init__(self, [x, gamma, beta], name=name)
        if not eps > 0.0:
            raise GraphError(f"{self.label}: eps={eps!r} must be > 0.\nhelp: use eps=1e-5.")
        self.eps = float(eps)

    def forward(self) -> None:
        X, gamma, beta = self.inbound_nodes
        xp, x = self.xp, X.value
        _check_vector(self, gamma, x.shape[-1], "gamma")
        _check_vector(self, beta, x.shape[-1], "beta")
        mean = xp.mean(x, axis=-1, keepdims=True)
        centred = x - mean
        self.inv_std = 1.0 / xp.sqrt(xp.mean(centred * centred, axis=-1, keepdims=True)
                                     + self.eps)
        self.xhat = centred * self.inv_std
        self.value = self.xhat * gamma.value + beta.value

    def backward(self) -> None:
        G = self.upstream_gradient()
        X, gamma, beta = self.inbound_nodes
        xp, xhat = self.xp, self.xhat
        batch_axes = tuple(range(xhat.ndim - 1))
        need_x, need_gamma, need_beta = self.needs_grad
        if need_x:
            dxhat = G * gamma.value
            dxhat = (dxhat - xp.mean(dxhat, axis=-1, keepdims=True)
                     - xhat * xp.mean(dxhat * xhat, axis=-1, keepdims=True))
            self.gradients[X] = dxhat * self.inv_std
        if need_gamma:
            self.gradients[gamma] = xp.sum(G * xhat, axis=batch_axes)
        if need_beta:
            self.gradients[beta] = xp.sum(G, axis=batch_axes)
