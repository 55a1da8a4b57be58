"""Learning-rate schedules and gradient clipping, as in PyTorch (re-exported by gpuflow.optim).

A schedule sets `optimizer.lr` when it is made (epoch 0) and at every `step()`, once per epoch,
with PyTorch's chainable formulas, so a run gives the rates `torch.optim.lr_scheduler` gives:

    opt = Adam(graph, lr=1e-3)
    schedule = CosineAnnealingLR(opt, T_max=20)
    for epoch in range(20):
        for X, y in batches:
            graph.step(X, y); clip_grad_norm(graph, 1.0); opt.step()
        schedule.step()

Clipping rescales `p.gradients[p]` between the backward pass and the optimizer's step, on the
device and without reading anything back to the host.
"""

from __future__ import annotations

import math
from typing import Any

from .runtime import amp
from .errors import CheckpointError, GraphError, check_hyperparameter, check_int
from .nodes import Node

__all__ = ["LRSchedule", "StepLR", "ExponentialLR", "CosineAnnealingLR", "LinearLR",
           "WarmupCosineLR", "clip_grad_norm", "clip_grad_value"]


# -- learning-rate schedules ---------------------------------------------------------------------
class LRSchedule:
    """Base class: sets `optimizer.lr` at epoch 0 (when made) and at each `step()`.

    Subclasses give `_rate(lr)`, the rate for epoch `self.last_epoch` from the current one
    (PyTorch's chainable form: a rate set by hand between epochs carries on from there).
    `state_dict()` holds numbers only.
    """

    _hyper: tuple[str, ...] = ()  # the constructor's numbers, saved with the state

    def __init__(self, optimizer: Any) -> None:
        lr = getattr(optimizer, "lr", None)
        if not hasattr(optimizer, "step") or isinstance(lr, bool) or not isinstance(
                lr, (int, float)):
            raise ValueError(f"{type(self).__name__}: expected a gpuflow optimizer (with a "
                             f"numeric .lr), got {type(optimizer).__name__}.\n"
                             "help: pass e.g. gpuflow.optim.SGD(graph, lr=0.1).")
        self.optimizer = optimizer
        self.base_lr = float(lr)
        self.last_epoch = 0
        self._set(self._rate(self.base_lr))

    def _rate(self, lr: float) -> float:
        raise NotImplementedError

    def step(self) -> float:
        """Move to the next epoch; set and return its learning rate."""
        self.last_epoch += 1
        return self._set(self._rate(float(self.optimizer.lr)))

    def get_last_lr(self) -> list[float]:
        """[the rate set last], as PyTorch's schedulers return it (one entry per group)."""
        return [self.last_lr]

    def _set(self, lr: float) -> float:
        if not (math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"{type(self).__name__}: epoch {self.last_epoch} gives the "
                             f"learning rate {lr!r}.\nhelp: check the schedule's arguments.")
        self.last_lr = lr
        self.optimizer.lr = lr
        # The schedule checked it; a rate of 0 (the end of a cosine) is allowed here, as in
        # PyTorch, though a user passing lr=0 to an optimizer is refused.
        if hasattr(self.optimizer, "_checked_lr"):
            self.optimizer._checked_lr = lr
        return lr

    # -- state, for checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, float | int]:
        """{'last_epoch', 'base_lr', 'last_lr', and the constructor's numbers}: numbers only."""
        out: dict[str, float | int] = {"last_epoch": self.last_epoch, "base_lr": self.base_lr,
                                       "last_lr": self.last_lr}
        out.update({k: getattr(self, k) for k in self._hyper})
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output (checked first: `check_state`) and set the optimizer's
        rate to the saved last rate, so that training resumes where it stopped."""
        for key, value in self.check_state(state).items():
            setattr(self, key, value)
        self._set(self.last_lr)

    def check_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """`state` (a `state_dict()` of this kind of schedule) as the attribute values it
        restores; CheckpointError for a missing or extra key, a value that is not a finite
        number, a count that is not a whole number (epoch >= 0, sizes >= 1) or a negative
        rate. Changes nothing."""
        name = type(self).__name__
        expected = {"last_epoch", "base_lr", "last_lr", *self._hyper}
        missing = sorted(expected - set(state))
        extra = sorted(set(state) - expected)
        if missing or extra:
            raise CheckpointError(
                f"{name}.load_state_dict: the state has keys {sorted(state)}; missing "
                f"{missing}, unexpected {extra}.\nhelp: load the state of a {name} "
                "(schedule.state_dict() of the same kind of schedule).")
        values = {}
        for key in expected:
            value = state[key]
            if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
                value = value.item()  # a 0-d array read back from a checkpoint file
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value)):
                raise CheckpointError(f"{name}.load_state_dict: {key} is {value!r}, not a "
                                      "finite number.\nhelp: pass schedule.state_dict() output.")
            values[key] = value
        for key, value in values.items():
            low = 0 if key == "last_epoch" else 1
            if key in _INTEGERS and (value != int(value) or value < low):
                raise CheckpointError(f"{name}.load_state_dict: {key} is {value!r}, expected a "
                                      f"whole number >= {low}.\nhelp: pass "
                                      "schedule.state_dict() output.")
            if key not in _INTEGERS and value < 0:
                raise CheckpointError(f"{name}.load_state_dict: {key} is {value!r}, expected a "
                                      "number >= 0.\nhelp: pass schedule.state_dict() output.")
        return {key: int(value) if key in _INTEGERS else float(value)
                for key, value in values.items()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._hyper)
        return f"{type(self).__name__}({args}; epoch {self.last_epoch}, lr {self.last_lr:g})"


_INTEGERS = {"last_epoch", "step_size", "T_max", "total_iters", "warmup"}


class StepLR(LRSchedule):
    """Multiply the rate by `gamma` every `step_size` epochs."""

    _hyper = ("step_size", "gamma")

    def __init__(self, optimizer: Any, step_size: int, gamma: float = 0.1) -> None:
        self.step_size = check_int(step_size, "step_size", 1, where="StepLR", example=10)
        self.gamma = check_hyperparameter(gamma, "gamma", "StepLR", low_open=True, example="0.1")
        super().__init__(optimizer)

    def _rate(self, lr: float) -> float:
        if self.last_epoch == 0 or self.last_epoch % self.step_size:
            return lr
        return lr * self.gamma


class ExponentialLR(LRSchedule):
    """Multiply the rate by `gamma` every epoch."""

    _hyper = ("gamma",)

    def __init__(self, optimizer: Any, gamma: float) -> None:
        self.gamma = check_hyperparameter(gamma, "gamma", "ExponentialLR", low_open=True,
                                          example="0.1")
        super().__init__(optimizer)

    def _rate(self, lr: float) -> float:
        return lr if self.last_epoch == 0 else lr * self.gamma


class CosineAnnealingLR(LRSchedule):
    """eta_min + (base_lr - eta_min) (1 + cos(pi epoch / T_max)) / 2, in PyTorch's recursive
    form (past T_max the rate climbs back, as PyTorch's does)."""

    _hyper = ("T_max", "eta_min")

    def __init__(self, optimizer: Any, T_max: int, eta_min: float = 0.0) -> None:
        self.T_max = check_int(T_max, "T_max", 1, where="CosineAnnealingLR", example=50)
        self.eta_min = check_hyperparameter(eta_min, "eta_min", "CosineAnnealingLR",
                                            example="0.0")
        lr = getattr(optimizer, "lr", None)
        if isinstance(lr, (int, float)) and self.eta_min > lr:
            raise ValueError(f"CosineAnnealingLR: eta_min ({eta_min:g}) is above the "
                             f"optimizer's lr ({lr:g}); the rate would rise, not anneal.\n"
                             "help: pass eta_min below lr (e.g. eta_min=0.0).")
        super().__init__(optimizer)

    def _rate(self, lr: float) -> float:
        epoch, T, low = self.last_epoch, self.T_max, self.eta_min
        if epoch == 0:
            return lr
        if (epoch - 1 - T) % (2 * T) == 0:
            return lr + (self.base_lr - low) * (1 - math.cos(math.pi / T)) / 2
        return ((1 + math.cos(math.pi * epoch / T)) / (1 + math.cos(math.pi * (epoch - 1) / T))
                * (lr - low) + low)


class LinearLR(LRSchedule):
    """Linear warm-up (or decay): the rate goes from base_lr * start_factor at epoch 0 to
    base_lr * end_factor at epoch `total_iters`, then stays (PyTorch's LinearLR)."""

    _hyper = ("start_factor", "end_factor", "total_iters")

    def __init__(self, optimizer: Any, start_factor: float = 1.0 / 3, end_factor: float = 1.0,
                 total_iters: int = 5) -> None:
        self.start_factor = check_hyperparameter(start_factor, "start_factor", "LinearLR",
                                                 low_open=True, high=1, high_open=False,
                                                 example="0.1")
        self.end_factor = check_hyperparameter(end_factor, "end_factor", "LinearLR", high=1,
                                               high_open=False, example="1.0")
        self.total_iters = check_int(total_iters, "total_iters", 1, where="LinearLR", example=5)
        super().__init__(optimizer)

    def _rate(self, lr: float) -> float:
        epoch, start, end = self.last_epoch, self.start_factor, self.end_factor
        if epoch == 0:
            return lr * start
        if epoch > self.total_iters:
            return lr
        return lr * (1.0 + (end - start) / (self.total_iters * start + (epoch - 1) * (end - start)))


class WarmupCosineLR(LRSchedule):
    """A linear warm-up over `warmup` steps, then a cosine from base_lr down to `eta_min` at
    step `T_max` (the total, warm-up included): the schedule GPT training uses, as PyTorch
    users write it with

        SequentialLR(opt, [LinearLR(opt, start_factor, 1.0, total_iters=warmup),
                           CosineAnnealingLR(opt, T_max - warmup, eta_min)], milestones=[warmup])

    whose rates it gives (to rounding; tests/test_schedules.py). Step it once per optimizer
    step (or per epoch). start_factor: the first rate's share of base_lr; default 1 / (warmup
    + 1), nanoGPT's warm-up lr (step + 1) / (warmup + 1). The rate is computed in closed form
    from the step count alone (a rate set by hand is replaced at the next step); past T_max it
    climbs back, as CosineAnnealingLR's does.
    """

    _hyper = ("warmup", "T_max", "start_factor", "eta_min")

    def __init__(self, optimizer: Any, warmup: int, T_max: int, *,
                 start_factor: float | None = None, eta_min: float = 0.0) -> None:
        owner = "WarmupCosineLR"
        self.warmup = check_int(warmup, "warmup", 1, where=owner, example=100)
        self.T_max = check_int(T_max, "T_max", self.warmup + 1, where=owner, example=1000)
        self.start_factor = check_hyperparameter(
            1.0 / (self.warmup + 1) if start_factor is None else start_factor, "start_factor",
            owner, low_open=True, high=1, high_open=False, example="0.1")
        self.eta_min = check_hyperparameter(eta_min, "eta_min", owner, example="0.0")
        lr = getattr(optimizer, "lr", None)
        if isinstance(lr, (int, float)) and self.eta_min > lr:
            raise ValueError(f"{owner}: eta_min ({eta_min:g}) is above the optimizer's lr "
                             f"({lr:g}).\nhelp: pass eta_min below lr (e.g. eta_min=0.0).")
        super().__init__(optimizer)

    def _rate(self, lr: float) -> float:
        step, warmup, base = self.last_epoch, self.warmup, self.base_lr
        if step < warmup:
            return base * (self.start_factor + (1.0 - self.start_factor) * step / warmup)
        cosine = (1 + math.cos(math.pi * (step - warmup) / (self.T_max - warmup))) / 2
        return self.eta_min + (base - self.eta_min) * cosine


# -- gradient clipping ---------------------------------------------------------------------------
def _with_gradients(graph_or_parameters: Any, what: str) -> list[Node]:
    """The parameters of a Graph (or the nodes given) that are not frozen, each checked to have
    a gradient."""
    params = getattr(graph_or_parameters, "parameters", graph_or_parameters)
    if isinstance(params, Node):
        params = [params]
    try:
        params = list(params)
    except TypeError:
        raise ValueError(f"{what}: expected a Graph or a list of parameters, got "
                         f"{type(graph_or_parameters).__name__}.\nhelp: pass graph or "
                         "graph.parameters.") from None
    for p in params:
        if not isinstance(p, Node):
            raise ValueError(f"{what}: {p!r:.60} is a {type(p).__name__}, not a gpuflow node."
                             "\nhelp: pass graph or graph.parameters.")
    # Frozen parameters (trainable False) are skipped, as torch skips a .grad of None: the
    # graph computes no gradient for them, and one left from before freezing must not count.
    params = [p for p in params if getattr(p, "trainable", True)]
    missing = [p.label for p in params if p.gradients.get(p) is None]
    if missing:
        raise GraphError(f"{what}: {', '.join(missing)} has no gradient yet.\nhelp: run "
                         "graph.step(...) (forward and backward) before clipping.")
    return params


def _scaled(p: Node, grad: Any, factor: Any) -> Any:
    """grad * factor, written into a buffer of p's own: a gradient may be another node's
    array (or shared by two parameters, e.g. through an Add), which is never written into."""
    if not hasattr(grad, "shape"):  # a Python number (a custom node's scalar gradient)
        return grad * factor
    return p.ops.multiply(grad, factor, out=p.buffers["clipped gradient", grad.shape, grad.dtype])


def _squares(xp: Any, grad: Any) -> Any:
    """The sum of grad's squares as a device scalar, accumulated in float32 at least (a float16
    square overflows from 256 on)."""
    if not hasattr(grad, "shape"):
        return grad * grad
    if xp.isdtype(grad.dtype, "real floating") and grad.dtype != xp.float64 and (
            grad.dtype != xp.float32):
        grad = xp.astype(grad, xp.float32)
    flat = xp.reshape(grad, (-1,))
    return flat @ flat  # one BLAS dot, no temporary array


def clip_grad_norm(graph_or_parameters: Any, max_norm: float, *, eps: float = 1e-6) -> Any:
    """Scale every gradient by min(1, max_norm / (norm + eps)), norm being the L2 norm of all
    the gradients together (torch.nn.utils.clip_grad_norm_).

    graph_or_parameters: a Graph (its parameters) or an iterable of parameters, after
    `graph.step(...)` and before `optimizer.step()`. Returns the norm before clipping as a
    device scalar: nothing is read back to the host (no synchronisation) unless the caller
    reads it (`graph.item(norm)`). `p.gradients[p]` is replaced by the scaled gradient.
    """
    max_norm = check_hyperparameter(max_norm, "max_norm", "clip_grad_norm", low_open=True,
                                    example="1.0")
    params = _with_gradients(graph_or_parameters, "clip_grad_norm")
    if not params:
        raise ValueError("clip_grad_norm: no parameters to clip.\nhelp: pass graph or "
                         "graph.parameters.")
    with amp.quiet_float_errors(params):  # mixed precision: Inf gradients of a step it skips
        return _clip_norm(params, max_norm, eps)


def _clip_norm(params: list[Any], max_norm: float, eps: float) -> Any:
    xp = params[0].xp
    total = None
    for p in params:
        sq = _squares(xp, p.gradients[p])
        total = sq if total is None else total + sq
    norm = xp.sqrt(total) if hasattr(total, "dtype") else math.sqrt(total)
    # min(1, max_norm / (norm + eps)) as max_norm / max(norm + eps, max_norm): the same
    # number, with the one maximum every backend's ops have (Python scalars allowed).
    factor = max_norm / p.ops.maximum(norm + eps, max_norm)
    for p in params:
        grad = p.gradients[p]
        if hasattr(grad, "dtype") and hasattr(factor, "dtype") and factor.dtype != grad.dtype:
            factor_here = xp.astype(factor, grad.dtype)
        else:
            factor_here = factor
        p.gradients[p] = _scaled(p, grad, factor_here)
    return norm


def clip_grad_value(graph_or_parameters: Any, clip_value: float) -> None:
    """Clamp every gradient entry into [-clip_value, clip_value], on the device
    (torch.nn.utils.clip_grad_value_). `p.gradients[p]` is replaced by the clamped gradient."""
    clip_value = check_hyperparameter(clip_value, "clip_value", "clip_grad_value", low_open=True,
                                      example="1.0")
    for p in _with_gradients(graph_or_parameters, "clip_grad_value"):
        grad = p.gradients[p]
        if not hasattr(grad, "shape"):
            p.gradients[p] = min(max(grad, -clip_value), clip_value)
            continue
        ops = p.ops
        out = p.buffers["clipped gradient", grad.shape, grad.dtype]
        # min(max(g, -c), c) as -max(-max(g, -c), -c): negation is exact, and every backend's
        # ops have maximum (a minimum would be a new op for each of them).
        g = ops.maximum(grad, -clip_value, out=out)
        g = ops.multiply(g, -1.0, out=g if out is not None else None)
        g = ops.maximum(g, -clip_value, out=g if out is not None else None)
        p.gradients[p] = ops.multiply(g, -1.0, out=g if out is not None else None)
