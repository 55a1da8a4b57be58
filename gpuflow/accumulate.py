"""Gradient accumulation: k micro-batches, then one optimizer step, equal to one step on the
concatenated batch (`Graph.accumulate_step`).

    for xb, yb in batches:                                   # batches of 256 samples
        loss = graph.accumulate_step(split_batch(4, xb, yb))   # 4 forward-backward passes of 64
        ctx.allreduce_gradients(graph)     # data-parallel: one all-reduce per optimizer step
        clip_grad_norm(graph, 1.0)         # clips the accumulated gradient, once
        optimizer.step()                   # any optimizer: one step, as for the whole batch

`accumulate_step` runs `graph.step` on each micro-batch and leaves in `p.gradients[p]` the
gradient of the mean loss over all their samples: the micro-batch of m_i samples, whose loss is
a mean over them (every gpuflow loss is, but for SoftmaxCrossEntropy's ignored
positions: docs/guide.md), counts with weight m_i / sum(m), so micro-batches of
unequal sizes give the whole batch's gradient too (to rounding: float64 agrees to 1e-12,
tests/test_accumulate.py). PyTorch users write `(loss * m_i / m).backward()` per micro-batch;
here the weighting is done for them. Clipping, the optimizer and the all-reduce then see one
gradient, as after one `graph.step` on the whole batch.

The sums are kept in one array per parameter (`p.buffers["accumulated gradient", ...]`, kept
from step to step like every buffer, gpuflow/runtime/buffers.py: nothing is allocated after the first
accumulated step). The graph's own gradient arrays are overwritten by each micro-batch's
backward, as PyTorch's `.grad` would be without `+=`, so they are read, never written.

Mixed precision (gpuflow/runtime/amp.py): each micro-batch's gradients are unscaled into float32 by its
`graph.step`, all with the same loss scale (it changes only at an optimizer step); an overflow
in any micro-batch leaves an Inf or NaN in the accumulated gradient, and the optimizer's check
skips the whole step (no parameter, optimizer state or step count changes; the scale halves).

What differs from the whole batch, as in PyTorch: BatchNorm normalises each micro-batch with its
own statistics and updates its running statistics once per micro-batch, and Dropout draws new
masks for each; a graph with neither gives the whole batch's gradient. `graph.steps` counts
forward-backward passes (k per accumulated step), `optimizer.t` optimizer steps.
"""

from __future__ import annotations

from typing import Any, Iterable

from .errors import GraphError, check_int


def split_batch(k: int, *arrays: Any) -> list[tuple[Any, ...]]:
    """`k` micro-batches of `arrays` (each cut along its first axis into contiguous slices
    whose sizes differ by at most one, the larger first), as `accumulate_step` takes them;
    fewer than `k` if the batch holds fewer than `k` samples."""
    k = check_int(k, "k", 1, where="split_batch")
    if not arrays:
        raise GraphError("split_batch: no arrays to split.\nhelp: split_batch(4, xb, yb).")
    total = _length(arrays[0], "split_batch")
    for a in arrays[1:]:
        if _length(a, "split_batch") != total:
            raise GraphError(f"split_batch: the arrays hold {total} and {_length(a, '')} "
                             "samples; every array of a batch has the same first axis.\n"
                             "help: pass the batch's arrays, e.g. split_batch(4, xb, yb).")
    base, extra = divmod(total, k)
    out, start = [], 0
    for i in range(min(k, total)):
        stop = start + base + (i < extra)
        out.append(tuple(a[start:stop] for a in arrays))
        start = stop
    return out


def accumulate_step(graph: Any, micro_batches: Iterable[Any], training: bool = True) -> Any:
    """`Graph.accumulate_step`: see its docstring and this module's."""
    batches = list(micro_batches)
    if not batches:
        raise GraphError("accumulate_step: no micro-batches.\nhelp: pass a list of batches, "
                         "e.g. graph.accumulate_step(split_batch(4, xb, yb)).")
    counts = [_samples(graph, b, i) for i, b in enumerate(batches)]  # checked before any step
    total = sum(counts)
    loss = None
    sums: dict[Any, Any] = {}
    unit = counts[0]  # sums[p] holds sum_i m_i * g_i / unit
    for i, (batch, m) in enumerate(zip(batches, counts)):
        value = graph.step(*_arguments(batch), training=training)
        weighted = value * (m / total)
        loss = weighted if loss is None else loss + weighted
        if m != unit and sums:  # rescale once per change of size: equal ones only add
            for p in sums:
                sums[p] = _scale(sums[p], unit / m)
        unit = m
        for p in graph.parameters:
            if not getattr(p, "trainable", True):
                continue  # frozen: the backward gave it no gradient, the optimizer skips it
            grad = p.gradients.get(p)
            if grad is None:
                continue
            acc = sums.get(p)
            if acc is None:  # its first gradient, weighted m / unit = 1
                sums[p] = _first(p, grad)
            else:
                acc += grad  # a new array where arrays are immutable (JAX)
                sums[p] = acc
    factor = unit / total
    for p, acc in sums.items():
        p.gradients[p] = _scale(acc, factor) if factor != 1.0 else acc
    return loss


def _first(p: Any, grad: Any) -> Any:
    """A copy of `grad` in p's kept accumulator (a new array where none is kept)."""
    if not hasattr(grad, "shape"):  # a Python number (a custom node's scalar gradient)
        return float(grad)
    out = p.buffers["accumulated gradient", tuple(grad.shape), grad.dtype]
    return p.ops.multiply(grad, 1.0, out=out)  # x * 1.0 is x exactly


def _scale(acc: Any, factor: float) -> Any:
    acc *= factor  # in place where arrays are mutable, rebound where they are not
    return acc


def _arguments(batch: Any) -> tuple:
    """`graph.step`'s positional arguments for one micro-batch: a tuple or list holds one
    array per data Input, a dict is passed as it is, anything else is the one Input's array."""
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _samples(graph: Any, batch: Any, index: int) -> int:
    """The number of samples of micro-batch `index`: the first axis of its first data Input."""
    if isinstance(batch, dict):
        first = graph.inputs[0] if graph.inputs else None
        if first is None or first not in batch:
            raise GraphError(f"accumulate_step: micro-batch {index} is a dict without "
                             f"{first.label if first is not None else 'a data Input'}.\nhelp: "
                             "feed every data Input of the graph in each micro-batch.")
        array = batch[first]
    else:
        arguments = _arguments(batch)
        if not arguments:
            raise GraphError(f"accumulate_step: micro-batch {index} is empty.\nhelp: give each "
                             "micro-batch one array per data Input, e.g. (xb, yb).")
        array = arguments[0]
    n = _length(array, f"accumulate_step: micro-batch {index}")
    if n == 0:
        raise GraphError(f"accumulate_step: micro-batch {index} holds no samples.\nhelp: leave "
                         "empty micro-batches out (split_batch never makes one).")
    return n


def _length(array: Any, where: str) -> int:
    """The length of `array`'s first axis; GraphError for a 0-d value."""
    shape = getattr(array, "shape", None)
    if shape is None:
        try:
            return len(array)
        except TypeError:
            shape = ()
    if len(shape) == 0:
        raise GraphError(f"{where}: its first array is a scalar, with no batch axis to count "
                         "samples along.\nhelp: pass arrays whose first axis is the batch; a "
                         "micro-batch's loss counts by its number of samples.")
    return int(shape[0])

