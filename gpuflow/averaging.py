"""An exponential moving average of a graph's weights, for evaluation (re-exported by
gpuflow.optim), as `torch.optim.swa_utils.AveragedModel(model,
multi_avg_fn=get_ema_multi_avg_fn(decay))` keeps one and Keras's `use_ema` does:

    opt = Adam(graph, lr=1e-3)
    ema = EMA(graph, decay=0.999)
    for xb, yb in batches:
        graph.step(xb, yb); opt.step(); ema.update()
    with ema.swapped():                  # the averaged weights in the graph, then back
        logits = graph.run(logits_node, X_test)

`update()` follows torch's rule to the letter: the first update copies the parameters (torch's
`n_averaged == 0`), every later one moves the average towards them,
`average += (1 - decay) * (value - average)` (torch's `lerp_`). The averages are copies on the
graph's device, in the graph's dtype; a mixed-precision graph (float16/bfloat16) averages its
float32 master weights (gpuflow/runtime/amp.py), as torch averages the float32 parameters under autocast.

Buffers (BatchNorm's running statistics) are not averaged: the averaged weights are evaluated
with the graph's own running statistics, which is torch's default (`use_buffers=False`:
AveragedModel copies the model's buffers at every `update_parameters`, so after an update they
are the model's). Frozen parameters (trainable False) are averaged too: their value does not
move, so their average is their value (torch's `parameters()` lists frozen ones as well).

Checkpoints save and restore it bit for bit: `checkpoint.save(path, graph, opt, ema=ema)`,
`checkpoint.load(path, graph, opt, ema=ema)` (`ema/<name>` tensors and the update count).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from .errors import CheckpointError, GraphError, check_hyperparameter

__all__ = ["EMA"]


class EMA:
    """Averaged copies of `graph`'s parameters, updated by `update()` after each optimizer step
    (see the module's docstring).

    graph: the Graph whose parameters are averaged. decay: the weight of the old average,
    in [0, 1) (torch's `get_ema_multi_avg_fn` default, 0.999). The copies start as the
    parameters' values now; `n_averaged` counts the updates (0: the next one copies).
    """

    def __init__(self, graph: Any, decay: float = 0.999) -> None:
        if not callable(getattr(graph, "named_parameters", None)):  # a gpuflow Graph
            raise GraphError(f"EMA needs a gpuflow Graph, got {type(graph).__name__}.\n"
                             "help: pass the Graph whose weights to average: EMA(graph).")
        self.decay = check_hyperparameter(decay, "decay", "EMA", high=1.0, example="0.999")
        self.graph = graph
        self.params = graph.named_parameters()  # {name: parameter}: also checks the names
        self.n_averaged = 0
        self.average: dict[str, Any] = {name: self._copy(self._current(p))
                                        for name, p in self.params.items()}
        self._swapped: dict[str, Any] | None = None  # the graph's own values while swapped in

    def __repr__(self) -> str:
        return (f"EMA(decay={self.decay}, {len(self.average)} parameters, "
                f"{self.n_averaged} updates{', swapped in' if self._swapped else ''})")

    # -- averaging -------------------------------------------------------------------------------
    def _current(self, p: Any) -> Any:
        """What is averaged for parameter `p`: its value, or its float32 master value under
        mixed precision."""
        amp = self.graph.amp
        return amp.master_of(p) if amp is not None else p.value

    def _copy(self, value: Any) -> Any:
        return self.graph.device.xp.asarray(value, copy=True)

    def update(self) -> None:
        """Move the averages towards the parameters' current values (call it after each
        `opt.step()`): a copy at the first update, then `average += (1 - decay) * (value -
        average)`, on the device, with nothing read back."""
        self._refuse_swapped("update")
        weight = 1.0 - self.decay
        for name, p in self.params.items():
            value = self._current(p)
            if self.n_averaged == 0:
                self.average[name] = self._copy(value)
                continue
            avg = self.average[name]
            if weight < 0.5:   # torch's lerp, term for term: a + w (b - a)
                avg += weight * (value - avg)
            else:              # ... and b - (b - a) (1 - w) for a weight of 0.5 and above
                avg = value - (value - avg) * (1.0 - weight)
            self.average[name] = avg  # a new array where arrays are immutable (JAX)
        self.n_averaged += 1

    # -- evaluation with the averages -----------------------------------------------------------
    def swap_in(self) -> None:
        """Put the averaged weights into the graph's parameters (copies, in the graph's dtype);
        `swap_out()` puts the graph's own back. Training in between would train the copies and
        lose them: evaluate only (graph.run)."""
        self._refuse_swapped("swap_in")
        kept = {}
        for name, p in self.params.items():
            kept[name] = p.value
            p.value = self.graph.device.xp.astype(self.average[name], p.value.dtype, copy=True)
        self._swapped = kept

    def swap_out(self) -> None:
        """Put the graph's own weights back, the very arrays `swap_in` took out."""
        if self._swapped is None:
            raise GraphError("EMA.swap_out(): the averaged weights are not swapped in.\n"
                             "help: call swap_in() first, or use `with ema.swapped():`.")
        kept, self._swapped = self._swapped, None
        for name, p in self.params.items():
            p.value = kept[name]

    @contextlib.contextmanager
    def swapped(self) -> Iterator["EMA"]:
        """`with ema.swapped(): graph.run(...)`: the averaged weights inside, the graph's own
        after it (also when the body raises)."""
        self.swap_in()
        try:
            yield self
        finally:
            self.swap_out()

    def _refuse_swapped(self, what: str) -> None:
        if self._swapped is not None:
            raise GraphError(f"EMA.{what}(): the averaged weights are swapped into the graph.\n"
                             "help: call swap_out() (or leave the `with ema.swapped():` block) "
                             "first.")

    # -- state, for checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """{'n_averaged': int, 'decay': float, '<param name>': host array, ...}."""
        out: dict[str, Any] = {"n_averaged": self.n_averaged, "decay": self.decay}
        for name, avg in self.average.items():
            out[name] = self.graph.device.to_host(avg, what=f"EMA average of {name}")
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output onto the graph's device (checked first: a refused
        state changes nothing). `decay` is this object's own (the saved one is informative)."""
        self._refuse_swapped("load_state_dict")
        arrays = {k: v for k, v in state.items() if k not in ("n_averaged", "decay")}
        if sorted(arrays) != sorted(self.average):
            raise CheckpointError(f"EMA state holds averages of {sorted(arrays)}, but this "
                                  f"graph's parameters are {sorted(self.average)}.\nhelp: "
                                  "load the state saved with this model.")
        n = state.get("n_averaged")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise CheckpointError(f"EMA state: n_averaged is {n!r}, expected an int >= 0.")
        new = {}
        for name, host in arrays.items():
            old = self.average[name]
            if tuple(host.shape) != tuple(old.shape):
                raise CheckpointError(f"EMA state: the average of {name!r} has shape "
                                      f"{tuple(host.shape)}, but the parameter has shape "
                                      f"{tuple(old.shape)}.")
            new[name] = self.graph.device.put(host, old.dtype, what=f"EMA average of {name}")
        self.average, self.n_averaged = new, n
