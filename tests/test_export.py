"""gpuflow.export: the digits MLP and CNN, and sequence models (attention, LSTM, every other
sequence node), as ONNX (run by onnxruntime) and as a standalone module (run without gpuflow on
NumPy, PyTorch, JAX and array_api_strict), equal to gpuflow's evaluation outputs; the errors,
with nothing written."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gpuflow as gf
from gpuflow.cli import TrainOptions, build_model
from gpuflow.data import load_digits
from gpuflow.errors import ExportError
from gpuflow.export import to_onnx, to_python

ROWS = (1, 37)   # two batch sizes: the batch dimension is dynamic


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install 'gpuflow[onnx,test]')")


def digits_model(kind: str, device: "str | gf.Device" = "cpu", dtype: str = "float32",
                 steps: int = 3):
    """(graph, logits, images): the digits MLP (with Dropout) or CNN (BatchNorm, pooling,
    Dropout), trained `steps` steps; with none, BatchNorm's running statistics are set to
    random numbers (so that they are not their start either), which costs no compilation."""
    X, y = load_digits()
    opts = TrainOptions(model=kind, hidden=(24,), dropout=0.2)
    opts.check()
    images = X.reshape(-1, 1, 8, 8) if kind == "cnn" else X
    X_in, y_in, logits, loss, _ = build_model(opts, images.shape[1:], 10)
    graph = gf.Graph(loss, device=device, dtype=dtype, inputs=[X_in, y_in], outputs=[logits])
    opt = gf.optim.Adam(graph.parameters, lr=1e-2)
    for i in range(steps):
        graph.step(images[64 * i:64 * (i + 1)], y[64 * i:64 * (i + 1)])
        opt.step()
    rng = np.random.default_rng(1)
    for node in graph.nodes if steps == 0 else ():
        if isinstance(node, gf.BatchNorm):
            channels = graph.named_parameters()[f"{node.name}.gamma"].value.shape[0]
            node.load_state_dict({"running_mean": rng.normal(size=channels),
                                  "running_var": rng.uniform(0.5, 2.0, size=channels)})
    return graph, logits, images.astype(dtype)


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    """Equal to `rtol` relative to the outputs' scale (entries near 0 are compared to it)."""
    np.testing.assert_allclose(actual, expected, rtol=rtol,
                               atol=rtol * float(np.max(np.abs(expected))))


def ort_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_onnx_equals_gpuflow(tmp_path, kind, dtype):
    _need("onnx")
    _need("onnxruntime")
    import onnx
    graph, logits, images = digits_model(kind, dtype=dtype)
    path = tmp_path / "model.onnx"
    to_onnx(graph, path, logits, example=images[:2])
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim][:1] == ["N"]
    ops = {n.op_type for n in model.graph.node}
    assert "Identity" in ops  # Dropout, the identity in evaluation
    if kind == "cnn":
        assert {"Conv", "BatchNormalization", "MaxPool", "Flatten", "Gemm"} <= ops
    for rows in ROWS:
        x = images[100:100 + rows]
        try:
            got = ort_outputs(path, x)
        except Exception as exc:  # onnxruntime's NotImplemented: no kernel for this dtype
            if "NOT_IMPLEMENTED" in str(exc):
                pytest.skip(f"onnxruntime has no {dtype} kernel: {str(exc)[-80:]}")
            raise
        assert got.shape == (rows, 10) and got.dtype == np.dtype(dtype)
        assert_close(got, gf.to_numpy(graph.run(logits, x)), 1e-5 if dtype == "float32" else 1e-12)


def test_onnx_uses_running_statistics(tmp_path):
    """BatchNorm exports its running statistics, not the batch's: a batch of one image that
    is all zeros gives the same logits as gpuflow's evaluation (batch statistics would be
    0/0)."""
    _need("onnx")
    _need("onnxruntime")
    graph, logits, images = digits_model("cnn")
    bn = next(n for n in graph.nodes if isinstance(n, gf.BatchNorm))
    assert np.abs(gf.to_numpy(bn.running_mean)).max() > 1e-3  # moved from the zeros it starts at
    to_onnx(graph, tmp_path / "m.onnx", logits, example=images[:1])
    x = np.zeros((1, 1, 8, 8), np.float32)
    assert_close(ort_outputs(tmp_path / "m.onnx", x), gf.to_numpy(graph.run(logits, x)), 1e-5)


# -- the standalone module -----------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    folder, lib, device = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.path.insert(0, folder)
    import model
    if lib == "numpy":
        import numpy as xp
    elif lib == "torch":
        import torch as xp
    elif lib == "jax":
        import jax.numpy as xp
    elif lib == "cupy":
        import cupy as xp
    else:
        import array_api_strict as xp
        device = xp.Device(device)
    if lib in ("jax", "cupy", "numpy"):
        device = None
    weights = model.load(folder + "/weights.safetensors", xp, device=device)
    results = {}
    for rows in json.loads(sys.argv[4]):
        x = np.load(folder + f"/x{rows}.npy")
        x = xp.asarray(x) if device is None else xp.asarray(x, device=device)
        y = model.predict(x, weights)
        assert type(y).__module__.split(".")[0] in (lib, "jaxlib", "numpy"), type(y)
        if lib == "array_api_strict":
            assert y.device == x.device, (y.device, x.device)
            y = y.to_device(xp.Device("CPU_DEVICE"))
        elif lib == "torch":
            y = y.cpu()
        elif lib == "cupy":
            y = y.get()
        np.save(folder + f"/y{rows}.npy", np.asarray(y))
    leaked = sorted(m for m in sys.modules if m == "gpuflow" or m.startswith("gpuflow."))
    assert not leaked, f"model.py imported gpuflow: {leaked}"
    print("ok", lib)
""")


def run_standalone(folder: Path, device: gf.Device, inputs: dict) -> dict:
    """model.py in `folder` run on `device`'s library, in a child Python whose sys.modules
    never holds gpuflow (asserted there): {key: outputs} for inputs {key: array}, a key the
    rows (an int) or a name ('3x5')."""
    for rows, x in inputs.items():
        np.save(folder / f"x{rows}.npy", x)
    (folder / "child.py").write_text(CHILD)
    native = str(device.native) if device.backend == "torch" else getattr(
        device.native, "_device", str(device.native))
    done = subprocess.run([sys.executable, str(folder / "child.py"), str(folder),
                           device.backend, str(native), json.dumps(list(inputs))],
                          cwd=folder, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {rows: np.load(folder / f"y{rows}.npy") for rows in inputs}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_standalone_module_equals_gpuflow(tmp_path, device, kind):
    _need("safetensors")
    graph, logits, images = digits_model(kind, device=device, steps=0)
    folder = tmp_path / "exported"
    written = to_python(graph, folder, logits, example=images[:1])  # one compile on jax
    assert written == folder / "model.py"
    source = written.read_text()
    assert "gpuflow" not in source.split('"""', 2)[2]  # only the docstring names it
    # one line (or block) per node, named after it
    for name in (["layer1", "layer1_relu", "layer1_dropout", "layer2"] if kind == "mlp" else
                 ["cnn_conv1", "cnn_bn1", "cnn_pool2", "cnn_flatten", "cnn_dropout", "cnn_fc2"]):
        assert f"    {name} = " in source, name
    inputs = {rows: images[200:200 + rows] for rows in ROWS}
    outputs = run_standalone(folder, device, inputs)
    for rows, x in inputs.items():
        assert outputs[rows].shape == (rows, 10)
        assert_close(outputs[rows], gf.to_numpy(graph.run(logits, x)), 1e-5)


# -- a node of one's own: the hooks, and the error without them ----------------------------------
class Swish(gf.Node):
    """x * sigmoid(x), with both export hooks."""

    def __init__(self, x, *, name=None):
        gf.Node.__init__(self, [x], name=name)

    def forward(self):
        x = self.inbound_nodes[0].value
        self.value = x / (1.0 + self.xp.exp(-x))

    def backward(self):
        pass

    def to_onnx(self, ctx):
        x = ctx.input(self)
        ctx.add("Mul", [x, ctx.add("Sigmoid", [x])], [ctx.output(self)])

    def to_python(self, ctx):
        x = ctx.input(self)
        ctx.line(f"{ctx.output(self)} = {x} / (1.0 + xp.exp(-{x}))")


class Cube(gf.Node):
    """x ** 3, with no exporter."""

    def __init__(self, x, *, name=None):
        gf.Node.__init__(self, [x], name=name)

    def forward(self):
        x = self.inbound_nodes[0].value
        self.value = x * x * x

    def backward(self):
        pass


def small_graph(node_class):
    X, y = gf.Input(name="X"), gf.Input(name="y")
    hidden, _ = gf.dense(X, 4, 3, name="fc", rng=0)
    out = node_class(hidden, name="act")
    loss = gf.MSE(y, gf.Tanh(out, name="squash"))
    graph = gf.Graph(loss, device="cpu", dtype="float64", inputs=[X, y], outputs=[out])
    x = np.random.default_rng(0).standard_normal((5, 4))
    return graph, out, x


def test_custom_node_hooks_export(tmp_path):
    graph, out, x = small_graph(Swish)
    expected = gf.to_numpy(graph.run(out, x))
    to_python(graph, tmp_path / "py", out, example=x)
    namespace: dict = {}
    exec(compile((tmp_path / "py" / "model.py").read_text(), "model.py", "exec"), namespace)
    weights = namespace["load"](str(tmp_path / "py" / "weights.safetensors"), np)
    assert_close(namespace["predict"](x, weights), expected, 1e-12)
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime"):
        to_onnx(graph, tmp_path / "m.onnx", out, example=x)
        assert_close(ort_outputs(tmp_path / "m.onnx", x), expected, 1e-12)


@pytest.mark.parametrize("export", ["onnx", "python"])
def test_errors_write_nothing(tmp_path, export):
    """An unsupported node, an output not in the graph, an unwritable path: each one
    ExportError that says what to do, and nothing is written."""
    if export == "onnx":
        _need("onnx")
    write = to_onnx if export == "onnx" else to_python
    target = tmp_path / ("m.onnx" if export == "onnx" else "folder")

    graph, out, x = small_graph(Cube)
    with pytest.raises(ExportError, match=rf"(?s)no .*exporter for Cube 'act'.*to_{export}"):
        write(graph, target, out, example=x)

    graph, out, x = small_graph(Swish)
    stranger = gf.ReLU(gf.Input(name="elsewhere"), name="stranger")
    with pytest.raises(ExportError, match="ReLU 'stranger' is not in this graph"):
        write(graph, target, stranger, example=x)
    with pytest.raises(ExportError, match="is a loss"):
        write(graph, target, graph.loss, example=x)

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="does not exist|a file, not a folder"):
        write(graph, blocker / ("m.onnx" if export == "onnx" else "folder"), out, example=x)
    if export == "python":
        with pytest.raises(ExportError, match="a file, not a folder"):
            write(graph, blocker, out, example=x)
    else:
        with pytest.raises(ExportError, match="is a folder"):
            write(graph, tmp_path, out, example=x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert blocker.read_text() == "not a folder"


# -- sequence models: dynamic batch and sequence length ------------------------------------------
VOCAB, WIDTH = 11, 8
SIZES = ((1, 6), (3, 2))   # (N, T): two batch sizes and two sequence lengths, one graph
SEQUENCE_KINDS = ["attention", "lstm", "every_node"]


def sequence_model(kind: str, device: "str | gf.Device" = "cpu", dtype: str = "float32"):
    """(graph, output node): ids (N, T) -> gf.embedding -> `kind` -> a head of MatMul and
    BiasAdd. "attention": gf.attention, causal; "lstm": gf.lstm; "every_node": GELU (erf and
    tanh), SiLU, Mul, Scale, Concat, Slice, Reshape (None and -1), Transpose, non-causal
    ScaledDotProductAttention and a Slice along T (its output has T - 1 steps)."""
    rng = np.random.default_rng(7)
    ids, y = gf.Input(name="ids"), gf.Input(name="y")
    x, _ = gf.embedding(ids, VOCAB, WIDTH, name="emb", rng=0)
    if kind == "attention":
        x, _ = gf.attention(x, WIDTH, 2, causal=True, name="attn", rng=1)
        width = WIDTH
    elif kind == "lstm":
        width = 6
        x, _ = gf.lstm(x, WIDTH, width, name="lstm", rng=1)
    else:
        gain = gf.Input(name="gain")
        gain.value = rng.uniform(0.5, 1.5, size=WIDTH)
        a = gf.GELU(x, name="gelu")
        b = gf.GELU(x, approximate="tanh", name="gelu_tanh")
        both = gf.Mul(a, gf.Mul(b, gain, name="gained"), name="mul")
        x = gf.Concat([both, gf.Scale(gf.SiLU(x, name="silu"), 0.5, name="half")], axis=-1,
                      name="concat")                                             # (N, T, 16)
        x = gf.Slice(x, 2, -2, axis=-1, name="middle")                            # (N, T, 12)
        heads = gf.Transpose(gf.Reshape(x, (None, None, 3, -1), name="split"), (0, 2, 1, 3),
                             name="heads")                                        # (N, 3, T, 4)
        mixed = gf.ScaledDotProductAttention(heads, heads, heads, name="sdpa")
        x = gf.Reshape(gf.Transpose(mixed, (0, 2, 1, 3), name="back"), (None, None, 12),
                       name="merge")
        x = gf.Slice(x, 1, None, axis=1, name="later")                            # (N, T-1, 12)
        width = 12
    W, b = gf.Input(name="head.W"), gf.Input(name="head.b")
    W.value, b.value = rng.normal(size=(width, VOCAB)), rng.normal(size=VOCAB)
    out = gf.BiasAdd(gf.MatMul(x, W, name="head"), b, name="logits")
    graph = gf.Graph(gf.MSE(y, out), device=device, dtype=dtype, inputs=[ids, y], outputs=[out])
    return graph, out


def token_ids(rows: int, steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 10 * rows + steps).integers(0, VOCAB, (rows, steps))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("opset", [None, 20])
@pytest.mark.parametrize("kind", SEQUENCE_KINDS)
def test_sequence_onnx_equals_gpuflow(tmp_path, kind, opset, dtype):
    """One exported graph runs at two batch sizes and two sequence lengths (dims 'N' and
    'T'), equal to gpuflow; GELU is ONNX's Gelu from opset 20, its formula before; LSTM is
    ONNX's LSTM, attention MatMul and Softmax with the causal mask from the lengths."""
    _need("onnx")
    _need("onnxruntime")
    import onnx
    graph, out = sequence_model(kind, dtype=dtype)
    path = tmp_path / "model.onnx"
    to_onnx(graph, path, out, example=token_ids(2, 4), opset=opset)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)

    def dims(info):
        return [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]

    assert dims(model.graph.input[0]) == ["N", "T"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert dims(model.graph.output[0]) == (["N", "T", VOCAB] if kind != "every_node" else
                                           ["N", "logits_1", VOCAB])  # T - 1: a name of its own
    ops = {n.op_type for n in model.graph.node}
    assert {"Gather", "MatMul", "Add"} <= ops
    expected_ops = {"attention": {"Softmax", "Range", "GreaterOrEqual", "Where", "Transpose",
                                  "Reshape", "Slice"},
                    "lstm": {"LSTM", "Transpose", "Squeeze"},
                    "every_node": {"Softmax", "Sigmoid", "Concat", "Slice", "Reshape",
                                   "Transpose", "Mul"} | ({"Gelu"} if opset == 20 else
                                                          {"Erf", "Tanh"})}[kind]
    assert expected_ops <= ops, expected_ops - ops
    for rows, steps in SIZES:
        x = token_ids(rows, steps)
        try:
            got = ort_outputs(path, x)
        except Exception as exc:  # no float64 LSTM or Erf kernel in onnxruntime 1.32
            if dtype == "float64" and ("NOT_IMPLEMENTED" in str(exc) or "double" in str(exc)):
                pytest.skip(f"onnxruntime has no float64 kernel: {str(exc)[-80:]}")
            raise
        expected = gf.to_numpy(graph.run(out, x))
        assert got.shape == expected.shape == (rows, steps - (kind == "every_node"), VOCAB)
        assert got.dtype == np.dtype(dtype)
        assert_close(got, expected, 1e-5 if dtype == "float32" else 1e-12)


def test_attention_mask_exports_with_blocked_row(tmp_path):
    """A boolean mask fixes the sequence length (T stays a number, N is dynamic); a row it
    blocks everywhere gives 0 in ONNX and in model.py, as in gpuflow."""
    _need("onnx")
    _need("onnxruntime")
    _need("safetensors")
    ids, y = gf.Input(name="ids"), gf.Input(name="y")
    x, _ = gf.embedding(ids, VOCAB, WIDTH, name="emb", rng=0)
    mask = np.tril(np.ones((4, 4), bool))
    mask[2] = False  # query 2 attends nowhere
    out = gf.ScaledDotProductAttention(x, x, x, mask=mask, name="sdpa")
    graph = gf.Graph(gf.MSE(y, out), device="cpu", dtype="float32", inputs=[ids, y],
                     outputs=[out])
    to_onnx(graph, tmp_path / "m.onnx", out, example=token_ids(2, 4))
    to_python(graph, tmp_path / "py", out, example=token_ids(2, 4))
    import onnx
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert [d.dim_param or d.dim_value for d in
            model.graph.input[0].type.tensor_type.shape.dim] == ["N", 4]
    namespace: dict = {}
    exec(compile((tmp_path / "py" / "model.py").read_text(), "model.py", "exec"), namespace)
    weights = namespace["load"](str(tmp_path / "py" / "weights.safetensors"), np)
    for rows in (1, 3):
        x = token_ids(rows, 4)
        expected = gf.to_numpy(graph.run(out, x))
        assert np.all(expected[:, 2] == 0) and np.abs(expected).max() > 0
        assert_close(ort_outputs(tmp_path / "m.onnx", x), expected, 1e-5)
        assert_close(namespace["predict"](x, weights), expected, 1e-5)


@pytest.mark.parametrize("kind", SEQUENCE_KINDS)
def test_sequence_standalone_module_equals_gpuflow(tmp_path, device, kind):
    _need("safetensors")
    graph, out = sequence_model(kind, device=device)
    folder = tmp_path / "exported"
    source = to_python(graph, folder, out, example=token_ids(2, 4)).read_text()
    assert "gpuflow" not in source.split('"""', 2)[2]
    for name in {"attention": ["emb", "attn_q_heads", "attn_sdpa", "attn_merge", "head",
                               "logits"],
                 "lstm": ["emb", "lstm", "head", "logits"],
                 "every_node": ["gelu", "gelu_tanh", "mul", "silu", "half", "concat", "middle",
                                "split", "heads", "sdpa", "merge", "later"]}[kind]:
        assert f"    {name} = " in source, name
    assert ("def erf(" in source) == (kind == "every_node")  # the standard has no erf
    inputs = {f"{rows}x{steps}": token_ids(rows, steps) for rows, steps in SIZES}
    outputs = run_standalone(folder, device, inputs)
    for key, x in inputs.items():
        assert_close(outputs[key], gf.to_numpy(graph.run(out, x)), 1e-5)
