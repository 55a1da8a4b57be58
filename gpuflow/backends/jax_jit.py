"""A whole training step on JAX as one `jax.jit`-compiled function (`JaxDevice.compile_step`).

A gpuflow step is static: the same nodes run in the same order on arrays of the same shapes.
So forward, backward and the optimizer's update, traced once through the nodes' own code (which
calls `self.xp`, here `jax.numpy`), become one XLA computation of (parameter values, optimizer
state, step number, learning rate, batch) -> (new values, new state, loss, gradients).

The graph's first step runs eagerly (`graph.step`, `optimizer.step`): it checks dtypes and
labels once, as always. What the compiled steps after it do not do (use `graph.step` +
`optimizer.step` for these): strict transfer mode, `check_finite`. Node values between the inputs and
the loss are not kept (only the loss, parameters and gradients are): `graph.run` recomputes
them. A node that draws random numbers (Dropout) would draw the same ones at every step, since
its key is traced as a constant: such graphs are not compiled correctly yet.
"""

from __future__ import annotations

from typing import Any, Callable


class CompiledStep:
    """`step(*batches) -> loss`: `graph.step(*batches)` then `optimizer.step()`, compiled."""

    def __init__(self, graph: Any, optimizer: Any) -> None:
        import jax
        from ..graph import _run_step, set_mode
        self.graph, self.optimizer = graph, optimizer
        self._run_step, self._set_mode = _run_step, set_mode
        missing = [p.label for p in optimizer.params if p not in graph._members]
        if missing:
            from ..errors import GraphError
            raise GraphError(f"compile_step: the optimizer updates {', '.join(missing)}, which "
                             "the graph does not hold.\nhelp: make the optimizer from this "
                             "graph (e.g. Adam(graph)).")
        self._fn = jax.jit(self._pure)
        self._xp = graph.device.xp

    def __call__(self, *batches: Any) -> Any:
        graph, opt = self.graph, self.optimizer
        if graph.steps == 0:  # the first step eagerly: it checks dtypes and labels once
            loss = graph.step(*batches)
            opt.step()
            return loss
        graph.plan.ensure()
        self._set_mode(graph.nodes, True, graph)
        graph._feed(batches, graph.inputs)  # checks and uploads, as graph.step does
        params = opt.params
        values = [p.value for p in params]
        states = [opt.state[p] for p in params]
        batch = [n.value for n in graph.inputs]
        t = opt.t + 1
        new_values, new_states, loss, grads = self._fn(
            values, states, self._xp.asarray(t), self._xp.asarray(float(opt.lr)), batch)
        for p, value, state, grad in zip(params, new_values, new_states, grads):
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
            self._run_step(graph.plan.compute, graph.plan.backward)
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


def compile_step(graph: Any, optimizer: Any) -> Callable[..., Any]:
    """The compiled step for a graph on a JAX device and its optimizer."""
    return CompiledStep(graph, optimizer)
