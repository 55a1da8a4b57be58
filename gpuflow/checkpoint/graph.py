"""Between a graph and the host arrays of a file: what checkpoint.py (`save`, `load`) and
weights.py (`export_weights`, `load_weights`) both read from a graph and put back into it.

Both import this module and it imports neither, so imports run one way:
checkpoint.py -> weights.py -> checkpoint_graph.py.
"""

from __future__ import annotations

import json
import numbers
from typing import Any

import numpy as np

from ..errors import CheckpointProblem


def like(device: Any, host: np.ndarray, old: Any, what: str) -> Any:
    """`host` as the kind of value `old` (a node's state entry) was: a Python scalar, a host
    array (a node that has not run yet keeps its state on the host), or an array on the
    device in `old`'s dtype."""
    if isinstance(old, (numbers.Number, np.generic)):
        return type(old.item() if isinstance(old, np.generic) else old)(host.item())
    if isinstance(old, np.ndarray) and not device.owns(old):
        return host.astype(old.dtype)
    return device.put(host, old.dtype, what=what)


def stateful_nodes(graph: Any) -> dict[str, tuple[Any, dict[str, Any]]]:
    """{name: (node, its state_dict())} for every node of `graph` with persistent state.

    A node is named by its `name`, else by its type and its position in the graph's order
    (the same for the same architecture in every process)."""
    found: dict[str, tuple[Any, dict[str, Any]]] = {}
    for i, node in enumerate(graph.nodes):
        state_dict = getattr(node, "state_dict", None)
        if not callable(state_dict) or not callable(getattr(node, "load_state_dict", None)):
            continue
        state = state_dict()
        if not state:
            continue
        name = node.name or f"{type(node).__name__}:{i}"
        if name in found:
            raise CheckpointProblem(f": two nodes with state are named "
                                    f"{name!r}.\nhelp: give every such node a unique name.")
        found[name] = (node, dict(state))
    return found


def architecture(graph: Any) -> str:
    """The graph's nodes in order as JSON: [{"name", "type", "inputs"}] (informative)."""
    names = {node: node.name or f"{type(node).__name__}:{i}" for i, node in enumerate(graph.nodes)}
    return json.dumps([{"name": names[n], "type": type(n).__name__,
                        "inputs": [names.get(m, m.label) for m in n.inbound_nodes]}
                       for n in graph.nodes])


def gpuflow_version() -> str:
    """The version written into every file's metadata."""
    from .. import __version__  # lazily: gpuflow/__init__ may import the checkpoint modules
    return __version__
