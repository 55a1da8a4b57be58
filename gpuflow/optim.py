"""Every parameter update: MiniFlow's `sgd_update`, and optimizers written once in
array-namespace code: SGD (momentum, Nesterov, weight decay), Adam and AdamW, with PyTorch's
update rules. Their state lives on the parameters' device.

An update uses what each operation returns and reassigns the state it keeps: `m *= b1` is an
update in place where arrays are mutable (NumPy, CuPy, torch, array_api_strict), and a new
array bound to `m` where they are immutable (JAX arrays have no in-place operators, so Python
computes `m * b1`); so `state["m"] = m` follows, and a new parameter value is assigned back.
Nothing writes with `x[...] = v`.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Iterable, Mapping

from .runtime import amp
from .backends import LEDGER
from .errors import CheckpointError, GraphError, check_hyperparameter  # noqa: F401 - re-exported
from .graph import Graph
from .nodes import Node
from .runtime.placement import LIVE


def check_learning_rate(learning_rate: float, name: str = "learning_rate") -> float:
    """`learning_rate` as a float; ValueError (naming the argument `name`, e.g. 'Adam: lr')
    unless it is a finite number > 0 (see `check_hyperparameter`)."""
    if type(learning_rate) is float and 0.0 < learning_rate < math.inf:
        return learning_rate  # the rate a loop passes every step: one comparison
    owner, _, argument = name.rpartition(": ")
    return check_hyperparameter(learning_rate, argument, owner or None, low_open=True,
                                example="1e-2")


def sgd_update(trainables: Iterable[Node], learning_rate: float = 1e-2) -> None:
    """`t.value -= learning_rate * t.gradients[t]` for each trainable."""
    lr = check_learning_rate(learning_rate)
    trainables = list(trainables)
    for t in trainables:  # all checked first: a refusal updates nothing
        if t.gradients.get(t) is None:
            raise GraphError(f"{t.label} has no gradient yet.\nhelp: run "
                             "forward_and_backward(graph) before sgd_update(trainables).")
    sgd_steps(trainables, lr)


def sgd_steps(trainables: Iterable[Node], lr: float) -> None:
    """`t.value -= lr * t.gradients[t]`, with no new array where the device writes into
    arrays (unchecked)."""
    for t in trainables:
        value, grad = t.value, t.gradients[t]
        fused = t.ops.subtract_scaled  # one kernel (torch's sub_)
        if fused is not None and t.device.owns(value) and t.device.owns(grad):
            fused(value, grad, lr)
            continue
        try:
            step = t.ops.multiply(grad, lr, out=t.buffers["sgd step", grad.shape, grad.dtype])
        except AttributeError:  # a Python number (a custom node's gradient for a scalar)
            step = lr * grad
        value -= step
        if value is not t.value:  # immutable arrays and scalars come back new
            t.value = value


# Every optimizer made registers in placement.LIVE (held weakly): device="fastest" times the
# update of those over a graph's parameters as part of its step.

_SCRATCH = ("optimizer work 0", "optimizer work 1", "optimizer work 2")


def _parameter_list(params: Any, owner: str) -> list[Node]:
    """The parameters an optimizer was given: a Graph's, a dict's values (the {name: Parameter}
    dict `gf.mlp` and `gf.dense` return), or an iterable of nodes; GraphError for anything else."""
    if isinstance(params, Graph):
        return list(params.parameters)
    if isinstance(params, Node):
        raise GraphError(f"{owner}: got one node, {params.label}, where a list of parameters "
                         f"belongs.\nhelp: pass [{params.name or 'node'}], or the Graph.")
    if isinstance(params, Mapping):
        params = params.values()
    try:
        found = list(params)
    except TypeError:
        found = None
    bad = next((p for p in found if not isinstance(p, Node)), None) if found is not None else None
    if found is None or bad is not None:
        what = (type(params).__name__ if found is None
                else f"an item {bad!r:.60} ({type(bad).__name__})")
        raise GraphError(f"{owner}: parameters must be gpuflow nodes; got {what}.\nhelp: pass "
                         "the Graph, graph.parameters, or the dict gf.mlp(...) returns.")
    return found


def check_betas(betas: Any, owner: str) -> tuple[float, float]:
    """Adam's `betas` as a pair of floats in [0, 1); ValueError naming `owner` otherwise."""
    try:
        pair = tuple(betas)
    except TypeError:
        pair = ()
    if isinstance(betas, (str, bytes)) or len(pair) != 2:
        raise ValueError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}.\n"
                         "help: pass e.g. betas=(0.9, 0.999).")
    return (check_hyperparameter(pair[0], "betas[0]", owner, high=1.0, example="0.9"),
            check_hyperparameter(pair[1], "betas[1]", owner, high=1.0, example="0.999"))


_SEVERAL = object()  # an optimizer's parameters record several graphs (or some none)


class Optimizer:
    """Base class: `step()` updates every parameter from `p.gradients[p]`.

    `lr` is the learning rate the next `step()` uses: set it between steps (a schedule from
    gpuflow.optim does, once per epoch) and it is checked once, at that step.

    params: the Graph, `graph.parameters`, the {name: Parameter} dict `gf.mlp` returns, or any
    iterable of parameters. Each form follows the graph's settings alike: a float16/bfloat16
    graph's float32 master weights and loss scaling, its `check_finite`. Over parameters
    that is the Graph whose step computed their gradients (so an optimizer made before its
    graph works too); parameters of two graphs, one of them mixed precision, are a GraphError
    at `step()` (one optimizer per graph); see gpuflow/runtime/amp.py.
    """

    def __init__(self, params: "Graph | Iterable[Node] | Mapping[str, Node]", lr: float) -> None:
        self.params = _parameter_list(params, type(self).__name__)
        self._graph = params if isinstance(params, Graph) else None  # for its check_finite
        if not self.params:
            raise GraphError(f"{type(self).__name__}: no parameters to optimise.\n"
                             "help: pass graph.parameters (Parameter nodes), or a Graph.")
        self.lr = self._checked_lr = check_learning_rate(lr, f"{type(self).__name__}: lr")
        self.t = 0  # steps taken
        self.state: dict[Node, dict[str, Any]] = {p: {} for p in self.params}
        # The Graph(s) whose settings apply: a float16/bfloat16 graph's float32 masters and
        # loss scale (`_amp`), check_finite. Optimizer(graph) follows that graph; over
        # parameters, the graph whose step computed their gradients, looked up again at a step
        # when a parameter records another one (the rule: gpuflow/runtime/amp.py). Private: not
        # hyper-parameters.
        self._source: Any = None  # the weak reference every parameter recorded, if one
        self._graphs: list[Graph] = []
        self._mixed: "amp.MixedPrecision | None" = None
        self._follow(self.params, strict=False)
        self._param: Node = self.params[0]   # the parameter `update` is working on
        self.ops: Any = self._param.ops       # its array operations, which take out=
        self._active: list[Node] = self.params  # not frozen (trainable): listed at each step
        LIVE.add(self)

    def step(self) -> None:
        """One update of every parameter from its current gradient (frozen ones, whose
        `trainable` is False, are skipped)."""
        if self.lr is not self._checked_lr:  # someone set a new rate: check it once
            self.lr = self._checked_lr = check_learning_rate(
                self.lr, f"{type(self).__name__}: lr")
        source, moved = self._source, self._graph is None and self._source is _SEVERAL
        # the parameters not frozen now, whatever was frozen or thawed since the last step
        self._active = active = [p for p in self.params if getattr(p, "trainable", True)]
        for p in active:  # all checked first: a refusal updates nothing
            if p.gradients.get(p) is None:
                raise GraphError(f"{p.label} has no gradient yet.\nhelp: run graph.step(...) "
                                 "(forward and backward) before optimizer.step().")
            if p._graph is not source:  # another graph stepped it (or several graphs did)
                moved = True
        if self._graph is not None:  # Optimizer(graph): the graph's own mixed precision, now
            self._mixed = self._graph.amp
        elif moved:
            self._follow(active, strict=True)
        if self._mixed is not None:  # float32 master weights, loss scaling: see gpuflow/runtime/amp.py
            self._mixed.optimizer_step(self)
            return
        self.t += 1
        self._update_all()
        if any(g.check_finite for g in self._graphs):
            self._check_finite()

    def _follow(self, params: list[Node], strict: bool) -> None:
        """Find the graph(s) this optimizer follows (see __init__) from `params` (those not
        frozen); GraphError if `strict` (at a step) for parameters of several graphs, one of
        them mixed precision."""
        if self._graph is not None:
            self._graphs = [self._graph]
        else:
            refs = {id(p._graph): p._graph for p in params}  # weak references: no hash
            self._source = next(iter(refs.values())) if len(refs) == 1 else _SEVERAL
            self._graphs = amp.graphs_of(params)
        self._mixed = amp.for_optimizer(type(self).__name__, self._graphs, strict)

    @property
    def _amp(self) -> "amp.MixedPrecision | None":
        """The graph's mixed precision this optimizer follows, or None, looked up now (over
        parameters: an optimizer made before its graph finds it once the graph is built;
        compile_step and device='fastest' read it before any step)."""
        self._follow(self._active, strict=False)
        return self._mixed

    def _check_finite(self) -> None:
        """GraphError naming this optimizer and the first parameter its update made NaN/Inf."""
        arrays = [p for p in self.params if getattr(p.value, "shape", None) is not None]
        if not arrays:
            return
        xp, device = arrays[0].xp, arrays[0].device
        flags = xp.stack([xp.all(xp.isfinite(p.value)) for p in arrays])
        with LEDGER.allowed():
            host = device.to_host(flags, what="finite check")
        if all(bool(f) for f in host):
            return
        p = arrays[[bool(f) for f in host].index(False)]
        raise GraphError(f"non-finite number (NaN or Inf) first appeared in {type(self).__name__}"
                         f"'s update of {p.label} (shape {tuple(p.value.shape)}) at optimizer "
                         f"step {self.t}.\nhelp: lower the learning rate, or train in float32 "
                         "(float16 overflows above 65504).")

    def _update_all(self) -> None:
        for p in self._active:
            value = p.value
            self._param, self.ops = p, p.ops
            new = self.update(p.xp, value, p.gradients[p], self.state[p])
            if new is not value:  # immutable arrays (JAX) and 0-d scalars come back new
                p.value = new

    def _state_dtype(self, p: Node) -> Any:
        """The dtype of `p`'s optimizer state: its own, or float32 under mixed precision."""
        return self._mixed.master_dtype if self._mixed is not None else p.value.dtype

    def update(self, xp: Any, value: Any, grad: Any, state: dict[str, Any]) -> Any:
        """The updated `value`, from `grad`: `value` itself, updated in place, where arrays are
        mutable; a new array where they are not (JAX, NumPy's 0-d scalars). `state` holds this
        parameter's arrays: reassign its entries. Never write into `grad`: it is the graph's
        gradient, which the user may read after the step."""
        raise NotImplementedError

    def scratch(self, like: Any, index: int = 0) -> Any:
        """Work array `index` shaped like `like` (the parameter being updated) for `self.ops`
        functions to write into; None where the graph makes new arrays every step (see
        gpuflow/runtime/buffers.py). Kept from step to step, one set per parameter."""
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
        self._follow(self.params, strict=False)  # the state's dtype: float32 if mixed precision
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
            new[p][buf] = p.device.put(host, self._state_dtype(p),
                                       what=f"optimizer state {key}")
        self.state = new
        self.t = int(state.get("t", 0))


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and weight decay
    (PyTorch's rule: buf = momentum * buf + g; step along g + momentum * buf if Nesterov)."""

    def __init__(self, params: "Graph | Iterable[Node]", lr: float = 1e-2, *,
                 momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        momentum = check_hyperparameter(momentum, "momentum", "SGD", example="0.9")
        weight_decay = check_hyperparameter(weight_decay, "weight_decay", "SGD", example="1e-4")
        if nesterov not in (True, False):
            raise ValueError(f"SGD: nesterov must be True or False, got {nesterov!r}.\n"
                             "help: pass nesterov=True (with momentum > 0) or leave it out.")
        if nesterov and momentum == 0:
            raise ValueError("SGD: Nesterov momentum needs momentum > 0.\n"
                             "help: pass e.g. momentum=0.9 with nesterov=True.")
        super().__init__(params, lr)
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay

    def _update_all(self) -> None:
        if self.momentum or self.weight_decay or type(self).update is not SGD.update:
            super()._update_all()
        else:  # plain SGD, the most common step: one multiply and one subtract per parameter
            sgd_steps(self._active, self.lr)

    def update(self, xp: Any, value: Any, grad: Any, state: dict[str, Any]) -> Any:
        ops, scratch = self.ops, self.scratch
        work = other = None  # grad + weight_decay * value; grad + momentum * buf (Nesterov)
        if self.weight_decay:
            work = scratch(value)
            grad = ops.add(grad, ops.multiply(value, self.weight_decay, out=work), out=work)
        if self.momentum:
            buf = state.get("momentum")
            if buf is None:
                buf = xp.asarray(grad, copy=True)
            else:
                buf *= self.momentum
                buf += grad
            state["momentum"] = buf  # a new array where arrays are immutable
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
        owner = type(self).__name__
        betas = check_betas(betas, owner)
        eps = check_hyperparameter(eps, "eps", owner, low_open=True, example="1e-8")
        weight_decay = check_hyperparameter(weight_decay, "weight_decay", owner, example="1e-2")
        super().__init__(params, lr)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay

    def _state_dtype(self, p: Node) -> Any:
        return p.xp.float32 if _narrow(p.xp, p.value.dtype) else p.value.dtype

    def update(self, xp: Any, value: Any, grad: Any, state: dict[str, Any]) -> Any:
        b1, b2 = self.betas
        narrow = value.dtype if _narrow(xp, value.dtype) else None
        if narrow is not None:
            # float16: eps = 1e-8 rounds to 0 and grad^2 underflows, so sqrt(v) + eps is 0 and
            # the step NaN. The moments and the step are float32; only the result is rounded.
            grad = xp.astype(grad, xp.float32)
        like = value if narrow is None else grad  # the dtype of the moments and the step
        ops, work = self.ops, self.scratch(like)
        if self.weight_decay and self.decoupled:
            value *= 1.0 - self.lr * self.weight_decay
        elif self.weight_decay:
            decayed = self.scratch(like, 1)
            wide = value if narrow is None else xp.astype(value, grad.dtype)
            grad = ops.add(grad, ops.multiply(wide, self.weight_decay, out=decayed),
                           out=decayed)
        if "m" not in state:
            state["m"] = xp.zeros_like(like)
            state["v"] = xp.zeros_like(like)
        m, v = state["m"], state["v"]
        m *= b1
        m += ops.multiply(grad, 1.0 - b1, out=work)
        v *= b2
        squares = ops.multiply(grad, grad, out=work)
        squares *= 1.0 - b2
        v += squares
        state["m"], state["v"] = m, v  # new arrays where arrays are immutable
        bias1 = 1.0 - b1 ** self.t
        bias2 = 1.0 - b2 ** self.t
        denom = ops.sqrt(v, out=work)   # sqrt(v) / sqrt(bias2) + eps
        denom /= bias2 ** 0.5  # not math.sqrt: bias2 is traced under jax.jit
        denom += self.eps
        step = ops.divide(m, denom, out=work)   # (lr / bias1) * m / denom
        step *= self.lr / bias1
        value -= step if narrow is None else xp.astype(step, narrow)
        return value


_NARROW: dict[Any, bool] = {}  # (xp, dtype) -> _narrow(xp, dtype): isdtype costs microseconds


def _narrow(xp: Any, dtype: Any) -> bool:
    """Whether `dtype` is a floating dtype narrower than float32 (float16): too narrow for
    Adam's eps and second moment."""
    key = (xp, dtype)  # xp first: dtypes of two libraries are never compared
    try:
        return _NARROW[key]
    except (KeyError, TypeError):
        narrow = bool(xp.isdtype(dtype, "real floating") and xp.finfo(dtype).bits < 32)
        try:
            _NARROW[key] = narrow
        except TypeError:
            pass
        return narrow


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
                        StepLR, WarmupCosineLR, clip_grad_norm, clip_grad_value)
from .averaging import EMA  # noqa: E402,F401 - weight averaging, after the optimizers
