"""ONNX export: each node kind mapped to ONNX's own operators with `onnx.helper`.

An exporter is fn(node, ctx): it reads its inputs' tensor names (`ctx.input(node, i)`), adds
operators (`ctx.add(op, inputs, outputs, **attributes)`) and writes the node's value to
`ctx.output(node)`. Weights (Inputs that are not data) become initializers named after the
parameter. See gpuflow/export/__init__.py for the hook a node of your own uses.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from ..conv import AvgPool2D, Conv2D, Flatten, MaxPool2D
from ..errors import ExportError
from ..activations import ReLU, Sigmoid, Softmax, Tanh
from ..nodes import Add, Input, Linear, Node
from ..norm import BatchNorm, Dropout, LayerNorm
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
        """The checked ModelProto: data Inputs in, outputs out, batch dimension 'N'."""
        helper, plan = self.helper, self.plan

        def info(node: Node) -> Any:
            dims = ["N", *self.plan.shapes[node][1:]] if self.plan.shapes[node] else []
            dtype = getattr(node.value, "dtype", None)
            from ..backends import dtype_name
            elem = self.elem_type
            if dtype is not None and "int" in dtype_name(dtype):
                elem = self.onnx.TensorProto.INT64
            return helper.make_tensor_value_info(self.output(node), elem, dims)

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
    from ..checkpoint_io import write_atomically
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


for _cls, _fn in [(Linear, _linear), (Sigmoid, _unary("Sigmoid")), (ReLU, _unary("Relu")),
                  (Tanh, _unary("Tanh")), (Softmax, _softmax), (Conv2D, _conv2d),
                  (MaxPool2D, _pool("MaxPool")), (AvgPool2D, _pool("AveragePool")),
                  (Flatten, _flatten), (Dropout, _dropout), (BatchNorm, _batchnorm),
                  (LayerNorm, _layernorm), (Add, _add)]:
    register(_cls, onnx=_fn)
