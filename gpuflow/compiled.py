"""A whole training step as one compiled function, where the device's library has a compiler.

    step = compile_step(graph, optimizer)    # on JAX: one jax.jit function; elsewhere eager
    for xb, yb in batches:
        loss = step(xb, yb)                  # = graph.step(xb, yb); optimizer.step()

    step = compile_step(graph, optimizer, clip_norm=1.0)
        # = graph.step(xb, yb); clip_grad_norm(graph, 1.0); optimizer.step()

A gpuflow step is static: the same nodes run in the same order on arrays of the same shapes.
So forward, backward and the optimizer's update, traced once through the nodes' own code (which
calls `self.xp`), become one computation of (parameter values, optimizer state, node state,
step number, learning rate, loss scale, batch) -> (new values, new state, loss, gradients),
which the device compiles (`Device.jit`: `jax.jit` on JAX). Devices without a compiler run
the eager calls as they are.

What goes through the compiled function, step for step as the eager calls do it:
- BatchNorm's running statistics: arguments and results of the compiled function, so they
  move at every step and `graph.run` evaluates with them.
- Dropout's masks: each Dropout's seed for the step (a hash of its seed and step counter, as
  the eager forward computes it) is an argument, so the masks are the eager step's masks
  and `Dropout.steps` counts on (checkpoints resume the sequence).
- Mixed precision (`Graph(dtype='float16' | 'bfloat16')`, gpuflow/runtime/amp.py): the backward starts
  from the loss scale, the gradients are unscaled into float32, the float32 master weights are
  updated and rounded into the parameters. Whether every gradient is finite is decided in the
  compiled function and read once per step (as eager reads it): an overflow skips the update
  (parameters, optimizer state and `optimizer.t` unchanged) and the scale follows the loss
  scaler's rule (`MixedPrecision.record`, the eager rule itself).
- Clipping: `clip_norm=` runs `clip_grad_norm` (the eager function) on the gradients, after
  unscaling and before the update, as `gpuflow train --clip` does between the two calls.

The graph's first step runs eagerly (`graph.step`, `optimizer.step`): it checks dtypes and
labels once, as always. What the compiled steps after it do not do (use `graph.step` +
`optimizer.step` for these): strict transfer mode, `check_finite`. Node values between the
inputs and the loss are not kept (only the loss, parameters, gradients and node state are):
`graph.run` recomputes them. A node of another kind that keeps state between steps (its own
`state_dict`) is refused with a GraphError, as is one that draws random numbers from a seed
of its own (the same numbers would come back at every step).
"""

from __future__ import annotations

from typing import Any, Callable

from .backends import LEDGER
from .errors import GraphError, check_hyperparameter
from .graph import Graph, _run_step
from .nodes import Input
from .nodes.norm import BatchNorm, Dropout, _mix
from .runtime.plan import put_seeds, put_values, restore, set_mode, snapshot
from .schedules import clip_grad_norm


class CompiledStep:
    """`step(*batches) -> loss`: `graph.step(*batches)`, `clip_grad_norm(graph, clip_norm)` if
    `clip_norm`, then `optimizer.step()`, compiled."""

    def __init__(self, graph: Graph, optimizer: Any, clip_norm: float | None = None) -> None:
        self.graph, self.optimizer = graph, optimizer
        self.clip_norm = None if clip_norm is None else check_hyperparameter(
            clip_norm, "clip_norm", "compile_step", low_open=True, example="1")
        missing = [p.label for p in optimizer.params if p not in graph._members]
        if missing:
            raise GraphError(f"compile_step: the optimizer updates {', '.join(missing)}, which "
                             "the graph does not hold.\nhelp: make the optimizer from this "
                             "graph (e.g. Adam(graph)).")
        amp = getattr(optimizer, "_amp", None)
        if graph.amp is not None and amp is not graph.amp:
            raise GraphError(f"compile_step: the graph computes in {graph.amp.name} with "
                             "float32 master weights, but the optimizer was made without them."
                             "\nhelp: make the optimizer from the graph (e.g. Adam(graph)).")
        self._jit = graph.device.jit
        # whether the device has a compiler (else `compile_step` runs the eager calls)
        self.compiles = self._jit(lambda x: x) is not None
        self._fns: dict[tuple[bool, ...], Any] = {}  # one compiled function per frozen set
        # every parameter the step reads: the graph's and the optimizer's (values in, not
        # constants of the compiled function)
        self._held = list(dict.fromkeys([*graph.parameters, *optimizer.params]))
        self._norms = [n for n in graph.nodes if isinstance(n, BatchNorm)]
        self._drops = [n for n in graph.nodes if isinstance(n, Dropout)]
        stateful = [n.label for n in graph.nodes if callable(getattr(n, "state_dict", None))
                    and not isinstance(n, (BatchNorm, Dropout))]
        if self.compiles and stateful:  # `_pure` puts every node back after tracing
            raise GraphError(f"compile_step: {', '.join(stateful)} keeps state between steps "
                             "(its state_dict), which the compiled step would drop; it carries "
                             "BatchNorm's and Dropout's only.\nhelp: train this graph with "
                             "graph.step(...) and optimizer.step().")

    def eager(self, *batches: Any) -> Any:
        """The eager step this compiles: graph.step, clip_grad_norm if clip_norm,
        optimizer.step."""
        loss = self.graph.step(*batches)
        if self.clip_norm is not None:
            clip_grad_norm(self.graph, self.clip_norm)
        self.optimizer.step()
        return loss

    def __call__(self, *batches: Any) -> Any:
        graph, opt = self.graph, self.optimizer
        if graph.steps == 0:  # the first step eagerly: it checks dtypes and labels once
            return self.eager(*batches)
        graph.plan.ensure()
        set_mode(graph.nodes, True, graph.plan)
        graph._feed(batches, graph.inputs)  # checks and uploads, as graph.step does
        amp = graph.amp
        held = self._held
        key = tuple(bool(getattr(p, "trainable", True)) for p in held)  # frozen: False
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = self._jit(lambda *args: self._pure(key, *args))
        graded, updated = self._split(key)
        values = [p.value for p in held]
        # float32 masters under mixed precision, taken before anything changes (as eager)
        masters = [amp.master_of(p) for p in updated] if amp is not None else None
        states = [opt.state[p] for p in updated]
        norm_state = [(n.running_mean, n.running_var) for n in self._norms]
        drawing = [n for n in self._drops if n.p > 0.0]  # training: each draws one mask
        seeds = [_mix(n.seed, n.steps) for n in drawing]
        batch = [n.value for n in graph.inputs]
        t = opt.t + 1
        scale = amp.scaler.scale if amp is not None else 1.0
        with graph.device.scope():
            (new_values, new_masters, new_states, new_norm_state, loss, grads,
             finite) = fn(values, masters, states, norm_state, seeds, t, float(opt.lr), scale,
                          batch)  # Python numbers: traced, no retrace
        for n, (mean, var) in zip(self._norms, new_norm_state):
            n.running_mean, n.running_var = mean, var
        for n in drawing:
            n.steps += 1
        for p, grad in zip(graded, grads):
            p.gradients[p] = grad
        graph.steps += 1
        if amp is not None:  # one read of the overflow flag, as the eager step makes
            with LEDGER.allowed():
                ok = bool(graph.device.item(finite, what="mixed precision overflow check"))
            if not amp.record(ok):
                return loss  # skipped: parameters, optimizer state and t stay as they were
        for i, p in enumerate(updated):
            if isinstance(p, Input):  # the compiled function's own array: nothing to copy
                put_values((p,), (new_values[i],))
            else:
                p.value = new_values[i]
            if amp is not None:
                amp.set_master(p, new_masters[i])
            opt.state[p] = new_states[i]
        opt.t = t
        return loss

    def _split(self, key: tuple[bool, ...]) -> tuple[list, list]:
        """(the parameters the graph computes gradients for, those the optimizer updates):
        the trainable ones of `self._held` (`key`: which are)."""
        on = {p for p, trainable in zip(self._held, key) if trainable}
        return ([p for p in self.graph.parameters if p in on],
                [p for p in self.optimizer.params if p in on])

    def _pure(self, key: tuple[bool, ...], values: list, masters: list | None, states: list,
              norm_state: list, seeds: list, t: Any, lr: Any, scale: Any, batch: list) -> tuple:
        """The step as a function of arrays only (run once per trace, on JAX tracers)."""
        graph, opt, amp = self.graph, self.optimizer, self.graph.amp
        graded, updated = self._split(key)
        # Tracing writes tracers into nodes (values, gradients, caches, state): put every node
        # and the optimizer back as they were, so that nothing traced leaks into eager use.
        saved = snapshot(graph.nodes)
        saved_opt = dict(vars(opt))
        try:
            put_values(graph.inputs, batch)
            put_values(self._held, values)
            for n, (mean, var) in zip(self._norms, norm_state):
                n.running_mean, n.running_var = mean, var
            put_seeds((n for n in self._drops if n.p > 0.0), seeds)
            if amp is not None:  # the backward starts from the loss scale (amp.before_step)
                graph.plan.seed_loss(scale)
            _run_step(graph.plan.compute, graph.plan.backward)
            loss = graph.loss.value
            xp = graph.device.xp
            if amp is not None:  # unscaled into float32 (amp.after_step)
                for p in graded:
                    p.gradients[p] = xp.astype(p.gradients[p], amp.master_dtype) * (1.0 / scale)
            if self.clip_norm is not None:  # clip_grad_norm(graph, c): the graph's gradients
                clip_grad_norm(graded, self.clip_norm)
            finite = None
            if amp is not None:  # amp._finite's test: NaN and Inf survive the sums
                finite = xp.isfinite(sum(xp.sum(p.gradients[p]) for p in updated))
            opt.t, opt.lr = t, lr
            new_values, new_masters, new_states = [], [], []
            for p, state, master in zip(updated, states, masters or [None] * len(updated)):
                state = dict(state)
                opt._param, opt.ops = p, p.ops
                new = opt.update(p.xp, p._value if amp is None else master, p.gradients[p],
                                 state)
                new_masters.append(None if amp is None else new)
                new_values.append(new if amp is None else xp.astype(new, p._value.dtype))
                new_states.append(state)
            new_norm_state = [(n.running_mean, n.running_var) for n in self._norms]
            grads = [p.gradients[p] for p in graded]
            return (new_values, new_masters, new_states, new_norm_state, loss, grads, finite)
        finally:
            restore(saved)
            vars(opt).clear()
            vars(opt).update(saved_opt)


def compile_step(graph: Graph, optimizer: Any, *,
                 clip_norm: float | None = None) -> Callable[..., Any]:
    """A function `step(*batches) -> loss` equal to `graph.step(*batches)`, then
    `clip_grad_norm(graph, clip_norm)` if `clip_norm` is given, then `optimizer.step()`: one
    compiled computation where the graph's device has a compiler (`device.jit`, JAX), else
    those calls. Carries BatchNorm's running statistics, Dropout's masks and mixed precision
    (float16/bfloat16 graphs: loss scaling, skipped overflow steps) as the eager calls do."""
    compiled = CompiledStep(graph, optimizer, clip_norm)
    return compiled if compiled.compiles else compiled.eager
