"""Mixed precision for `Graph(..., dtype="float16" | "bfloat16")`: float32 master weights and
loss scaling, as `torch.amp.GradScaler` does it.

The graph computes in the low precision: every value, and the gradients of the backward pass,
in float16 (or bfloat16). Small gradients would underflow float16 (below 6e-8), so the backward
pass starts from `scale` instead of 1 (the loss's seed), and `Graph.step` hands each parameter
its gradient divided by `scale`, in float32 (`p.gradients[p]`: true gradients, so that clipping
and reading them need not know about the scale). The optimizer updates float32 master copies
of the parameters (its state is float32 too) and rounds them into the parameters' values.

Dynamic scaling (the default): a step whose gradients hold an Inf or NaN (the scaled backward
overflowed) is skipped: no parameter, optimizer state or step count changes, and the scale
halves. After `growth_interval` good steps in a row the scale doubles. Such an overflow is
expected: NumPy's warnings for it are off within the graph's step, the optimizer's step and a
gradient clip (`Device.quiet_float_errors`), and only there. Deciding to skip needs
one read of a device flag per optimizer step (torch's GradScaler.step reads one too). Several
optimizers over one graph's parameters (parameter groups) each skip on their own gradients,
and the scale changes once per graph step, backing off if any of them overflowed (torch's
GradScaler.update after several `scaler.step(opt)`).
`loss_scale=<number>` scales statically: an overflow then raises a GraphError (nothing is
updated) instead of silently skipping forever; `loss_scale=1` is plain low precision with
master weights. Nothing ever turns NaN silently: a scale that falls below 2**-24 (the
gradients overflow even unscaled) raises.

bfloat16 exists on torch devices; NumPy has none (ml_dtypes adds a storage type, but NumPy's
matmul and ufuncs would run on it emulated and slowly), which is said with a clear error.

Which graph's mixed precision an optimizer follows: every way of passing parameters gives the
same. `Adam(graph)` follows that graph. `Adam(graph.parameters)`, `Adam(params)` (the dict
`gf.mlp` returns) or any list of parameters follow the Graph whose `step` computed their
gradients: each `Graph.step` records itself on its parameters (`p._graph`, a weak reference,
written by gpuflow/runtime/plan.py's `record_graph`, the one writer of a node's private
attributes; before any step, the first Graph built over a parameter holds it), and
`optimizer.step()` reads that record, so an optimizer made before its graph, or over part of
a graph's parameters, gets it too. Parameters that no Graph holds (MiniFlow's
`topological_sort`) get plain updates. One optimizer over parameters whose gradients come
from two graphs, one of them mixed precision, is a GraphError at its step: each such graph
scales its gradients by its own loss scale (make one optimizer per graph).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from ..backends import LEDGER, NULL_SCOPE, Device, dtype_name
from ..errors import GraphError
from . import plan

LOW_PRECISION = ("float16", "bfloat16")
MIN_SCALE = 2.0 ** -24  # float16's smallest subnormal: below it, scaling cannot help


def low_precision_name(dtype: Any) -> str | None:
    """'float16' / 'bfloat16' for such a dtype (name, NumPy or namespace dtype), else None."""
    if dtype is None:
        return None
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    return name if name in LOW_PRECISION else None


def for_graph(device: Device, dtype: Any, loss_scale: Any) -> "MixedPrecision | None":
    """The mixed-precision machinery for a Graph of `dtype` on `device` (None for float32 and
    wider); GraphError for a dtype the device lacks or a bad `loss_scale`."""
    name = low_precision_name(dtype)
    if name is None:
        if not _is_default_scale(loss_scale):
            raise GraphError(f"Graph(loss_scale={loss_scale!r}) needs dtype='float16' or "
                             f"'bfloat16'; this graph is {dtype!r}, which needs no loss scaling."
                             "\nhelp: drop loss_scale, or pass dtype='float16'.")
        return None
    if name not in device._dtypes:
        if name == "bfloat16":
            raise GraphError(
                f"dtype 'bfloat16' on {device.name}: {device.backend} has no bfloat16 (for "
                "NumPy, ml_dtypes adds a storage type, but NumPy's matmul and ufuncs would only "
                "emulate it, slowly).\nhelp: use device='torch:cpu' or 'torch:cuda' for "
                "bfloat16, or dtype='float16'.")
        raise GraphError(f"dtype {name!r} on {device.name}: {device.backend} has no {name}.\n"
                         "help: pass dtype='float32', or a device whose library has it "
                         "('cpu', 'torch:cpu', 'cuda').")
    return MixedPrecision(device, name, LossScaler.from_option(loss_scale))


def _is_default_scale(loss_scale: Any) -> bool:
    return isinstance(loss_scale, str) and loss_scale == "dynamic"


class LossScaler:
    """The loss scale and its dynamic rule (torch.amp.GradScaler's defaults)."""

    def __init__(self, scale: float = 2.0 ** 16, *, dynamic: bool = True,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000) -> None:
        self.scale = float(scale)
        self.dynamic = dynamic
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0   # good steps since the scale last changed
        self.skipped = 0      # steps skipped for an overflow, in all

    @classmethod
    def from_option(cls, loss_scale: Any) -> "LossScaler":
        """'dynamic' (the default), or a number > 0 for a static scale."""
        if _is_default_scale(loss_scale):
            return cls()
        number = isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool)
        if not number or not math.isfinite(loss_scale) or loss_scale <= 0:
            raise GraphError(f"Graph(loss_scale={loss_scale!r}): expected 'dynamic' or a "
                             "finite number > 0.\nhelp: pass loss_scale='dynamic' (the default), "
                             "or e.g. loss_scale=1024 for a static scale.")
        return cls(float(loss_scale), dynamic=False)

    def update(self, finite: bool) -> None:
        """After a step: back off (overflow) or count a good step, growing after a run."""
        if not self.dynamic:
            return
        if not finite:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            grown = self.scale * self.growth_factor
            if math.isfinite(grown):
                self.scale = grown
            self.good_steps = 0

    def state_dict(self) -> dict[str, float | int]:
        """Numbers only, for checkpoints."""
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output."""
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.skipped = int(state["skipped"])


class MixedPrecision:
    """A Graph's float32 master weights and loss scale (see the module's docstring)."""

    def __init__(self, device: Device, name: str, scaler: LossScaler) -> None:
        self.device = device
        self.name = name            # 'float16' or 'bfloat16'
        self.scaler = scaler
        self.master_dtype = device.xp.float32
        self.master: dict[Any, Any] = {}   # parameter -> its float32 master value
        self._written: dict[Any, Any] = {}  # parameter -> the value we last gave it
        # Whether this graph step's gradients were found finite by an optimizer (None: no
        # optimizer has looked yet): the scale changes once per graph step.
        self._verdict: bool | None = None

    def __repr__(self) -> str:
        kind = "dynamic" if self.scaler.dynamic else "static"
        return (f"MixedPrecision({self.name}, float32 masters, {kind} loss scale "
                f"{self.scaler.scale:g}, {self.scaler.skipped} steps skipped)")

    def move_to(self, other: "MixedPrecision") -> None:
        """Take `other`'s device (the graph moved): masters are made again from the values."""
        self.device, self.name, self.master_dtype = other.device, other.name, other.master_dtype
        self.master, self._written = {}, {}

    def values_kept(self) -> None:
        """The parameters' values are new arrays with the numbers the masters were rounded to
        (the graph moved away and back, `Graph.trial`): the masters stay valid."""
        self._written = {p: p.value for p in self._written}

    # -- Graph.step --------------------------------------------------------------------------
    def before_step(self, graph: Any) -> None:
        """The backward pass starts from the scale instead of 1."""
        graph.plan.seed_loss(self.scaler.scale)
        self._verdict = None

    def after_step(self, graph: Any) -> None:
        """Each parameter's gradient unscaled into float32 (device work, no read back).

        Frozen parameters (trainable False) are skipped, as the optimizer skips them: the
        backward gave them no new gradient, and their last one, unscaled already, stays as
        it was (as in float32) instead of being divided by the scale again at every step."""
        xp, inverse = self.device.xp, 1.0 / self.scaler.scale
        for p in graph.parameters:
            if not getattr(p, "trainable", True):
                continue
            grad = p.gradients.get(p)
            if grad is None or not hasattr(grad, "dtype"):
                continue
            wide = xp.astype(grad, self.master_dtype)  # a new array: ours to scale in place
            p.gradients[p] = p.ops.multiply(wide, inverse, out=wide if p.ops.writes_out else None)

    # -- Optimizer.step ----------------------------------------------------------------------
    def master_of(self, p: Any) -> Any:
        """p's float32 master value; made again from p.value if someone set other numbers
        there since (a checkpoint load, a user's assignment). The same numbers in a new array
        (another graph over these nodes bound them in another dtype and back) keep it."""
        value = p.value
        if self._written.get(p) is not value:
            master = self.master.get(p)
            if master is None or not self._rounds_to(master, value):
                self.master[p] = self.device.xp.astype(value, self.master_dtype, copy=True)
            self._written[p] = value
        return self.master[p]

    def _rounds_to(self, master: Any, value: Any) -> bool:
        """Whether `master` rounded to the graph's dtype is `value` (one read: only after a
        parameter's array was replaced, not at every step)."""
        xp = self.device.xp
        if tuple(master.shape) != tuple(value.shape):
            return False
        same = xp.all(xp.astype(master, value.dtype) == value)
        with LEDGER.allowed():
            return bool(self.device.item(xp.astype(same, self.master_dtype),
                                         what="mixed precision master check"))

    def current_master(self, p: Any) -> Any:
        """p's float32 master value, checked against p.value (one read): where it no longer
        rounds to the value (numbers written into p's array in place, e.g. MiniFlow's
        `sgd_update`), it is made again from the value. For checkpoints, which must hold the
        weights the graph computes with whatever changed them since the last save."""
        value, master = p.value, self.master.get(p)
        if master is None or not self._rounds_to(master, value):
            master = self.master[p] = self.device.xp.astype(value, self.master_dtype, copy=True)
        self._written[p] = value
        return master

    def set_master(self, p: Any, master: Any) -> None:
        """Take `master` (float32, on the device) as p's master value, p.value being its
        rounding: a checkpoint load restores the masters instead of remaking them."""
        self.master[p] = master
        self._written[p] = p.value

    def optimizer_step(self, optimizer: Any) -> bool:
        """Check the gradients; update the masters through `optimizer.update` and round them
        into the parameters, or skip the step (overflow, expected: no NumPy warning). Returns
        whether it stepped."""
        with self.device.quiet_float_errors():
            return self._optimizer_step(optimizer)

    def _optimizer_step(self, optimizer: Any) -> bool:
        params = optimizer._active  # frozen parameters (trainable False) are skipped
        masters = [self.master_of(p) for p in params]  # before anything can change
        if not self._decide(self._finite([p.gradients[p] for p in params])):
            return False
        optimizer.t += 1
        for p, master in zip(params, masters):
            optimizer._param, optimizer.ops = p, p.ops
            new = optimizer.update(p.xp, master, p.gradients[p], optimizer.state[p])
            self.master[p] = new
            p.value = self.device.xp.astype(new, p.value.dtype)
            self._written[p] = p.value
        return True

    def record(self, finite: bool) -> bool:
        """The loss scaler's rule after a step's overflow check (`finite`: every gradient is
        finite): update the scale and return whether the optimizer steps (False: skip it).
        GraphError for an overflow under a static scale, or with the scale below MIN_SCALE.
        `optimizer_step` and the compiled step (gpuflow/compiled.py) both decide here."""
        scale = self.scaler.scale
        if not finite and not self.scaler.dynamic:
            raise GraphError(
                f"mixed precision: the gradients overflowed {self.name} with the static loss "
                f"scale {scale:g} (an Inf or NaN); no parameter was updated.\nhelp: pass a "
                "smaller loss_scale, or loss_scale='dynamic' (the default) to skip such steps.")
        self.scaler.update(finite)
        if not finite and self.scaler.scale < MIN_SCALE:
            raise GraphError(
                f"mixed precision: the gradients are not finite even with the loss scale at "
                f"{scale:g}: the forward or backward pass overflows {self.name} (values "
                "beyond its range) or training diverged; no parameter was updated.\nhelp: "
                "lower the learning rate, use dtype='float32', or check_finite=True to find "
                "the node.")
        return finite

    def _decide(self, finite: bool) -> bool:
        """`record` once per graph step (parameter groups: several optimizers over one graph):
        the first optimizer to look records; a later one that finds an overflow where the first
        found none records it then (the scale backs off once). Each optimizer steps or skips
        on its own gradients, as torch's GradScaler.step does."""
        if self._verdict is None or (self._verdict and not finite):
            self._verdict = finite
            return self.record(finite)
        return finite

    def _finite(self, grads: Iterable[Any]) -> bool:
        """Whether every gradient is finite: one device flag, read once (NaN and Inf survive
        a sum, so one sum per gradient is enough)."""
        xp = self.device.xp
        total = None
        for g in grads:
            s = xp.sum(g) if hasattr(g, "dtype") else g
            total = s if total is None else total + s
        if total is None:
            return True
        if not hasattr(total, "dtype"):
            return math.isfinite(total)
        with LEDGER.allowed():
            return bool(self.device.item(xp.astype(xp.isfinite(total), self.master_dtype),
                                         what="mixed precision overflow check"))

    # -- state, for checkpoints --------------------------------------------------------------
    def state_dict(self) -> dict[str, float | int]:
        """The loss scaler's numbers (the masters are the parameters' float32 values:
        `master_weights()`)."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state)

    def master_weights(self) -> dict[str, Any]:
        """{parameter name: float32 host array} of the master weights."""
        return {p.name or p.label: self.device.to_host(m, what="master weights")
                for p, m in self.master.items()}


_STEPPED: list = [None]  # the weak reference of the Graph whose step ran last


def claim(graph: Any) -> None:
    """At Graph(...): each of its parameters that no live Graph holds yet records this one
    (an optimizer made over them before any step finds this graph's mixed precision)."""
    plan.record_graph(graph.parameters, graph._ref, unheld_only=True)


def note_step(graph: Any) -> None:
    """At Graph.step: each of its parameters records this graph, whose step computes their
    gradients now. A loop over the parameters only when another graph stepped last."""
    ref = graph._ref
    if _STEPPED[0] is ref:
        return
    plan.record_graph(graph.parameters, ref)
    _STEPPED[0] = ref


def graphs_of(params: Iterable[Any]) -> list[Any]:
    """The live Graphs that the parameters record (see `note_step`), each once, in order."""
    refs = {id(p._graph): p._graph for p in params if p._graph is not None}  # a dead weak
    return [g for g in (r() for r in refs.values()) if g is not None]  # reference: no hash


def quiet_float_errors(params: list[Any]) -> Any:
    """`device.quiet_float_errors()` where one of the parameters' graphs is mixed precision
    (a gradient clip between its step, which may overflow, and the optimizer's), else a no-op
    context."""
    if params and any(g.amp is not None for g in graphs_of(params)):
        return params[0].device.quiet_float_errors()
    return NULL_SCOPE


def for_optimizer(owner: str, graphs: list[Any], strict: bool) -> "MixedPrecision | None":
    """The MixedPrecision an optimizer over parameters of `graphs` (see `graphs_of`) follows:
    the one graph's, or None. Parameters of several graphs, one of them mixed precision, are
    a GraphError if `strict` (at a step; None otherwise: before any step a parameter may be
    held by another graph than the one that will step it)."""
    if len(graphs) == 1:
        return graphs[0].amp
    mixed = [g for g in graphs if g.amp is not None]
    if mixed and strict:
        listing = ", ".join(f"the {dtype_name(g.dtype)} graph of {g.loss.label} on "
                            f"{g.device.name}" for g in graphs)
        raise GraphError(
            f"{owner}: the gradients of its parameters come from {len(graphs)} graphs "
            f"({listing}), {len(mixed)} of them mixed precision; each scales its gradients by "
            "its own loss scale, so one optimizer cannot follow them all.\nhelp: make one "
            f"optimizer per graph, e.g. {owner}(graph), or one over each graph's parameters.")
    return None
