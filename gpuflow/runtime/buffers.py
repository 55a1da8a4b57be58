"""The arrays a node keeps from step to step, and when an array is copied.

On NumPy, CuPy and torch a training step allocates nothing after the first: each node writes its
value and gradients into arrays it keeps, passing them as `out=` to `node.ops` (except where a
node calls a library's own kernel that takes no `out=`: torch's convolution and pooling make
their results, as they do in PyTorch). The rules, stated here once (node docstrings point here):

- **Keep.** `node.buffers[name, shape, dtype]` gives an array to pass as `out=`: the same one
  for the same key, step after step (a name keeps its last `Buffers.shapes_kept` shapes, so that
  a training batch and a smaller last batch both stay). It gives None, and the op returns a new
  array, for 0-d results (NumPy keeps those as immutable scalars, as MiniFlow's Python numbers
  were), for integer or boolean results (an op may promote them), on a device that cannot write
  into arrays or a graph built with `reuse_buffers=False` (`NO_BUFFERS`), and for shapes first
  met while the graph runs forward only (`forward_only`: an evaluation batch of another size is
  not kept for good).
- **Immutable arrays.** Node and optimizer code always uses what an op returns: `x = op(...,
  out=buffer)`, or `x op= y`, which rebinds `x` to the result (in place where arrays are
  mutable; a new array where they are not: JAX arrays have no in-place operators). An array
  kept by reference (optimizer state, a dead end's zero gradient) is assigned back after
  each update, and nothing writes with `x[...] = v`.
- **Alias.** What a node writes into its buffers is overwritten at its next step, as PyTorch's
  `.grad` is. Every kept buffer is listed in one table (`_KEPT`) by its device's memory key
  (`Device.memory_keys`), so that an array sharing memory with one (the buffer itself, a view,
  a `.detach()`) is recognised wherever it turns up.
- **Copy for the caller** (`copy_if_kept`). What a graph hands back (`forward_pass`'s result,
  `Graph.step`'s loss, `Graph.run`'s output) and what a caller feeds an Input (one graph's
  output fed to the next, an RNN's state) is copied if it shares memory with a kept buffer,
  and handed over as it is otherwise.
- **Borrow** (gpuflow/runtime/recomputation.py). The interior nodes of a recomputed segment
  (`gf.recompute`) take their buffers from one pool per graph for one pass of the segment and
  give them back after it, so segments of one shape share one set of arrays.
- **Copy a feed** (`copy_feed`). A value the caller gives when the graph is built is copied
  once: training updates parameters in place where the device allows it, and the caller's
  array must not change with them (it would on the CPU only, where no transfer copies it).

Process-wide state: gpuflow's whole list. Everything else lives on a graph's `Plan` (its
order, whether another graph took its nodes, whether it runs forward only, the training mode
it last set: gpuflow/runtime/plan.py), on nodes and on optimizers. These stay global because what
they track crosses graphs:

- `_KEPT` (here): every live kept buffer by memory key. An array leaves one graph and enters
  another (a loss, an output fed to a second graph), so the check must see all graphs' buffers.
- `gpuflow.backends.LEDGER`: counts host<->device transfers and synchronisations, and refuses
  them in strict mode; transfers happen anywhere (feeds, checkpoints, `item`), and a user
  reads one count for the process.
- `gpuflow.backends._CACHE`: one `Device` object per device ("cuda" and "cuda:0" are the
  same object), since a node's device is compared by identity when graphs share nodes.
- `gpuflow.nodes.Node._ids`: the creation counter behind node labels ("Linear #3") and the
  order of a Graph's default inputs and parameters; unique across graphs by design.
- `gpuflow.backends.numpy_threads.WORKERS`: the threads large NumPy operations are split
  over (`gpuflow.set_num_threads`; off by default), one pool as the CPU's cores are one;
  `gpuflow.backends.numpy.OPS`, the CPU's one set of ops, whose routes follow that count; and
  `numpy_threads._HOLDERS`, the products now holding OpenBLAS to one thread and its count
  before (two Python threads may run products at once).
- `gpuflow.runtime.placement.LIVE`: every optimizer made (held weakly), whose update
  device='fastest' times as part of a step; `gpuflow.runtime.placement._SAID`: the devices already
  told that `capture` changes nothing there (said once per device).
- `gpuflow.runtime.amp._STEPPED`: the Graph whose step ran last (weakly): parameters shared between
  graphs record the one stepping now with one compare per step.
- `gpuflow.runtime.recomputation._SEGMENTS`: the segment `recompute` marked each node with
  (weakly keyed), read when a plan is built.

Caches of answers that never change (no state a user sees): `gpuflow.nodes.core._ACCUMULATION`
and `gpuflow.optim._NARROW` (per (namespace, dtype)), `numpy_threads._BLAS` (OpenBLAS's
thread functions).
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

from ..backends.numpy import host_copy


class _KeptTable(dict):
    """Every kept buffer: {memory key: (weak reference to its node, its key in node.buffers)}."""

    limit = 1024  # prune the entries of dead nodes when the table grows past this

    def add(self, key: int, node_ref: Any, name: tuple) -> None:
        self[key] = (node_ref, name)
        if len(self) > self.limit:
            for k, (ref, _) in list(self.items()):
                if ref() is None:
                    del self[k]
            self.limit = max(1024, 2 * len(self))

    def live(self, key: int) -> bool:
        """Whether `key` is still a live node's buffer (it can be stale: a dead node's array,
        whose memory was reused since; the owner's own table decides)."""
        ref, name = self[key]
        node = ref()
        buf = node.buffers.get(name) if node is not None else None
        return buf is not None and node.device.memory_keys(buf)[0] == key


_KEPT = _KeptTable()


def copy_if_kept(array: Any, device: Any) -> Any:
    """`array`, or a copy of it on `device` if it shares memory with a buffer that some live
    node writes into step after step (see the module docstring)."""
    if _KEPT and device is not None:
        for key in device.memory_keys(array):
            if key in _KEPT and _KEPT.live(key):
                return device.xp.asarray(array, copy=True, device=device.native)
    return array


def copy_feed(value: Any, device: Any) -> Any:
    """A value fed when the graph is built, copied once (see the module docstring): on
    `device` if it is already there, else on the host, before its upload."""
    if device.owns(value) and getattr(value, "ndim", 0):
        return device.xp.asarray(value, copy=True)
    return host_copy(value)


class Buffers(dict):
    """A node's kept arrays: `node.buffers[name, shape, dtype]` (see the module docstring).

    The first lookup of a key allocates an uninitialised array on the node's device; later ones
    return the same array (one C-level dict lookup).
    """

    shapes_kept = 3

    def __init__(self, node: Any, device: Any) -> None:
        super().__init__()
        self._node = weakref.ref(node)
        self._device = device

    def __missing__(self, key: tuple) -> Any:
        name, shape, dtype = key
        device = self._device
        if not shape or not device.is_floating(dtype):
            return None
        array = device.new_buffer(tuple(shape), dtype)
        plan = self._node()._plan  # the graph plan that bound the node (plan.Plan)
        if plan is not None and not plan.keeping:
            return array  # used once, not kept
        same = [k for k in self if k[0] == name]
        for old in same[:max(0, len(same) - self.shapes_kept + 1)]:
            _KEPT.pop(device.memory_keys(self.pop(old))[0], None)
        self[key] = array
        _KEPT.add(device.memory_keys(array)[0], self._node, key)
        return array


class _NoBuffers(dict):
    """`node.buffers` where arrays are not kept: every lookup gives None, and the ops then
    return new arrays."""

    def __missing__(self, key: tuple) -> None:
        return None


NO_BUFFERS = _NoBuffers()


class forward_only:
    """`with forward_only(plans):` while these graph plans run forward only (`forward_pass`,
    `Graph.run`), their nodes' buffers of shapes not seen before are not kept: a large
    evaluation batch does not hold its memory for good. Other graphs are not affected."""

    def __init__(self, plans: Iterable[Any]) -> None:
        self.plans = [plan for plan in plans if plan is not None]

    def __enter__(self) -> None:
        self.keeping = [plan.keeping for plan in self.plans]
        for plan in self.plans:
            plan.keeping = False

    def __exit__(self, *exc: object) -> None:
        for plan, keeping in zip(self.plans, self.keeping):
            plan.keeping = keeping
