"""Deployment: a trained graph's inference pass as an ONNX file, or as a standalone Python module.

    import gpuflow.export
    gpuflow.export.to_onnx(graph, "model.onnx", logits, example=X[:1])
    gpuflow.export.to_python(graph, "model/", logits, example=X[:1])
    # model/model.py imports nothing from gpuflow:
    #   weights = model.load("model/weights.safetensors", xp); model.predict(x, weights)

Both write the evaluation pass (Dropout the identity, BatchNorm with its running statistics)
from the graph's data Inputs to `outputs` (a node or a list of nodes of the graph). `example`
is one batch as `Graph.run` takes it (one array per data Input, a tuple of them, or a dict
{Input: array}); it is run once through gpuflow to fix every node's shape but the batch size,
which stays free (ONNX: a dynamic first dimension "N"). A sequence model (one with Embedding,
LSTM or ScaledDotProductAttention) also keeps its sequence length free: axis 1 of its data
Inputs, "T" in ONNX; the graph is run once more with another batch size and length to find
every dimension that follows them (one that varies otherwise, e.g. T - 1 after a Slice, is
named "<node>_<axis>"), and where the graph takes no other length (a mask of fixed size), T
stays the example's. Weights are stored in the graph's dtype.

Each kind of node exports through a small function that maps it to ONNX operators, and another
that writes its line of Python (gpuflow/export/onnx_export.py, python_export.py). A node of
your own gets its exporter by a method on its class, called with the export's context:

    class Swish(gf.Node):
        ...
        def to_onnx(self, ctx):          # ctx: onnx_export.OnnxContext
            x = ctx.input(self)          # the tensor name of inbound node 0
            ctx.add("Mul", [x, ctx.add("Sigmoid", [x])], [ctx.output(self)])

        def to_python(self, ctx):        # ctx: python_export.PythonContext
            x = ctx.input(self)          # the variable holding inbound node 0
            ctx.line(f"{ctx.output(self)} = {x} / (1.0 + xp.exp(-{x}))")

or, for a library's node, `register(NodeClass, onnx=fn, python=fn)` with fn(node, ctx). Nodes
without one are refused before anything is written (ExportError naming them and this hook).

ONNX: how it is built. The nodes map to ONNX's own operators with `onnx.helper` (Gemm, Conv,
MaxPool, BatchNormalization, LayerNormalization, ...), rather than running the nodes' forward
code on `ndonnx` arrays (an array-API library whose operations record an ONNX graph). Tried on
the digits CNN (onnx 1.23, ndonnx 0.23, onnxruntime 1.32, a shared 2-core CPU; the script:
benchmarks/export_onnx.py --ndonnx): tracing the array-API forward pass (the standalone
module's `predict`) through ndonnx fails with a dynamic batch dimension (the forward code
makes arrays of its input's shape, `xp.zeros((n, ...))`, and n is unknown while tracing); with
the batch fixed at 256 it records 333 operators (187 Constants; the convolution as im2col
slices, Concat and MatMul, no ONNX Conv), which onnxruntime ran in 42 to 55 ms at batch 256
(two runs) against 0.85 to 1.2 ms for the 13 operators the mapping writes (Conv,
BatchNormalization, MaxPool, Gemm: the runtime's own kernels, which TensorRT, CoreML or web
runtimes also fuse). Running the nodes themselves on ndonnx would also make it a gpuflow
backend that every node must support (devices, buffers, `ops`). The mapping costs one short
function per node kind and keeps `onnx` the only dependency (`pip install 'gpuflow[onnx]'`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import ExportError
from ..nodes import Node
from .core import (ONNX_EXPORTERS, PYTHON_EXPORTERS, Plan, check_target,  # noqa: F401
                   exporter, register)

__all__ = ["to_onnx", "to_python", "register", "ExportError"]

def to_onnx(graph: Any, path: "str | os.PathLike[str]", outputs: "Node | Sequence[Node]", *,
            example: Any, opset: int | None = None) -> Any:
    """Write the graph's evaluation pass from its data Inputs to `outputs` as the ONNX file
    `path` (a dynamic batch dimension 'N', and sequence length 'T' for a sequence model;
    opset `opset`, default 17, or higher where a node needs it; GELU is ONNX's Gelu from opset
    20, its formula before). Returns the onnx.ModelProto, checked by onnx.checker.check_model.
    Needs the `onnx` package (pip install 'gpuflow[onnx]'). ExportError, with nothing
    written, for a node without an exporter, an output not in the graph, or a path that cannot
    be written."""
    from . import onnx_export
    return onnx_export.to_onnx(graph, path, outputs, example=example, opset=opset)


def to_python(graph: Any, folder: "str | os.PathLike[str]", outputs: "Node | Sequence[Node]",
              *, example: Any) -> Path:
    """Write `folder`/model.py and `folder`/weights.safetensors: a module that imports nothing
    from gpuflow, with `load(path, xp)` (the weights as arrays of the namespace xp) and
    `predict(x, weights)` (the evaluation pass on x's namespace: NumPy, CuPy, PyTorch, JAX or
    any array-API library). Returns the path of model.py. ExportError as to_onnx."""
    from . import python_export
    return python_export.to_python(graph, folder, outputs, example=example)
