"""Weights exchanged with other frameworks: plain safetensors files of named tensors.

    export_weights(graph, "mlp.safetensors")           # PyTorch's names and layouts
    model.load_state_dict(safetensors.torch.load_file("mlp.safetensors"))
    safetensors.torch.save_file(model.state_dict(), "torch.safetensors")
    load_weights(graph, "torch.safetensors")           # and the other way round

How names map (layout="torch"): the graph's compute nodes (every node that is not an Input),
in the graph's order, are numbered from 0 as the modules of an equal `torch.nn.Sequential`
are: `gf.mlp(X, [64, 32, 10])` is Linear 0, ReLU 1, Linear 2, as `Sequential(Linear(64, 32),
ReLU(), Linear(32, 10))`. A node's parameter in inbound slot 1 (Linear's and Conv2D's W, a
norm's gamma) is `<index>.weight`, in slot 2 (b, beta) `<index>.bias`, in another slot
`<index>.<its name>`; a node's state (BatchNorm's running statistics) is `<index>.<key>`
(BatchNorm's num_batches_tracked, which gpuflow does not keep, is written as 0 and ignored).
A weight file holds the weights and the state a torch module has, nothing else: the state
keys a node lists in `checkpoint_only_state` (Dropout's step counter, where its mask sequence
resumes) are left out of it and left as they are by `load_weights`; `checkpoint.save` keeps
them.
A parameter whose layer names it for torch (its `torch_name`, set by `gf.layers.gpt`: the
state_dict key of the equal torch module, e.g. "blocks.0.attn.in_proj_weight") goes by that
name instead of its module index.
Linear's W is (in, out) in gpuflow and (out, in) in PyTorch: it is transposed both ways;
Conv2D's W is laid out as PyTorch's already. `mapping={gpuflow name: file name}` names any
tensor explicitly (a node's state as "<node name>/<key>"), e.g. for a torch module whose layers
are called fc1, fc2 (when names differ, the error suggests the mapping that pairs the layers
by what they hold, roles and shapes, in order). layout="gpuflow": gpuflow's own names, nothing
transposed.

Weight files are safetensors; a PyTorch pickle (torch.save's .pt) is refused, never loaded.
A gpuflow checkpoint (written by `checkpoint.save`) also loads here: its parameters and node
state, by name.
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import Any

import numpy as np

from . import io as checkpoint_io
from ..backends import to_host
from .graph import architecture, gpuflow_version, like, stateful_nodes
from .io import fspath
from ..errors import CheckpointError, CheckpointProblem, checkpoint_path
from ..nodes import Input, Linear

LAYOUTS = ("torch", "gpuflow")


def export_weights(graph: Any, path: "str | os.PathLike[str]", layout: str = "torch", *,
                   mapping: "dict[str, str] | None" = None) -> None:
    """Write `graph`'s parameters and node state to the safetensors file `path` (atomically),
    named and laid out for `layout` ('torch': an equal torch.nn.Sequential's state_dict;
    'gpuflow': gpuflow's names). Raises CheckpointError for a path that cannot be written."""
    path = fspath(path)
    if path.lower().endswith(".npz"):
        raise CheckpointError(f"export_weights {path!r}: weights are written as safetensors.\n"
                              f"help: export to {path[:-4] + '.safetensors'!r}.")
    tensors = {}
    with checkpoint_path(path):
        entries = _entries(graph, layout, mapping)
    for entry in entries.values():
        host = np.asarray(to_host(entry.get(), graph.device, what=f"export of {entry.what}"),
                          order="C")
        tensors[entry.file_name] = np.asarray(host.T if entry.transpose else host, order="C")
    if layout == "torch":
        tensors.update(_torch_extras(entries))
    metadata = {"format": "pt" if layout == "torch" else "gpuflow-weights",
                "gpuflow_version": gpuflow_version(), "architecture": architecture(graph)}
    checkpoint_io.write_atomically(path, checkpoint_io.safetensors_bytes(tensors, metadata))


def load_weights(graph: Any, path: "str | os.PathLike[str]",
                 mapping: "dict[str, str] | None" = None, *, layout: str = "torch",
                 strict: bool = True) -> None:
    """Load the parameters (and node state) of `graph` from the safetensors file `path`, e.g.
    a PyTorch state_dict saved with `safetensors.torch.save_file`, onto the graph's device in
    its dtype.

    mapping: {gpuflow parameter name: the file's tensor name} for names the rule above does
    not give. strict: every tensor of the file must be used (False ignores the others).
    Raises CheckpointError, naming the file, listing the parameters the file lacks, the
    tensors it has that nothing took and every shape that differs; nothing changes then.
    """
    path = fspath(path)
    if _is_torch_pickle(path):
        raise CheckpointError(f"weights {path!r} are a PyTorch pickle (torch.save), which gpuflow "
                              "never unpickles (unpickling runs code the file names).\nhelp: "
                              "save them as safetensors in PyTorch: safetensors.torch."
                              "save_file(model.state_dict(), 'model.safetensors').")
    contents = checkpoint_io.read(path)
    tensors = contents.arrays
    if "gpuflow" in contents.metadata:  # a gpuflow checkpoint: its parameters and node state
        tensors = {k.partition("/")[2]: v for k, v in tensors.items()  # by name
                   if k.startswith(("param/", "node/"))}
        layout, strict = "gpuflow", False
    with checkpoint_path(path):
        entries = _entries(graph, layout, mapping)
    problems, used = [], set()
    for entry in entries.values():
        host = tensors.get(entry.file_name)
        if host is None:
            problems.append(f"{entry.what} (shape {entry.shape}) has no tensor "
                            f"{entry.file_name!r} in the file")
            continue
        used.add(entry.file_name)
        shape = tuple(host.shape)[::-1] if entry.transpose else tuple(host.shape)
        if shape != entry.shape:
            problems.append(f"{entry.what}: expected shape {entry.shape} (this model), actual "
                            f"{shape} (tensor {entry.file_name!r}"
                            f"{', transposed' if entry.transpose else ''})")
        elif host.dtype.kind not in ("f" if entry.param else "biuf"):
            problems.append(f"tensor {entry.file_name!r} has dtype {host.dtype}, not a "
                            "floating-point type")
    if layout == "torch":  # buffers PyTorch keeps that gpuflow has no use for
        used.update(_torch_extras(entries))
    unused = [f"{k} {tuple(v.shape)}" for k, v in sorted(tensors.items()) if k not in used]
    if unused and strict:
        problems.append(f"tensors in the file that nothing took: {', '.join(unused[:8])}"
                        f"{', ...' if len(unused) > 8 else ''}")
    if problems:
        guess = _guess_mapping(entries, tensors, used)
        fix = (f"if this pairing by order and shape is right, pass mapping={guess}" if guess
               else "pass mapping={gpuflow name: tensor name} for the names that differ "
               "(gpuflow names: " + ", ".join(list(entries)[:6]) +
               (", ..." if len(entries) > 6 else "") + "), or strict=False to leave tensors out")
        raise CheckpointError(f"weights {path!r} do not match this model ({layout} names):\n  "
                              + "\n  ".join(problems) + f"\nhelp: {fix}.")
    new = {key: entry.put(tensors[entry.file_name]) for key, entry in entries.items()}
    for key, entry in entries.items():  # everything is on the device: now assign
        entry.set(new[key])
    for node, names in _node_states(entries).items():
        kept = {k: v for k, v in node.state_dict().items()  # what no weight file holds
                if k in getattr(node, "checkpoint_only_state", ())}
        node.load_state_dict({**kept, **{k: new[key] for k, key in names.items()}})


def _is_torch_pickle(path: str) -> bool:
    """Whether `path` is a torch.save file: a zip archive holding `<name>/data.pkl` (an .npz
    checkpoint is a zip of .npy members; anything else is checkpoint_io.read's to judge)."""
    try:
        with open(path, "rb") as f:
            if not f.read(4).startswith(b"PK"):
                return False
            f.seek(0)
            with zipfile.ZipFile(f) as archive:
                return any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


class _Entry:
    """One tensor of the exchange: a parameter's value or one key of a node's state."""

    def __init__(self, graph: Any, file_name: str, what: str, *, param: Any = None,
                 node: Any = None, key: str = "", value: Any = None,
                 transpose: bool = False) -> None:
        self.graph, self.file_name, self.what = graph, file_name, what
        self.param, self.node, self.key, self.transpose = param, node, key, transpose
        current = param.value if param is not None else value
        self.current = current
        self.shape = tuple(np.shape(current))

    def get(self) -> Any:
        return self.current

    def put(self, host: np.ndarray) -> Any:
        host = np.asarray(host.T, order="C") if self.transpose else host
        if self.param is None:  # a node's state entry: as the node keeps it
            return like(self.graph.device, host, self.current, f"weights for {self.what}")
        dtype = self.graph.dtype if self.graph.dtype is not None else self.current.dtype
        return self.graph.device.put(host, dtype, what=f"weights for {self.what}")

    def set(self, value: Any) -> None:
        if self.param is not None:
            self.param.value = value


def _guess_mapping(entries: dict[str, _Entry], tensors: dict[str, np.ndarray],
                   used: set[str]) -> "dict[str, str] | None":
    """The mapping that pairs the entries the file lacks with the tensors nothing took, layer
    by layer, if every layer pairs; else None.

    A layer is what shares a name up to its last dot (`bn1.weight`, `bn1.running_mean`), and
    two layers pair when they hold the same roles (weight, bias, running_mean, ...) in the
    same shapes: a conv1/bn1/fc1 module pairs with the graph's Conv2D, BatchNorm and Linear
    whatever the names' alphabetical order (a safetensors file keeps no module order: its
    tensors are sorted by dtype and name). Layers alike pair in order: the graph's in the
    graph's order, the file's in the natural order of their names (fc2 before fc10)."""
    missing = [(k, e) for k, e in entries.items() if e.file_name not in tensors]
    spare = [k for k in tensors if k not in used and not k.endswith(".num_batches_tracked")]
    if not missing or len(missing) != len(spare):
        return None
    ours: dict[str, list[tuple[str, _Entry]]] = {}
    for key, entry in missing:
        ours.setdefault(entry.file_name.rpartition(".")[0], []).append((key, entry))
    theirs: dict[str, list[str]] = {}
    for name in spare:
        theirs.setdefault(name.rpartition(".")[0], []).append(name)
    natural = sorted(theirs, key=lambda n: [int(t) if t.isdigit() else t
                                            for t in re.split(r"(\d+)", n)])
    alike: dict[tuple, list[str]] = {}  # the file's layers by what they hold: {((role, shape),
    for prefix in natural:                 # ...): [their names, in natural order]}
        holds = tuple(sorted((name.rpartition(".")[2], tuple(tensors[name].shape))
                             for name in theirs[prefix]))
        alike.setdefault(holds, []).append(prefix)
    guess = {}
    for group in ours.values():  # in the graph's order
        roles = {entry.file_name.rpartition(".")[2]: (key, entry) for key, entry in group}
        holds = tuple(sorted((role, entry.shape[::-1] if entry.transpose else entry.shape)
                             for role, (_, entry) in roles.items()))
        if len(roles) != len(group) or not alike.get(holds):
            return None
        prefix = alike[holds].pop(0)
        for role, (key, _) in roles.items():
            guess[key] = f"{prefix}.{role}" if prefix else role
    return guess


def _torch_extras(entries: dict[str, _Entry]) -> dict[str, np.ndarray]:
    """Tensors of an equal torch module that gpuflow does not keep: BatchNorm's
    num_batches_tracked (PyTorch uses it only with momentum=None), beside its running_mean
    (under the mapped name too), written as 0 so that torch's strict load_state_dict finds
    it, and ignored when loading."""
    extras = {}
    for entry in entries.values():
        if type(entry.node).__name__ == "BatchNorm" and entry.key == "running_mean":
            prefix = entry.file_name.rpartition(".")[0]
            extras[f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked"] = \
                np.zeros((), np.int64)
    return extras


def _node_states(entries: dict[str, _Entry]) -> dict[Any, dict[str, str]]:
    out: dict[Any, dict[str, str]] = {}
    for key, entry in entries.items():
        if entry.node is not None:
            out.setdefault(entry.node, {})[entry.key] = key
    return out


def _entries(graph: Any, layout: str, mapping: "dict[str, str] | None") -> dict[str, _Entry]:
    """{gpuflow name: _Entry} for every parameter and node state key of `graph`; a
    CheckpointProblem (without the file's path) for a layout or mapping that does not fit."""
    if layout not in LAYOUTS:
        raise CheckpointProblem(f": layout={layout!r}; expected one of {LAYOUTS}.\nhelp: "
                                "layout='torch' for PyTorch's names.", before="weights ")
    mapping = dict(mapping or {})
    torch = layout == "torch"
    index = {n: i for i, n in enumerate(n for n in graph.nodes if not isinstance(n, Input))}
    entries: dict[str, _Entry] = {}
    for name, p in graph.named_parameters().items():
        consumer, slot = next(((n, n.inbound_nodes.index(p)) for n in graph.nodes
                               if n in index and p in n.inbound_nodes), (None, 0))
        transpose = torch and isinstance(consumer, Linear) and slot == 1 and np.ndim(p.value) == 2
        role = {1: "weight", 2: "bias"}.get(slot, name)
        file_name = f"{index[consumer]}.{role}" if torch and consumer is not None else name
        if torch and getattr(p, "torch_name", None):  # a layer that knows its torch name
            file_name = p.torch_name
        entries[name] = _Entry(graph, mapping.pop(name, file_name), f"parameter {name!r}",
                               param=p, transpose=transpose)
    for node_name, (node, state) in stateful_nodes(graph).items():
        for key, value in state.items():
            if key in getattr(node, "checkpoint_only_state", ()):
                continue  # gpuflow's own (Dropout's step counter): checkpoints keep it
            gf_name = f"{node_name}/{key}"
            file_name = f"{index[node]}.{key}" if torch and node in index else gf_name
            entries[gf_name] = _Entry(graph, mapping.pop(gf_name, file_name),
                                      f"state {key!r} of {node.label}", node=node, key=key,
                                      value=value)
    if mapping:
        raise CheckpointProblem(f": mapping names {sorted(mapping)}, which this model does "
                                f"not have.\nhelp: map gpuflow names "
                                f"({', '.join(list(entries)[:6])}, ...) to the file's names.",
                                before="weights ")
    return entries
