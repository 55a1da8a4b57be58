"""ONNX export: each node kind mapped to ONNX's own operators with `onnx.helper`.

An exporter is fn(node, ctx): it reads its inputs' tensor names (`ctx.input(node, i)`), adds
operators (`ctx.add(op, inputs, outputs, **attributes)`) and writes the node's value to
`ctx.output(node)`. Weights (Inputs that are not data) become initializers named after the
parameter. See gpuflow/export/__init__.py for the hook a node of your own uses.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from ..nodes.conv import AvgPool2D, Conv2D, Flatten, MaxPool2D
from ..errors import ExportError
from ..nodes.activations import ReLU, Sigmoid, Softmax, Tanh
from ..nodes import Add, Input, Linear, Node
from ..nodes.norm import BatchNorm, Dropout, LayerNorm
from ..nodes.recurrent import LSTM
from ..nodes.positions import Positions
from ..nodes.sequence import (GELU, BiasAdd, Concat, Embedding, MatMul, Mul, Reshape, Scale,
                        ScaledDotProductAttention, SiLU, Slice, Transpose)
from .core import Plan, check_target, exporter, register

DEFAULT_OPSET = 17   # LayerNormalization's first; onnxruntime 1.12 and later run it


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ExportError("to_onnx needs the onnx package, which is not installed.\nhelp: pip "
                          "install 'gpuflow[onnx]' (or pip install onnx).") from None
    return onnx


class OnnxContext:
    """What an ONNX exporter builds with: tensor names, initializers and operators."""

    def __init__(self, plan: Plan, opset: int | None) -> None:
        import numpy as np
        self.onnx = onnx = _require_onnx()
        self.helper = onnx.helper
        self.plan = plan
        self.opset = opset if opset is not None else DEFAULT_OPSET
        self._fixed_opset = opset is not None
        self.dtype = np.dtype(plan.dtype)
        self.elem_type = onnx.helper.np_dtype_to_tensor_dtype(self.dtype)
        self.operators: list[Any] = []
        self.initializers: dict[str, Any] = {}
        self._tensor: dict[Node, str] = {}
        self._count = 0

    def output(self, node: Node) -> str:
        """The tensor name of `node`'s value (its identifier: 'cnn_conv1')."""
        if node not in self._tensor:
            if isinstance(node, Input) and node not in self.plan.inputs:  # a weight
                key = self.plan.weight_key(node)
                self.initializer(key, self.plan.weights[key])
                self._tensor[node] = key
            else:
                self._tensor[node] = self.plan.names.of(node)
        return self._tensor[node]

    def input(self, node: Node, i: int = 0) -> str:
        """The tensor name of the node's inbound node i (a weight becomes an initializer)."""
        return self.output(node.inbound_nodes[i])

    def shape(self, node: Node) -> tuple[int, ...]:
        """The node's value's shape on the example (its first entry is the batch size there)."""
        return self.plan.shapes[node]

    def initializer(self, name: str, array: Any) -> str:
        """Store `array` (a NumPy array or a number, in the graph's dtype if floating) as the
        initializer `name`; returns the name."""
        import numpy as np
        if name not in self.initializers:
            array = np.asarray(array)
            if array.dtype.kind == "f":
                array = array.astype(self.dtype)
            self.initializers[name] = self.onnx.numpy_helper.from_array(array, name)
        return name

    def constant(self, array: Any, hint: str = "const") -> str:
        """An initializer of its own for a constant (a shape, a scale): returns its name."""
        self._count += 1
        return self.initializer(f"{hint}_{self._count}", array)

    def add(self, op: str, inputs: Sequence[str], outputs: "Sequence[str] | None" = None,
            **attributes: Any) -> str:
        """Append the ONNX operator `op`; returns its (first) output's name (a fresh one unless
        given)."""
        self._count += 1
        if outputs is None:
            outputs = [f"{op.lower()}_{self._count}"]
        self.operators.append(self.helper.make_node(op, list(inputs), list(outputs),
                                                    name=f"{outputs[0]}/{op}", **attributes))
        return outputs[0]

    def require_opset(self, version: int, why: str) -> None:
        """Raise the opset to `version` (ExportError if the caller fixed a lower one)."""
        if version > self.opset:
            if self._fixed_opset:
                raise ExportError(f"to_onnx: {why} needs opset {version} or later, but opset="
                                  f"{self.opset} was asked for.\nhelp: pass opset={version} "
                                  "(or leave it out).")
            self.opset = version

    def model(self) -> Any:
        """The checked ModelProto: data Inputs in, outputs out, batch dimension 'N' (and the
        sequence length 'T' of a sequence model)."""
        helper, plan = self.helper, self.plan

        def info(node: Node) -> Any:
            import numpy as np
            from ..backends import dtype_name
            dtype = getattr(node.value, "dtype", None)
            elem = self.elem_type
            if dtype is not None and dtype_name(dtype) != self.plan.dtype:  # integer ids
                elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype_name(dtype)))
            return helper.make_tensor_value_info(self.output(node), elem,
                                                 list(self.plan.dims_of(node)))

        inputs = [info(n) for n in plan.inputs]
        outputs = [info(n) for n in plan.outputs]
        graph = helper.make_graph(self.operators, "gpuflow", inputs, outputs,
                                  initializer=list(self.initializers.values()))
        from ..version import __version__
        model = helper.make_model(graph, producer_name="gpuflow", producer_version=__version__,
                                  opset_imports=[helper.make_opsetid("", self.opset)])
        # The IR version this onnx package writes may be newer than runtimes read: the oldest
        # that carries this opset.
        model.ir_version = min(model.ir_version, _ir_version(self.onnx, self.opset))
        self.onnx.checker.check_model(model, full_check=True)
        return model


def _ir_version(onnx: Any, opset: int) -> int:
    """The oldest IR version that carries `opset` (onnx.helper's table), else onnx's own."""
    try:
        return onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])
    except Exception:  # an onnx without the table: its own version
        return onnx.IR_VERSION


def to_onnx(graph: Any, path: "str | os.PathLike[str]", outputs: Any, *, example: Any,
            opset: int | None = None) -> Any:
    """gpuflow.export.to_onnx (see there)."""
    _require_onnx()
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)
                              or opset < 13):
        raise ExportError(f"to_onnx: opset={opset!r} must be an int >= 13.\nhelp: leave it out "
                          f"(opset {DEFAULT_OPSET}).")
    target = check_target(path, "to_onnx: path")
    plan = Plan(graph, outputs, example, "onnx")
    ctx = OnnxContext(plan, opset)
    for node in plan.nodes:
        if isinstance(node, Input):
            continue
        exporter(node, "onnx")(node, ctx)
    model = ctx.model()
    from ..checkpoint.io import write_atomically
    from ..errors import CheckpointError
    try:
        write_atomically(str(target), model.SerializeToString())
    except CheckpointError as exc:
        raise ExportError(f"to_onnx: cannot write {os.fspath(path)}: {exc.__cause__}; nothing "
                          "was written.\nhelp: check the free space and permissions there.") \
            from None
    return model


# -- the built-in nodes --------------------------------------------------------------------------
def _linear(node: Node, ctx: OnnxContext) -> None:
    x, w, b = (ctx.input(node, i) for i in range(3))
    if len(ctx.shape(node.inbound_nodes[0])) == 2 and len(ctx.shape(node.inbound_nodes[1])) == 2:
        ctx.add("Gemm", [x, w, b], [ctx.output(node)])
    else:  # N-D input (batch, ..., n_in): MatMul broadcasts over the leading axes
        ctx.add("Add", [ctx.add("MatMul", [x, w]), b], [ctx.output(node)])


def _unary(op: str) -> Any:
    def export(node: Node, ctx: OnnxContext) -> None:
        ctx.add(op, [ctx.input(node)], [ctx.output(node)])
    export.__name__ = f"_{op.lower()}"
    return export


def _softmax(node: Node, ctx: OnnxContext) -> None:
    ctx.add("Softmax", [ctx.input(node)], [ctx.output(node)], axis=-1)


def _conv2d(node: Conv2D, ctx: OnnxContext) -> None:
    (ph, pw), w_shape = node.padding, ctx.shape(node.inbound_nodes[1])
    inputs = [ctx.input(node, i) for i in range(len(node.inbound_nodes))]
    ctx.add("Conv", inputs, [ctx.output(node)], kernel_shape=list(w_shape[2:]),
            strides=list(node.stride), pads=[ph, pw, ph, pw])


def _pool(op: str) -> Any:
    def export(node: Any, ctx: OnnxContext) -> None:
        ctx.add(op, [ctx.input(node)], [ctx.output(node)], kernel_shape=list(node.size),
                strides=list(node.stride))
    export.__name__ = f"_{op.lower()}"
    return export


def _flatten(node: Node, ctx: OnnxContext) -> None:
    ctx.add("Flatten", [ctx.input(node)], [ctx.output(node)], axis=1)


def _dropout(node: Node, ctx: OnnxContext) -> None:
    ctx.add("Identity", [ctx.input(node)], [ctx.output(node)])  # evaluation: the identity


def _batchnorm(node: BatchNorm, ctx: OnnxContext) -> None:
    state = ctx.plan.state(node)
    mean = ctx.initializer(state["running_mean"], ctx.plan.weights[state["running_mean"]])
    var = ctx.initializer(state["running_var"], ctx.plan.weights[state["running_var"]])
    ctx.add("BatchNormalization", [ctx.input(node, 0), ctx.input(node, 1), ctx.input(node, 2),
                                   mean, var], [ctx.output(node)], epsilon=node.eps)


def _layernorm(node: LayerNorm, ctx: OnnxContext) -> None:
    ctx.require_opset(17, node.label)
    ctx.add("LayerNormalization", [ctx.input(node, i) for i in range(3)], [ctx.output(node)],
            axis=-1, epsilon=node.eps)


def _add(node: Add, ctx: OnnxContext) -> None:
    terms = []
    for i, w in enumerate(node.weights):
        term = ctx.input(node, i)
        if w != 1.0:
            term = ctx.add("Mul", [term, ctx.constant(w, "weight")])
        terms.append(term)
    if len(terms) == 1:
        ctx.add("Identity", terms, [ctx.output(node)])
    else:
        ctx.add("Sum", terms, [ctx.output(node)])


# -- the sequence nodes ---------------------------------------------------------------------------
def _ints(values: Sequence[int]) -> Any:
    import numpy as np
    return np.asarray(values, dtype=np.int64)


def _embedding(node: Embedding, ctx: OnnxContext) -> None:
    ctx.add("Gather", [ctx.input(node, 1), ctx.input(node, 0)], [ctx.output(node)], axis=0)


def _binary(op: str) -> Any:
    def export(node: Node, ctx: OnnxContext) -> None:
        ctx.add(op, [ctx.input(node, 0), ctx.input(node, 1)], [ctx.output(node)])
    export.__name__ = f"_{op.lower()}"
    return export


def _scale(node: Scale, ctx: OnnxContext) -> None:
    ctx.add("Mul", [ctx.input(node), ctx.constant(node.c, "scale")], [ctx.output(node)])


def _reshape(node: Reshape, ctx: OnnxContext) -> None:
    """None (keep x's size there) is ONNX's 0, 'copy this dimension' (allowzero=0)."""
    if 0 in node.shape:
        raise ExportError(f"to_onnx: {node.label} reshapes to a size 0 {node.shape}, which "
                          "ONNX's Reshape reads as 'copy this dimension'.\nhelp: leave the "
                          "empty Reshape out of the exported graph.")
    shape = ctx.constant(_ints([0 if n is None else n for n in node.shape]), "shape")
    ctx.add("Reshape", [ctx.input(node), shape], [ctx.output(node)])


def _transpose(node: Transpose, ctx: OnnxContext) -> None:
    ctx.add("Transpose", [ctx.input(node)], [ctx.output(node)], perm=list(node.axes))


def _concat(node: Concat, ctx: OnnxContext) -> None:
    ctx.add("Concat", [ctx.input(node, i) for i in range(len(node.inbound_nodes))],
            [ctx.output(node)], axis=node.axis)


def _slice(node: Slice, ctx: OnnxContext) -> None:
    """Python's slice rules are ONNX Slice's (negative bounds count from the end, bounds
    clipped to the axis, start >= stop empty); None: the axis' start or end."""
    big = 2 ** 63 - 1
    start = 0 if node.start is None else node.start
    stop = big if node.stop is None else node.stop
    bounds = [ctx.constant(_ints([v]), hint) for v, hint in
              ((start, "start"), (stop, "stop"), (node.axis, "axis"))]
    ctx.add("Slice", [ctx.input(node), *bounds], [ctx.output(node)])


def _gelu(node: GELU, ctx: OnnxContext) -> None:
    """ONNX's Gelu from opset 20; before, gpuflow's formula (Erf, or Tanh) in its order."""
    from ..nodes.sequence import _KAPPA, _SQRT1_2, _SQRT_2_OVER_PI
    x = ctx.input(node)
    if ctx.opset >= 20:
        ctx.add("Gelu", [x], [ctx.output(node)], approximate=node.approximate)
        return
    if node.approximate == "none":  # 0.5 (1 + erf(x / sqrt 2))
        inner = ctx.add("Erf", [ctx.add("Mul", [x, ctx.constant(_SQRT1_2, "c")])])
    else:                           # 0.5 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        cube = ctx.add("Mul", [ctx.add("Mul", [x, x]), x])
        inner = ctx.add("Add", [x, ctx.add("Mul", [ctx.constant(_KAPPA, "c"), cube])])
        inner = ctx.add("Tanh", [ctx.add("Mul", [ctx.constant(_SQRT_2_OVER_PI, "c"), inner])])
    cdf = ctx.add("Mul", [ctx.constant(0.5, "c"),
                          ctx.add("Add", [ctx.constant(1.0, "c"), inner])])
    ctx.add("Mul", [x, cdf], [ctx.output(node)])


def _silu(node: SiLU, ctx: OnnxContext) -> None:
    x = ctx.input(node)
    ctx.add("Mul", [x, ctx.add("Sigmoid", [x])], [ctx.output(node)])


def _attention(node: ScaledDotProductAttention, ctx: OnnxContext) -> None:
    """MatMul, the scale, the causal mask built from the dynamic lengths (Range and
    GreaterOrEqual on Shape(q) and Shape(k)) or the boolean mask, Softmax, MatMul. A row the
    mask blocks everywhere gives 0, as gpuflow (Softmax's NaN there replaced by Where)."""
    import math
    import numpy as np
    from ..host import to_numpy
    q, k, v = (ctx.input(node, i) for i in range(3))
    rank = len(ctx.shape(node.inbound_nodes[1]))
    kt = ctx.add("Transpose", [k], perm=[*range(rank - 2), rank - 1, rank - 2])
    scores = ctx.add("Mul", [ctx.add("MatMul", [q, kt]),
                             ctx.constant(1.0 / math.sqrt(ctx.shape(node.inbound_nodes[0])[-1]),
                                          "scale")])
    rows_ok = None
    if node.causal:  # position i attends to j <= i
        second_last = ctx.constant(np.asarray(-2, np.int64), "axis")
        zero, one = ctx.constant(np.asarray(0, np.int64), "zero"), ctx.constant(
            np.asarray(1, np.int64), "one")
        tq, tk = (ctx.add("Gather", [ctx.add("Shape", [t]), second_last], axis=0) for t in (q, k))
        rows = ctx.add("Unsqueeze", [ctx.add("Range", [zero, tq, one]),
                                     ctx.constant(_ints([1]), "axes")])
        keep = ctx.add("GreaterOrEqual", [rows, ctx.add("Range", [zero, tk, one])])
    elif node.mask is not None:
        mask = to_numpy(node.mask).astype(bool)
        keep = ctx.constant(mask, "mask")
        if not mask.any(axis=-1).all():
            rows_ok = ctx.constant(mask.any(axis=-1, keepdims=True), "rows")
    if node.causal or node.mask is not None:
        scores = ctx.add("Where", [keep, scores, ctx.constant(-np.inf, "blocked")])
    p = ctx.add("Softmax", [scores], axis=-1)
    if rows_ok is not None:
        p = ctx.add("Where", [rows_ok, p, ctx.constant(0.0, "zero")])
    ctx.add("MatMul", [p, v], [ctx.output(node)])


def _lstm(node: LSTM, ctx: OnnxContext) -> None:
    """ONNX's LSTM: the weights' gate blocks reordered from torch's i, f, g, o to ONNX's i, o,
    f, c (Gather, which runtimes fold into the initializers) and stacked (W, R, B); x (N, T,
    input) made sequence-first and the hidden states (T, 1, N, H) batch-first by Transposes
    (onnxruntime does not run LSTM's layout=1)."""
    import numpy as np
    x, w_ih, w_hh, b_ih, b_hh = (ctx.input(node, i) for i in range(5))
    H = ctx.shape(node.inbound_nodes[2])[1]
    order = ctx.constant(np.concatenate([np.arange(a * H, (a + 1) * H) for a in (0, 3, 1, 2)]),
                         "gates_iofc")
    first = ctx.constant(_ints([0]), "axes")

    def reordered(w: str) -> str:
        return ctx.add("Gather", [w, order], axis=0)

    W, R = (ctx.add("Unsqueeze", [reordered(w), first]) for w in (w_ih, w_hh))
    B = ctx.add("Unsqueeze", [ctx.add("Concat", [reordered(b_ih), reordered(b_hh)], axis=0),
                              first])
    xs = ctx.add("Transpose", [x], perm=[1, 0, 2])
    ys = ctx.add("LSTM", [xs, W, R, B], hidden_size=H)                 # (T, 1, N, H)
    ctx.add("Squeeze", [ctx.add("Transpose", [ys], perm=[2, 0, 1, 3]),  # (N, T, 1, H)
                        ctx.constant(_ints([2]), "axes")], [ctx.output(node)])


def _positions(node: Positions, ctx: OnnxContext) -> None:
    """W[:T], T the ids' last dimension (gf.layers.gpt's learned positions)."""
    length = ctx.add("Shape", [ctx.input(node, 0)], start=-1)
    ctx.add("Slice", [ctx.input(node, 1), ctx.constant(_ints([0]), "start"), length,
                      ctx.constant(_ints([0]), "axis")], [ctx.output(node)])


for _cls, _fn in [(Embedding, _embedding), (MatMul, _binary("MatMul")), (Mul, _binary("Mul")),
                  (BiasAdd, _binary("Add")), (Scale, _scale), (Reshape, _reshape),
                  (Transpose, _transpose), (Concat, _concat), (Slice, _slice), (GELU, _gelu),
                  (SiLU, _silu), (ScaledDotProductAttention, _attention), (LSTM, _lstm),
                  (Positions, _positions)]:
    register(_cls, onnx=_fn)

for _cls, _fn in [(Linear, _linear), (Sigmoid, _unary("Sigmoid")), (ReLU, _unary("Relu")),
                  (Tanh, _unary("Tanh")), (Softmax, _softmax), (Conv2D, _conv2d),
                  (MaxPool2D, _pool("MaxPool")), (AvgPool2D, _pool("AveragePool")),
                  (Flatten, _flatten), (Dropout, _dropout), (BatchNorm, _batchnorm),
                  (LayerNorm, _layernorm), (Add, _add)]:
    register(_cls, onnx=_fn)
