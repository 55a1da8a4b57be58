"""A whole training step as one compiled function, where the device's library has a compiler.

    step = compile_step(graph, optimizer)    # on JAX: one jax.jit function; elsewhere eager
    for xb, yb in batches:
        loss = step(xb, yb)                  # = graph.step(xb, yb); optimizer.step()

A gpuflow step is static: the same nodes run in the same order on arrays of the same shapes.
So forward, backward and the optimizer's update, traced once through the nodes' own code (which
calls `self.xp`), become one computation of (parameter values, optimizer state, step number,
learning rate, batch) -> (new values, new state, loss, gradients), which the device compiles
(`Device.jit`: `jax.jit` on JAX). Devices without a compiler run the two calls as they are.

The graph's first step runs eagerly (`graph.step`, `optimizer.step`): it checks dtypes and
labels once, as always. What the compiled steps after it do not do (use `graph.step` +
`optimizer.step` for these): strict transfer mode, `check_finite`. Node values between the
inputs and the loss are not kept (only the loss, parameters and gradients are): `graph.run`
recomputes them. A node that draws random numbers (Dropout) is refused with a GraphError at the
first compiled step: its key would be a constant of the compiled function (the same numbers
at every step) until keys are threaded through the step.
"""

from __future__ import annotations

from typing import Any, Callable

from .errors import GraphError
from .graph import Graph, _run_step
from .nodes import Input
from .plan import set_mode


class CompiledStep:
    """`step(*batches) -> loss`: `graph.step(*batches)` then `optimizer.step()`, compiled."""

    def __init__(self, graph: Graph, optimizer: Any) -> None:
        self.graph, self.optimizer = graph, optimizer
        missing = [p.label for p in optimizer.params if p not in graph._members]
        if missing:
            raise GraphError(f"compile_step: the optimizer updates {', '.join(missing)}, which "
                             "the graph does not hold.\nhelp: make the optimizer from this "
                             "graph (e.g. Adam(graph)).")
        self._fn = graph.device.jit(self._pure)  # None: the device has no compiler
        from .norm import Dropout  # refused when it draws in a compiled step (JaxRng)
        stateful = [n.label for n in graph.nodes
                    if callable(getattr(n, "state_dict", None)) and not isinstance(n, Dropout)]
        if self._fn is not None and stateful:  # `_pure` puts every node back after tracing
            raise GraphError(f"compile_step: {', '.join(stateful)} keeps state between steps "
                             "(BatchNorm's running statistics), which the compiled step would "
                             "drop (evaluation would use stale statistics).\nhelp: train this "
                             "graph with graph.step(...) and optimizer.step().")

    def __call__(self, *batches: Any) -> Any:
        graph, opt = self.graph, self.optimizer
        if graph.steps == 0:  # the first step eagerly: it checks dtypes and labels once
            loss = graph.step(*batches)
            opt.step()
            return loss
        graph.plan.ensure()
        set_mode(graph.nodes, True, graph.plan)
        graph._feed(batches, graph.inputs)  # checks and uploads, as graph.step does
        params = opt.params
        values = [p.value for p in params]
        states = [opt.state[p] for p in params]
        batch = [n.value for n in graph.inputs]
        t = opt.t + 1
        new_values, new_states, loss, grads = self._fn(
            values, states, t, float(opt.lr), batch)  # Python numbers: traced, no retrace
        for p, value, state, grad in zip(params, new_values, new_states, grads):
            if isinstance(p, Input):
                p._value = value  # the compiled function's own array: nothing to check or copy
            else:
                p.value = value
            opt.state[p] = state
            p.gradients[p] = grad
        opt.t = t
        graph.steps += 1
        return loss

    def _pure(self, values: list, states: list, t: Any, lr: Any, batch: list) -> tuple:
        """The step as a function of arrays only (run once per trace, on JAX tracers)."""
        graph, opt = self.graph, self.optimizer
        # Tracing writes tracers into nodes (values, gradients, caches): put every node and
        # the optimizer back as they were, so that nothing traced leaks into eager use.
        saved = {n: {k: dict(v) if type(v) is dict else v for k, v in vars(n).items()}
                 for n in graph.nodes}
        saved_opt = dict(vars(opt))
        try:
            for n, value in zip(graph.inputs, batch):
                n._value = value
            for p, value in zip(opt.params, values):
                p._value = value
            _run_step(graph.plan.compute, graph.plan.backward)
            loss = graph.loss.value
            opt.t, opt.lr = t, lr
            new_values, new_states, grads = [], [], []
            for p, value, state in zip(opt.params, values, states):
                state = dict(state)
                grad = p.gradients[p]
                opt._param, opt.ops = p, p.ops
                new_values.append(opt.update(p.xp, value, grad, state))
                new_states.append(state)
                grads.append(grad)
            return new_values, new_states, loss, grads
        finally:
            for n, attrs in saved.items():
                vars(n).clear()
                vars(n).update(attrs)
            vars(opt).clear()
            vars(opt).update(saved_opt)


def compile_step(graph: Graph, optimizer: Any) -> Callable[..., Any]:
    """A function `step(*batches) -> loss` equal to `graph.step(*batches)` followed by
    `optimizer.step()`: one compiled computation where the graph's device has a compiler
    (`device.jit`, JAX), else those two calls."""
    compiled = CompiledStep(graph, optimizer)
    if compiled._fn is not None:
        return compiled

    def eager(*batches: Any) -> Any:
        loss = graph.step(*batches)
        optimizer.step()
        return loss
    return eager
