"""Every parameter update: MiniFlow's `sgd_update`, and optimizers written once in
array-namespace code: SGD (momentum, Nesterov, weight decay), Adam and AdamW, with PyTorch's
update rules. Their state lives on the parameters' device and is updated in place."""

from __future__ import annotations

import math
from typing import Any, Iterable

from .errors import CheckpointError, GraphError
from .graph import Graph
from .nodes import Node


def check_learning_rate(learning_rate: float, name: str = "learning_rate") -> float:
    """`learning_rate` as a float; ValueError (naming the argument `name`) unless it is finite
    and positive."""
    # float() would also take "0.1" (e.g. an argparse option without type=float) and True.
    not_a_number = isinstance(learning_rate, (str, bytes, bool))
    try:
        lr = float(learning_rate)
    except (TypeError, ValueError):
        not_a_number = True
    if not_a_number:
        raise ValueError(f"{name} must be a number, got {learning_rate!r}.\n"
                         f"help: pass e.g. {name.rsplit(' ', 1)[-1]}=1e-2 (a float).")
    if not (math.isfinite(lr) and lr > 0.0):
        raise ValueError(f"{name} must be a finite number > 0, got {learning_rate!r}.\n"
                         f"help: pass e.g. {name.rsplit(' ', 1)[-1]}=1e-2.")
    return lr


_last_rate = math.nan  # the last learning rate sgd_update checked (NaN: none yet)


def sgd_update(trainables: Iterable[Node], learning_rate: float = 1e-2) -> None:
    """`t.value -= learning_rate * t.gradients[t]` for each trainable, in place."""
    global _last_rate
    if type(learning_rate) is float and learning_rate == _last_rate:
        lr = learning_rate  # the rate a loop passes every step: checked once
    else:
        lr = _last_rate = check_learning_rate(learning_rate)
    trainables = list(trainables)
    for t in trainables:  # all checked first: a refusal updates nothing
        if t.gradients.get(t) is None:
            raise GraphError(f"{t.label} has no gradient yet.\nhelp: run "
                             "forward_and_backward(graph) before sgd_update(trainables).")
    sgd_steps(trainables, lr)


def sgd_steps(trainables: Iterable[Node], lr: float) -> None:
    """`t.value -= lr * t.gradients[t]` in place, with no new array (unchecked)."""
    for t in trainables:
        value, grad = t.value, t.gradients[t]
        try:
            step = t.ops.multiply(grad, lr, out=t.buffers["sgd step", grad.shape, grad.dtype])
        except AttributeError:  # a Python number (a custom node's gradient for a scalar)
            step = lr * grad
        value -= step
        if value is not t.value:  # a scalar (immutable) comes back new
            t.value = value


_SCRATCH = ("optimizer work 0", "optimizer work 1", "optimizer work 2")


class Optimizer:
    """Base class: `step()` updates every parameter from `p.gradients[p]`, in place.

    `lr` is the learning rate the next `step()` uses: set it between steps (a schedule from
    gpuflow.optim does, once per epoch) and it is checked once, at that step.
    """

    def __init__(self, params: "Graph | Iterable[Node]", lr: float) -> None:
        self.params = list(params.parameters if isinstance(params, Graph) else params)
        if not self.params:
            raise GraphError(f"{type(self).__name__}: no parameters to optimise.\n"
                             "help: pass graph.parameters (Parameter nodes), or a Graph.")
        self.lr = self._checked_lr = check_learning_rate(lr, f"{type(self).__name__}: lr")
        self.t = 0  # steps taken
        self.state: dict[Node, dict[str, Any]] = {p: {} for p in self.params}
        self._param: Node = self.params[0]   # the parameter `update` is working on
        self.ops: Any = self._param.ops       # its array operations, which take out=

    def step(self) -> None:
        """One update of every parameter from its current gradient."""
        if self.lr is not self._checked_lr:  # someone set a new rate: check it once
            self.lr = self._checked_lr = check_learning_rate(
                self.lr, f"{type(self).__name__}: lr")
        for p in self.params:  # all checked first: a refusal updates nothing
            if p.gradients.get(p) is None:
                raise GraphError(f"{p.label} has no gradient yet.\nhelp: run graph.step(...) "
                                 "(forward and backward) before optimizer.step().")
        self.t += 1
        self._update_all()

    def _update_all(self) -> None:
        for p in self.params:
            value = p.value
            self._param, self.ops = p, p.ops
            new = self.update(p.xp, value, p.gradients[p], self.state[p])
            if new is not value:  # an immutable scalar (a fed Python number) comes back new
                p.value = new

    def update(self, xp: Any, value: Any, grad: Any, state: dict[str, Any]) -> Any:
        """Update `value` in place from `grad` and return it (a new object only if `value` is
        an immutable scalar); `state` holds this parameter's buffers. Never write into `grad`:
        it is the graph's gradient, which the user may read after the step."""
        raise NotImplementedError

    def scratch(self, like: Any, index: int = 0) -> Any:
        """Work array `index` shaped like `like` (the parameter being updated) for `self.ops`
        functions to write into; None where the graph makes new arrays every step (see
        gpuflow/buffers.py). Kept from step to step, one set per parameter."""
        return self._param.buffers[_SCRATCH[index], like.shape, like.dtype]

    # -- state, for checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """{'t': steps, '<param name>/<buffer>': host array, ...}."""
        out: dict[str, Any] = {"t": self.t}
        for p in self.params:
            for key, buf in self.state[p].items():
                out[f"{p.name}/{key}"] = p.device.to_host(buf, what=f"optimizer state {key}")
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output onto the parameters' device (checked first)."""
        names = {p.name: p for p in self.params}
        new: dict[Node, dict[str, Any]] = {p: {} for p in self.params}
        for key, host in state.items():
            if key == "t":
                continue
            name, _, buf = key.rpartition("/")
            p = names.get(name)
            if p is None:
                raise CheckpointError(f"optimizer state names parameter {name!r}, which this "
                                      f"model lacks (it has {sorted(names)}).")
            if tuple(host.shape) != tuple(p.value.shape):
                raise CheckpointError(f"optimizer state {key!r} has shape {tuple(host.shape)}, "
                                      f"but {p.label} has shape {tuple(p.value.shape)}.")
            new[p][buf] = p.device.put(host, p.value.dtype, what=f"optimizer state {key}")
        self.state = new
        self.t = int(state.get("t", 0))


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and weight decay
    (PyTorch's rule: buf = momentum * buf + g; step along g + momentum * buf if Nesterov)."""

    def __init__(self, params: "Graph | Iterable[Node]", lr: float = 1e-2, *,
                 momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: momentum ({momentum}) and weight_decay ({weight_decay}) "
                             "must be >= 0.")
        if nesterov and momentum == 0:
            raise ValueError("SGD: Nesterov momentum needs momentum > 0.")
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay

    def _update_all(self) -> None:
        if self.momentum or self.weight_decay or type(self).update is not SGD.update:
            super()._update_all()
        else:  # plain SGD, the most common step: one multiply and one subtract per parameter
            sgd_steps(self.params, self.lr)

    def update(self, xp: Any, value: Any, grad: Any, state: dict[str, Any]) -> Any:
        ops, scratch = self.ops, self.scratch
        work = other = None  # grad + weight_decay * value; grad + momentum * buf (Nesterov)
        if self.weight_decay:
            work = scratch(value)
            grad = ops.add(grad, ops.multiply(value, self.weight_decay, out=work), out=work)
        if self.momentum:
            buf = state.get("momentum")
            if buf is None:
                buf = state["momentum"] = xp.asarray(grad, copy=True)
            else:
                buf *= self.momentum
                buf += grad
            if self.nesterov:
                other = scratch(value, 1)
                grad = ops.add(grad, ops.multiply(buf, self.momentum, out=other), out=other)
            else:
                grad = buf
        own = grad is work or grad is other  # our work array: scaled in place
        value -= ops.multiply(grad, self.lr, out=grad if own else scratch(value, 2))
        return value


class Adam(Optimizer):
    """Adam (Kingma & Ba), PyTorch's formulation; weight_decay adds an L2 term to the gradient."""

    decoupled = False

    def __init__(self, params: "Graph | Iterable[Node]", lr: float = 1e-3, *,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or eps <= 0 or weight_decay < 0:
            raise ValueError(f"{type(self).__name__}: need 0 <= betas < 1 (got {betas}), "
                             f"eps > 0 (got {eps}) and weight_decay >= 0 (got {weight_decay}).")
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay

    def update(self, xp: Any, value: Any, grad: Any, state: dict[str, Any]) -> Any:
        b1, b2 = self.betas
        ops, work = self.ops, self.scratch(value)
        if self.weight_decay and self.decoupled:
            value *= 1.0 - self.lr * self.weight_decay
        elif self.weight_decay:
            decayed = self.scratch(value, 1)
            grad = ops.add(grad, ops.multiply(value, self.weight_decay, out=decayed),
                           out=decayed)
        if "m" not in state:
            state["m"] = xp.zeros_like(value)
            state["v"] = xp.zeros_like(value)
        m, v = state["m"], state["v"]
        m *= b1
        m += ops.multiply(grad, 1.0 - b1, out=work)
        v *= b2
        squares = ops.multiply(grad, grad, out=work)
        squares *= 1.0 - b2
        v += squares
        bias1 = 1.0 - b1 ** self.t
        bias2 = 1.0 - b2 ** self.t
        denom = ops.sqrt(v, out=work)   # sqrt(v) / sqrt(bias2) + eps
        denom /= math.sqrt(bias2)
        denom += self.eps
        step = ops.divide(m, denom, out=work)   # (lr / bias1) * m / denom
        step *= self.lr / bias1
        value -= step
        return value


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): value *= 1 - lr * weight_decay."""

    decoupled = True

    def __init__(self, params: "Graph | Iterable[Node]", lr: float = 1e-3, *,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        super().__init__(params, lr, betas=betas, eps=eps, weight_decay=weight_decay)


OPTIMIZERS = {"sgd": SGD, "momentum": SGD, "nesterov": SGD, "adam": Adam, "adamw": AdamW}


def make_optimizer(name: str, params: "Graph | Iterable[Node]", lr: float,
                   **options: Any) -> Optimizer:
    """An optimizer by name: 'sgd', 'momentum' (SGD, 0.9), 'nesterov', 'adam', 'adamw'."""
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}.")
    if key == "momentum":
        options.setdefault("momentum", 0.9)
    if key == "nesterov":
        options.setdefault("momentum", 0.9)
        options["nesterov"] = True
    return OPTIMIZERS[key](params, lr, **options)


from .schedules import (CosineAnnealingLR, ExponentialLR, LinearLR, LRSchedule,  # noqa: E402
                        StepLR, clip_grad_norm, clip_grad_value)
