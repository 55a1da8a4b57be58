"""Standalone export: `model.py` (one readable line, or small block, per node) and
`weights.safetensors`, which run without gpuflow on any array-API library.

An exporter is fn(node, ctx): it reads the expressions of its inputs (`ctx.input(node, i)`: a
variable, or `weights["name"]` for a weight) and writes lines that assign
`ctx.output(node)` (`ctx.line(...)`), using `xp`, the namespace of the input array, and only
the array API standard. Convolution and pooling use helper functions written into model.py
(`ctx.helper("conv2d")`): im2col by slicing and one matmul, as gpuflow's portable route does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..nodes.conv import AvgPool2D, Conv2D, Flatten, MaxPool2D
from ..errors import CheckpointError, ExportError
from ..nodes.activations import ReLU, Sigmoid, Softmax, Tanh
from ..nodes import Add, Input, Linear, Node
from ..nodes.norm import BatchNorm, Dropout, LayerNorm
from ..nodes.recurrent import LSTM
from ..nodes.positions import Positions
from ..nodes.sequence import (GELU, BiasAdd, Concat, Embedding, MatMul, Mul, Reshape, Scale,
                        ScaledDotProductAttention, SiLU, Slice, Transpose)
from .core import Plan, check_target, exporter, register


class PythonContext:
    """What a Python exporter writes with: expressions for inputs and weights, lines, helpers."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.lines: list[str] = []
        self.helpers: list[str] = []

    def output(self, node: Node) -> str:
        """The expression of `node`'s value: its variable ('cnn_conv1'), or for a weight
        `weights["cnn.conv1.W"]`."""
        if isinstance(node, Input) and node not in self.plan.inputs:
            return self.weight(self.plan.weight_key(node))
        return self.plan.names.of(node)

    def input(self, node: Node, i: int = 0) -> str:
        """The expression of the node's inbound node i."""
        return self.output(node.inbound_nodes[i])

    def weight(self, key: str) -> str:
        """The expression of the stored array `key`."""
        return f"weights[{json.dumps(key)}]"

    def state(self, node: Node) -> dict[str, str]:
        """{key: expression} of the node's state (BatchNorm's running statistics), stored."""
        return {key: self.weight(name) for key, name in self.plan.state(node).items()}

    def shape(self, node: Node) -> tuple[int, ...]:
        """The node's value's shape on the example (its first entry is the batch size there)."""
        return self.plan.shapes[node]

    def line(self, text: str) -> None:
        """Append a line (or lines) to predict's body."""
        self.lines.extend(text.splitlines())

    def helper(self, name: str) -> str:
        """Write the helper function `name` (of HELPERS) into model.py; returns the name."""
        for needed in _HELPER_NEEDS.get(name, ()) + (name,):
            if needed not in self.helpers:
                self.helpers.append(needed)
        return name


def to_python(graph: Any, folder: "str | os.PathLike[str]", outputs: Any, *,
              example: Any) -> Path:
    """gpuflow.export.to_python (see there)."""
    from safetensors.numpy import save as to_bytes

    target = check_target(folder, "to_python: folder", folder=True)
    plan = Plan(graph, outputs, example, "python")
    ctx = PythonContext(plan)
    for node in plan.nodes:
        if not isinstance(node, Input):
            exporter(node, "python")(node, ctx)
    source = _module(plan, ctx)
    compile(source, "model.py", "exec")  # a broken exporter fails here, before any write
    weights = to_bytes(dict(plan.weights), metadata={"format": "gpuflow-export"})
    from ..checkpoint.io import write_atomically
    made = not target.exists()
    try:
        target.mkdir(exist_ok=True)
        write_atomically(str(target / "weights.safetensors"), weights)
        write_atomically(str(target / "model.py"), source.encode())
    except (OSError, CheckpointError) as exc:
        for name in ("weights.safetensors", "model.py"):
            if made:
                (target / name).unlink(missing_ok=True)
        if made and target.is_dir():
            target.rmdir()
        raise ExportError(f"to_python: cannot write {os.fspath(folder)}: "
                          f"{exc.__cause__ or exc}.\nhelp: check the free space and "
                          "permissions there.") from None
    return target / "model.py"


def _module(plan: Plan, ctx: PythonContext) -> str:
    """The text of model.py."""
    from ..version import __version__
    inputs = [plan.names.of(n) for n in plan.inputs]
    outputs = [ctx.output(n) for n in plan.outputs]

    def described(nodes: list, names: list) -> str:
        return ", ".join(f"{name} ({', '.join(map(str, plan.dims_of(n)))}"
                         f"{',' if len(plan.dims_of(n)) == 1 else ''})"
                         for n, name in zip(nodes, names))

    body = "\n".join(f"    {line}" if line else "" for line in ctx.lines)
    returned = ", ".join(outputs)
    helpers = "\n\n".join(HELPERS[name].strip("\n") for name in ctx.helpers)
    args = ", ".join(inputs)
    return f'''"""The evaluation pass of a gpuflow graph (Dropout the identity, BatchNorm with its
running statistics), exported by gpuflow {__version__}. It imports nothing from gpuflow and runs
on any array-API library (NumPy, CuPy, PyTorch, JAX, ...):

    import numpy as np                  # or torch, jax.numpy, cupy, ...
    import model
    weights = model.load("weights.safetensors", np)
    outputs = model.predict({args}, weights)

Inputs: {described(plan.inputs, inputs)}, {plan.dtype}.
Outputs: {described(plan.outputs, outputs)}.
"""

from array_api_compat import array_namespace, device as device_of


def load(path, xp, device=None):
    """The weights stored in `path` (safetensors) as arrays of the namespace `xp`, on `device`
    (None: xp's default)."""
    from safetensors.numpy import load_file
    arrays = load_file(path)
    if device is None:
        return {{name: xp.asarray(array) for name, array in arrays.items()}}
    return {{name: xp.asarray(array, device=device) for name, array in arrays.items()}}


def predict({args}, weights):
    """{returned} from {args}, computed in the namespace of {inputs[0]}."""
    xp = array_namespace({args})
{body}
    return {returned}
''' + (f"\n\n# -- helpers: only the array API standard --\n\n{helpers}\n" if helpers else "")


# -- helper functions written into model.py -----------------------------------------------------
HELPERS = {
    "pad2d": '''
def pad2d(xp, x, ph, pw):
    """x (N, C, H, W) with ph zero rows above and below, pw zero columns left and right."""
    n, c, h, w = x.shape
    if ph:
        rows = xp.zeros((n, c, ph, w), dtype=x.dtype, device=device_of(x))
        x = xp.concat([rows, x, rows], axis=2)
    if pw:
        cols = xp.zeros((n, c, h + 2 * ph, pw), dtype=x.dtype, device=device_of(x))
        x = xp.concat([cols, x, cols], axis=3)
    return x
''',
    "windows": '''
def windows(x, kh, kw, sh, sw):
    """The kh * kw strided slices of x (N, C, H, W), (N, C, Ho, Wo) each: entry (i, j) of
    every window of size (kh, kw) and stride (sh, sw)."""
    ho, wo = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    return [x[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]
''',
    "conv2d": '''
def conv2d(xp, x, w, b, stride, padding):
    """Cross-correlation as torch's conv2d: x (N, C, H, W), w (O, C, kh, kw), b (O,) or None.
    im2col by slicing, then one matmul."""
    n, o, (kh, kw) = x.shape[0], w.shape[0], w.shape[2:]
    x = pad2d(xp, x, *padding)
    parts = windows(x, kh, kw, *stride)
    ho, wo = parts[0].shape[2:]
    cols = xp.reshape(xp.stack(parts, axis=2), (n, -1, ho * wo))   # (N, C kh kw, Ho Wo)
    out = xp.reshape(xp.matmul(xp.reshape(w, (o, -1)), cols), (n, o, ho, wo))
    return out if b is None else out + xp.reshape(b, (1, o, 1, 1))
''',
    "batch_norm": '''
def batch_norm(xp, x, gamma, beta, mean, var, eps):
    """BatchNorm in evaluation, per channel (axis 1) of x (N, C) or (N, C, H, W): the running
    mean and variance normalise x."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var, gamma, beta = (xp.reshape(v, shape) for v in (mean, var, gamma, beta))
    return (x - mean) * (1.0 / xp.sqrt(var + eps)) * gamma + beta
''',
    "max_pool2d": '''
def max_pool2d(xp, x, size, stride):
    """The maximum over each window, as torch's max_pool2d (no padding)."""
    return xp.max(xp.stack(windows(x, *size, *stride), axis=0), axis=0)
''',
    "avg_pool2d": '''
def avg_pool2d(xp, x, size, stride):
    """The mean over each window, as torch's avg_pool2d (no padding)."""
    return xp.mean(xp.stack(windows(x, *size, *stride), axis=0), axis=0)
''',
}


def _erf_helper() -> str:
    """The erf helper's text: gpuflow's portable erf (gpuflow/backends/special.py), whose
    coefficients it writes out (erf is not in the array API standard)."""
    from ..backends import special

    def listed(values: tuple) -> str:
        rows = [", ".join(repr(v) for v in values[i:i + 3]) for i in range(0, len(values), 3)]
        return "(\n    " + ",\n    ".join(rows) + ")"

    return f'''
_ERF_SMALL = {listed(special._ERF_SMALL)}
_ERFCX_LARGE = {listed(special._ERFCX_LARGE)}


def erf(xp, x):
    """The error function, which the array API standard lacks: x P(x^2 - 2) for |x| < 2 and
    1 - exp(-x^2) Q(1/|x| - 1/3) for 2 <= |x| < 6 (1 beyond), P and Q Chebyshev fits (within
    2 ulp of erf in float64)."""
    def horner(coefficients, t):
        total = coefficients[0] * t + coefficients[1]
        for c in coefficients[2:]:
            total = total * t + c
        return total

    a = xp.abs(x)
    small = xp.minimum(a, 2.0)  # each branch sees only its own range
    small = small * horner(_ERF_SMALL, small * small - 2.0)
    large = xp.minimum(xp.maximum(a, 2.0), 6.0)
    large = 1.0 - xp.exp(-(large * large)) * horner(_ERFCX_LARGE, 1.0 / large - 1.0 / 3.0)
    return xp.sign(x) * xp.where(a < 2.0, small, large)
'''


HELPERS["erf"] = _erf_helper()
HELPERS["sigmoid"] = '''
def sigmoid(xp, x):
    """1 / (1 + exp(-x)) without overflow: exp of -|x| only."""
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
'''
HELPERS["attention"] = '''
def attention(xp, q, k, v, scale, causal=False, keep=None):
    """softmax(q k^T scale) v, as torch's scaled_dot_product_attention: q (..., T_q, d), k
    (..., T_k, d), v (..., T_k, d_v). causal: position i attends to j <= i; keep: a boolean
    mask, True where allowed. A row blocked everywhere gives 0."""
    scores = (q @ xp.matrix_transpose(k)) * scale
    if causal:
        rows = xp.arange(scores.shape[-2], device=device_of(scores))
        keep = xp.reshape(rows, (-1, 1)) >= xp.arange(scores.shape[-1], device=device_of(scores))
    if keep is None:
        e = xp.exp(scores - xp.max(scores, axis=-1, keepdims=True))
        return (e / xp.sum(e, axis=-1, keepdims=True)) @ v
    scores = xp.where(keep, scores, xp.full_like(scores, -xp.inf))
    top = xp.max(scores, axis=-1, keepdims=True)
    top = xp.where(top == -xp.inf, xp.zeros_like(top), top)  # a blocked row: exp(-inf) = 0
    e = xp.exp(scores - top)
    total = xp.sum(e, axis=-1, keepdims=True)
    return (e / xp.where(total > 0.0, total, xp.ones_like(total))) @ v
'''
HELPERS["lstm_layer"] = '''
def lstm_layer(xp, x, w_ih, w_hh, b_ih, b_hh):
    """torch.nn.LSTM(batch_first=True), one layer, zero initial state: x (N, T, input) gives
    the hidden states (N, T, H); the weights' rows stacked by gate i, f, g, o as torch's."""
    H = w_hh.shape[1]
    xw = x @ xp.matrix_transpose(w_ih) + (b_ih + b_hh)  # every step's input part
    h = c = None
    hs = []
    for t in range(x.shape[1]):
        z = xw[:, t, :] if h is None else xw[:, t, :] + h @ xp.matrix_transpose(w_hh)
        i, f, o = (sigmoid(xp, z[:, j * H:(j + 1) * H]) for j in (0, 1, 3))
        g = xp.tanh(z[:, 2 * H:3 * H])
        c = i * g if c is None else f * c + i * g
        h = o * xp.tanh(c)
        hs.append(h)
    return xp.stack(hs, axis=1)
'''
_HELPER_NEEDS = {"conv2d": ("pad2d", "windows"), "max_pool2d": ("windows",),
                 "avg_pool2d": ("windows",), "lstm_layer": ("sigmoid",)}


# -- the built-in nodes --------------------------------------------------------------------------
def _linear(node: Node, ctx: PythonContext) -> None:
    x, w, b = (ctx.input(node, i) for i in range(3))
    ctx.line(f"{ctx.output(node)} = {x} @ {w} + {b}")


def _sigmoid(node: Node, ctx: PythonContext) -> None:
    ctx.line(f"{ctx.output(node)} = {ctx.helper('sigmoid')}(xp, {ctx.input(node)})")


def _relu(node: Node, ctx: PythonContext) -> None:
    x = ctx.input(node)
    ctx.line(f"{ctx.output(node)} = xp.maximum({x}, xp.zeros_like({x}))")


def _tanh(node: Node, ctx: PythonContext) -> None:
    ctx.line(f"{ctx.output(node)} = xp.tanh({ctx.input(node)})")


def _softmax(node: Node, ctx: PythonContext) -> None:
    x = ctx.input(node)
    ctx.line(f"e = xp.exp({x} - xp.max({x}, axis=-1, keepdims=True))\n"
             f"{ctx.output(node)} = e / xp.sum(e, axis=-1, keepdims=True)")


def _conv2d(node: Conv2D, ctx: PythonContext) -> None:
    x, w = ctx.input(node, 0), ctx.input(node, 1)
    b = ctx.input(node, 2) if len(node.inbound_nodes) == 3 else "None"
    ctx.line(f"{ctx.output(node)} = {ctx.helper('conv2d')}(xp, {x}, {w}, {b}, "
             f"stride={node.stride}, padding={node.padding})")


def _pool(helper: str) -> Any:
    def export(node: Any, ctx: PythonContext) -> None:
        ctx.line(f"{ctx.output(node)} = {ctx.helper(helper)}(xp, {ctx.input(node)}, "
                 f"size={node.size}, stride={node.stride})")
    return export


def _flatten(node: Node, ctx: PythonContext) -> None:
    x = ctx.input(node)
    ctx.line(f"{ctx.output(node)} = xp.reshape({x}, ({x}.shape[0], -1))")


def _dropout(node: Node, ctx: PythonContext) -> None:
    ctx.line(f"{ctx.output(node)} = {ctx.input(node)}  # Dropout(p={node.p:g}): the identity "
             "in evaluation")


def _batchnorm(node: BatchNorm, ctx: PythonContext) -> None:
    x, gamma, beta = (ctx.input(node, i) for i in range(3))
    state, out = ctx.state(node), ctx.output(node)
    ctx.line(f"{out} = {ctx.helper('batch_norm')}(xp, {x}, {gamma}, {beta},\n"
             f"{' ' * (len(out) + 14)}{state['running_mean']}, {state['running_var']}, "
             f"eps={node.eps!r})")


def _layernorm(node: LayerNorm, ctx: PythonContext) -> None:
    x, gamma, beta = (ctx.input(node, i) for i in range(3))
    ctx.line(f"centred = {x} - xp.mean({x}, axis=-1, keepdims=True)  # LayerNorm\n"
             f"{ctx.output(node)} = (centred / xp.sqrt(xp.mean(centred * centred, axis=-1, "
             f"keepdims=True) + {node.eps!r})) * {gamma} + {beta}")


def _add(node: Add, ctx: PythonContext) -> None:
    terms = [ctx.input(node, i) if w == 1.0 else f"{w!r} * {ctx.input(node, i)}"
             for i, w in enumerate(node.weights)]
    ctx.line(f"{ctx.output(node)} = {' + '.join(terms)}")


# -- the sequence nodes ---------------------------------------------------------------------------
def _embedding(node: Embedding, ctx: PythonContext) -> None:
    ids, w = ctx.input(node, 0), ctx.input(node, 1)
    ctx.line(f"{ctx.output(node)} = xp.reshape(xp.take({w}, xp.reshape({ids}, (-1,)), axis=0), "
             f"(*{ids}.shape, {w}.shape[1]))")


def _operator(symbol: str) -> Any:
    def export(node: Node, ctx: PythonContext) -> None:
        ctx.line(f"{ctx.output(node)} = {ctx.input(node, 0)} {symbol} {ctx.input(node, 1)}")
    return export


def _scale(node: Scale, ctx: PythonContext) -> None:
    ctx.line(f"{ctx.output(node)} = {ctx.input(node)} * {node.c!r}")


def _reshape(node: Reshape, ctx: PythonContext) -> None:
    x = ctx.input(node)
    sizes = [f"{x}.shape[{i}]" if n is None else str(n) for i, n in enumerate(node.shape)]
    ctx.line(f"{ctx.output(node)} = xp.reshape({x}, ({', '.join(sizes)}"
             f"{',' if len(sizes) == 1 else ''}))")


def _transpose(node: Transpose, ctx: PythonContext) -> None:
    ctx.line(f"{ctx.output(node)} = xp.permute_dims({ctx.input(node)}, {node.axes})")


def _concat(node: Concat, ctx: PythonContext) -> None:
    parts = ", ".join(ctx.input(node, i) for i in range(len(node.inbound_nodes)))
    ctx.line(f"{ctx.output(node)} = xp.concat([{parts}], axis={node.axis})")


def _slice(node: Slice, ctx: PythonContext) -> None:
    """Bounds clipped to the axis as Python's slice rules (the standard leaves bounds outside
    the axis unspecified): at export for a fixed size, in model.py for a dynamic one."""
    x, out = ctx.input(node), ctx.output(node)
    shape = ctx.shape(node.inbound_nodes[0])
    axis = node.axis % len(shape)
    lead = ":, " * axis
    if isinstance(ctx.plan.dims_of(node.inbound_nodes[0])[axis], str):  # N or T: dynamic
        ctx.line(f"start, stop, _ = slice({node.start}, {node.stop}).indices({x}.shape[{axis}])\n"
                 f"{out} = {x}[{lead}start:max(start, stop), ...]")
    else:
        start, stop, _ = slice(node.start, node.stop).indices(shape[axis])
        ctx.line(f"{out} = {x}[{lead}{start}:{max(start, stop)}, ...]")


def _gelu(node: GELU, ctx: PythonContext) -> None:
    from ..nodes.sequence import _KAPPA, _SQRT1_2, _SQRT_2_OVER_PI
    x, out = ctx.input(node), ctx.output(node)
    if node.approximate == "none":
        ctx.line(f"{out} = {x} * (0.5 * (1.0 + {ctx.helper('erf')}(xp, {x} * {_SQRT1_2!r})))"
                 "  # GELU")
    else:
        ctx.line(f"{out} = {x} * (0.5 * (1.0 + xp.tanh({_SQRT_2_OVER_PI!r} * ({x} + {_KAPPA!r} "
                 f"* ({x} * {x} * {x})))))  # GELU, tanh approximation")


def _silu(node: SiLU, ctx: PythonContext) -> None:
    x = ctx.input(node)
    ctx.line(f"{ctx.output(node)} = {x} * {ctx.helper('sigmoid')}(xp, {x})  # SiLU")


def _attention(node: ScaledDotProductAttention, ctx: PythonContext) -> None:
    import math
    from ..host import to_numpy
    q, k, v = (ctx.input(node, i) for i in range(3))
    scale = 1.0 / math.sqrt(ctx.shape(node.inbound_nodes[0])[-1])
    how = ", causal=True" if node.causal else ""
    if node.mask is not None:
        key = f"{node.name or ctx.plan.names.of(node)}.mask"
        ctx.plan.weights[key] = to_numpy(node.mask).astype(bool)
        how = f", keep={ctx.weight(key)}"
    ctx.line(f"{ctx.output(node)} = {ctx.helper('attention')}(xp, {q}, {k}, {v}, "
             f"scale={scale!r}{how})")


def _lstm(node: LSTM, ctx: PythonContext) -> None:
    args = ", ".join(ctx.input(node, i) for i in range(5))
    ctx.line(f"{ctx.output(node)} = {ctx.helper('lstm_layer')}(xp, {args})")


def _positions(node: Positions, ctx: PythonContext) -> None:
    ids, w = ctx.input(node, 0), ctx.input(node, 1)
    ctx.line(f"{ctx.output(node)} = {w}[:{ids}.shape[-1], ...]  # the first T positions")


for _cls, _fn in [(Embedding, _embedding), (MatMul, _operator("@")), (Mul, _operator("*")),
                  (BiasAdd, _operator("+")), (Scale, _scale), (Reshape, _reshape),
                  (Transpose, _transpose), (Concat, _concat), (Slice, _slice), (GELU, _gelu),
                  (SiLU, _silu), (ScaledDotProductAttention, _attention), (LSTM, _lstm),
                  (Positions, _positions)]:
    register(_cls, python=_fn)

for _cls, _fn in [(Linear, _linear), (Sigmoid, _sigmoid), (ReLU, _relu), (Tanh, _tanh),
                  (Softmax, _softmax), (Conv2D, _conv2d), (MaxPool2D, _pool("max_pool2d")),
                  (AvgPool2D, _pool("avg_pool2d")), (Flatten, _flatten), (Dropout, _dropout),
                  (BatchNorm, _batchnorm), (LayerNorm, _layernorm), (Add, _add)]:
    register(_cls, python=_fn)
