"""What both exporters share: the registry of per-node exporters (`register`, a node's own
`to_onnx` / `to_python` hook), the evaluation pass to write (`Plan`: the nodes from the data
Inputs to the outputs, with their values from the example) and the target path check."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ExportError, GraphError
from ..nodes import Input, Node
from ..nodes.recurrent import LSTM
from ..nodes.sequence import Embedding, ScaledDotProductAttention

# The nodes that make a graph a sequence model: its data Inputs are (N, T, ...), T dynamic.
SEQUENCE_NODES = (Embedding, LSTM, ScaledDotProductAttention)

# {node class: exporter(node, ctx)}, filled by onnx_export.py and python_export.py
ONNX_EXPORTERS: dict[type, Callable[[Node, Any], None]] = {}
PYTHON_EXPORTERS: dict[type, Callable[[Node, Any], None]] = {}


def register(cls: type, *, onnx: Callable | None = None, python: Callable | None = None) -> None:
    """Give the node class `cls` an ONNX and/or a Python exporter: fn(node, ctx), which emits
    the node's operators (ctx.add) or lines (ctx.line); see the module's docstring."""
    if onnx is not None:
        ONNX_EXPORTERS[cls] = onnx
    if python is not None:
        PYTHON_EXPORTERS[cls] = python


def exporter(node: Node, kind: str) -> Callable[[Node, Any], None] | None:
    """The node's exporter of `kind` ('onnx' or 'python'): its class's `to_<kind>` method, else
    the registered function of its class (or of a base class whose forward it inherits, so a
    subclass with its own forward is never exported as its base); None if it has none."""
    hook = getattr(type(node), f"to_{kind}", None)
    if hook is not None:
        return lambda n, ctx: hook(n, ctx)
    table = ONNX_EXPORTERS if kind == "onnx" else PYTHON_EXPORTERS
    for cls in type(node).__mro__:
        if cls in table and getattr(type(node), "forward", None) is getattr(cls, "forward"):
            return table[cls]
    return None


class Plan:
    """What both exports share: the nodes from the data Inputs to the outputs in graph order,
    the weights (parameters, constant Inputs, node state), and every node's example shape."""

    def __init__(self, graph: Any, outputs: "Node | Sequence[Node]", example: Any,
                 kind: str) -> None:
        from ..graph import Graph
        from ..host import to_numpy
        from ..runtime.plan import reachable

        if not isinstance(graph, Graph):
            raise ExportError(f"export needs a gpuflow.Graph, got {type(graph).__name__}.\n"
                              "help: build one, e.g. Graph(loss, outputs=[logits]), and pass "
                              "it with the output nodes.")
        outputs = [outputs] if isinstance(outputs, Node) else list(outputs)
        if not outputs:
            raise ExportError("export: no outputs given.\nhelp: pass the node(s) to compute, "
                              "e.g. the logits.")
        for out in outputs:
            if not isinstance(out, Node) or out not in graph._members:
                what = out.label if isinstance(out, Node) else f"{out!r:.60}"
                raise ExportError(f"export: the output {what} is not in this graph.\nhelp: "
                                  "pass a node of the graph (Graph(..., outputs=[node]) adds "
                                  "one the loss does not depend on).")
            if out.is_loss:
                raise ExportError(f"export: the output {out.label} is a loss, which needs the "
                                  "labels.\nhelp: export the node it scores, e.g. the logits.")
        from ..backends import dtype_name
        self.dtype = dtype_name(graph.dtype)  # 'float32' or 'float64'
        if self.dtype not in ("float32", "float64"):
            raise ExportError(f"export: the graph computes in {self.dtype} (mixed precision); "
                              "export writes float32 or float64.\nhelp: build the graph with "
                              "dtype='float32' and load the weights (or checkpoint) into it.")
        self.graph, self.outputs = graph, outputs
        needed = set(reachable(outputs, "inbound_nodes"))
        self.nodes = [n for n in graph.nodes if n in needed]
        self.inputs = [n for n in graph.inputs if n in needed]
        data = set(self.inputs)
        if not self.inputs:
            raise ExportError(f"export: {', '.join(o.label for o in outputs)} depend on no data "
                              "Input.\nhelp: export a node computed from the data.")
        missing = [n for n in self.nodes if not isinstance(n, Input)
                   and exporter(n, kind) is None]
        if missing:
            names = ", ".join(sorted({type(n).__name__ for n in missing}))
            first = names.split(",")[0]
            raise ExportError(
                f"export: no {'ONNX' if kind == 'onnx' else 'Python'} exporter for "
                f"{', '.join(n.label for n in missing[:4])}"
                f"{', ...' if len(missing) > 4 else ''} ({names}).\nhelp: give the class a "
                f"method to_{kind}(self, ctx), or call gpuflow.export.register({first}, "
                f"{kind}=fn); see help(gpuflow.export).")
        # One evaluation pass on the example: every node's shape, and gpuflow's outputs.
        batches = example if isinstance(example, (tuple, list)) else (example,)
        try:
            self.expected = [to_numpy(graph.run(out, *batches)) for out in outputs]
        except GraphError as exc:
            raise ExportError(f"export: the example does not run through the graph: "
                              f"{exc}") from None
        self.shapes = {n: tuple(getattr(n.value, "shape", ())) for n in self.nodes}
        # Weights: every Input that is not data (parameters, constants set by .value).
        self.weights: dict[str, Any] = {}
        self.names = _Names()
        for n in self.nodes:
            if isinstance(n, Input) and n not in data:
                if n.value is None:
                    raise ExportError(f"export: {n.label} has no value.\nhelp: set it before "
                                      "exporting, or feed it as data.")
                array = to_numpy(n.value)
                self.weights[self.weight_key(n)] = (array.astype(self.dtype)
                                                    if array.dtype.kind == "f" else array)
        self.sequence = any(isinstance(n, SEQUENCE_NODES) for n in self.nodes)
        self.dims = self._dims(batches) if self.sequence else {}

    def _dims(self, batches: Sequence[Any]) -> dict[Node, tuple["int | str", ...]]:
        """A sequence graph's dimensions, named where they follow the batch size ('N') or the
        sequence length ('T', axis 1 of each data Input of 2 or more dimensions) or vary with
        them otherwise ('<node>_<axis>', e.g. N * T rows after a Reshape): the graph is run a
        second time with one more row and one step fewer (more where the example has 1) and
        every node's shapes compared. A graph that takes no other length there (a mask or a
        shape that fixes T) keeps T fixed, its batch dimension only named 'N'."""
        from ..host import to_numpy
        feed = batches[0] if len(batches) == 1 and isinstance(batches[0], dict) else None
        arrays = ([to_numpy(feed[n]) for n in self.inputs if n in feed] if feed is not None
                  else [to_numpy(b) for b in batches])
        n1 = arrays[0].shape[0] if arrays and arrays[0].ndim else 0
        t1 = next((a.shape[1] for a in arrays if a.ndim >= 2), 0)
        t2 = t1 - 1 if t1 >= 2 else 2
        n2 = n1 + 1 if n1 + 1 != t2 else n1 + 2

        def resized(a: Any) -> Any:  # rows repeated from the first, steps from the start
            a = to_numpy(a)
            if a.ndim:
                a = a.take(list(range(n1)) + [0] * (n2 - n1), axis=0)
            if a.ndim >= 2:
                a = a.take([j % a.shape[1] for j in range(t2)], axis=1)
            return a

        second = ([{n: resized(v) for n, v in feed.items()}] if feed is not None
                  else [resized(b) for b in batches])
        try:
            for out in self.outputs:
                self.graph.run(out, *second)
        except GraphError:
            return {}
        dims = {}
        for n in self.nodes:
            second = tuple(getattr(n.value, "shape", ()))
            if len(second) != len(self.shapes[n]):
                return {}
            dims[n] = tuple(d if d == e else "N" if (d, e) == (n1, n2) else "T"
                            if (d, e) == (t1, t2) else f"{self.names.of(n)}_{i}"
                            for i, (d, e) in enumerate(zip(self.shapes[n], second)))
        return dims

    def dims_of(self, node: Node) -> tuple["int | str", ...]:
        """The node's dimensions in the export: sizes, and names for the dynamic ones ('N',
        'T'); outside sequence graphs (and where the sequence length is fixed) the first of a
        data Input's or an output's is 'N'."""
        if node in self.dims:
            return self.dims[node]
        shape = self.shapes[node]
        return ("N", *shape[1:]) if shape else ()

    def weight_key(self, node: Node) -> str:
        """The name an Input's array is stored under: the parameter's name."""
        return node.name or self.names.of(node)

    def state(self, node: Node) -> dict[str, Any]:
        """The node's state (BatchNorm's running statistics) as host arrays, in the graph's
        dtype, stored as '<node name>.<key>'."""
        from ..host import to_numpy
        arrays = {}
        for key, value in node.state_dict().items():
            array = to_numpy(value)
            if array.dtype.kind == "f":
                array = array.astype(self.dtype)
            name = f"{node.name or self.names.of(node)}.{key}"
            self.weights[name] = array
            arrays[key] = name
        return arrays


class _Names:
    """Unique identifiers for nodes: the node's name ('cnn.conv1' -> 'cnn_conv1'), else its
    kind and number ('relu7')."""

    def __init__(self) -> None:
        self._by_node: dict[Node, str] = {}
        self._used: set[str] = set()

    def of(self, node: Node) -> str:
        if node not in self._by_node:
            base = node.name or f"{type(node).__name__.lower()}{node._id}"
            base = "".join(c if c.isalnum() or c == "_" else "_" for c in base)
            if not base or base[0].isdigit():
                base = "n_" + base
            name, k = base, 2
            while name in self._used or name in _RESERVED:
                name, k = f"{base}_{k}", k + 1
            self._used.add(name)
            self._by_node[node] = name
        return self._by_node[node]


_RESERVED = {"xp", "weights", "load", "predict", "conv2d", "max_pool2d", "avg_pool2d", "pad2d",
             "batch_norm", "windows", "array_namespace", "device_of", "e", "mean", "var", "centred",
             "erf", "sigmoid", "attention", "lstm_layer", "start", "stop", "slice", "max",
             "and", "as", "assert", "break", "class", "continue", "def", "del", "elif", "else",
             "except", "finally", "for", "from", "global", "if", "import", "in", "is",
             "lambda", "nonlocal", "not", "or", "pass", "raise", "return", "try", "while",
             "with", "yield", "None", "True", "False"}


def check_target(path: "str | os.PathLike[str]", what: str, folder: bool = False) -> Path:
    """`path` as a Path, after checking that it can be written now (nothing written): for a
    file, its folder exists and takes a file and the path is not a folder; for a folder, it is
    a folder or can be made (its parent exists)."""
    import tempfile
    target = Path(os.fspath(path)).expanduser()
    place = target if folder and target.is_dir() else target.parent.resolve()
    problem = None
    if folder and target.exists() and not target.is_dir():
        problem = "it is a file, not a folder"
    elif not folder and target.is_dir():
        problem = "it is a folder"
    elif not place.is_dir():
        problem = f"the folder {place} does not exist"
    else:
        try:
            with tempfile.TemporaryFile(dir=place, prefix=".gpuflow-write-check-"):
                pass
        except OSError as exc:
            problem = f"cannot write in {place} ({exc.strerror or exc})"
    if problem:
        raise ExportError(f"{what} {os.fspath(path)}: {problem}; nothing was written.\nhelp: "
                          f"pass a {'folder' if folder else 'file'} path in a folder you can "
                          "write to.")
    return target
