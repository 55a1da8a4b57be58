"""The sequence nodes (gpuflow/nodes/sequence.py): central differences on every device, PyTorch
autograd as the oracle (float64, rel 1e-9, forward and every input's gradient), float32 through
gf.Graph, the tails of GELU and SiLU, the portable erf, and the errors for bad inputs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import gpuflow as gf
from conftest import Project, host
from gpuflow.nodes.positions import Positions

torch = pytest.importorskip("torch")
F = torch.nn.functional

RNG = np.random.default_rng(23)


def _normal(*shape):
    return RNG.normal(size=shape)


IDS = np.array([[0, 3, 3], [1, 0, 3]])  # repeated ids: their gradients add up in W
CAUSAL_5 = np.tril(np.ones((5, 5), dtype=bool))
BLOCKS = np.array([[True, False, True], [True, True, False], [False, False, False]])  # row 2: none
BATCH_MASK = RNG.random((2, 1, 3, 4)) > 0.4
BATCH_MASK[..., 0] = True


def _sdpa(**options):
    return (lambda q, k, v: gf.ScaledDotProductAttention(q, k, v, **options),
            lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, is_causal=options.get("causal", False),
                attn_mask=None if options.get("mask") is None else torch.tensor(options["mask"])))


def _torch_lstm(x, w_ih, w_hh, b_ih, b_hh):
    """torch.nn.LSTM(batch_first=True), one layer, zero initial state, with these weights."""
    layer = torch.nn.LSTM(x.shape[-1], w_hh.shape[1], batch_first=True, dtype=x.dtype)
    weights = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh, "bias_ih_l0": b_ih, "bias_hh_l0": b_hh}
    return torch.func.functional_call(layer, weights, (x,))[0]


def _lstm_inputs(n, t, n_in, hidden):
    return [_normal(n, t, n_in), _normal(4 * hidden, n_in) * 0.7,
            _normal(4 * hidden, hidden) * 0.7, _normal(4 * hidden), _normal(4 * hidden)]


LABELS = np.array([[1, -100, 4, 0], [-100, 2, 2, 3]])  # ignored positions (-100) among them


def _torch_cross_entropy(z, y):
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=-100)


# name: (builder over Inputs, float inputs, integer inputs, the same in torch). The integer
# inputs come after the float ones in both functions' arguments.
CASES = {
    "Embedding": (lambda W, ids: gf.Embedding(ids, W), [_normal(5, 4)], [IDS],
                  lambda W, ids: F.embedding(ids, W)),
    "Embedding-1d-one-id": (lambda W, ids: gf.Embedding(ids, W), [_normal(3, 2)],
                            [np.array([2, 2, 2])], lambda W, ids: F.embedding(ids, W)),
    "MatMul-2d": (gf.MatMul, [_normal(3, 4), _normal(4, 2)], [], torch.matmul),
    "MatMul-broadcast": (gf.MatMul, [_normal(2, 1, 3, 4), _normal(3, 4, 5)], [], torch.matmul),
    "MatMul-rows-2d-weight": (gf.MatMul, [_normal(2, 3, 4), _normal(4, 5)], [], torch.matmul),
    "MatMul-rows-transposed": (lambda a, b: gf.MatMul(gf.Transpose(a, (1, 0, 2)), b),
                               [_normal(3, 2, 4), _normal(4, 5)], [],
                               lambda a, b: torch.matmul(a.permute(1, 0, 2), b)),
    "MatMul-vector-left": (gf.MatMul, [_normal(4), _normal(2, 4, 3)], [], torch.matmul),
    "MatMul-vector-right": (gf.MatMul, [_normal(2, 3, 4), _normal(4)], [], torch.matmul),
    "MatMul-same-input": (lambda x: gf.MatMul(x, x), [_normal(3, 3)], [],
                          lambda x: x @ x),
    "Mul-same-shape": (gf.Mul, [_normal(3, 4), _normal(3, 4)], [], torch.mul),
    "Mul-broadcast-both": (gf.Mul, [_normal(2, 1, 4), _normal(3, 1)], [], torch.mul),
    "Mul-same-input": (lambda x: gf.Mul(x, x), [_normal(2, 3)], [], lambda x: x * x),
    "BiasAdd": (gf.BiasAdd, [_normal(2, 3, 4), _normal(4)], [], torch.add),
    "BiasAdd-same-shape": (gf.BiasAdd, [_normal(3, 2), _normal(3, 2)], [], torch.add),
    "Scale": (lambda x: gf.Scale(x, -2.5), [_normal(2, 3)], [], lambda x: x * -2.5),
    "Reshape-minus-one": (lambda x: gf.Reshape(x, (3, -1, 2)), [_normal(2, 3, 4)], [],
                          lambda x: x.reshape(3, -1, 2)),
    "Reshape-keep-leading": (lambda x: gf.Reshape(x, (None, None, 2, -1)), [_normal(2, 3, 4)],
                             [], lambda x: x.reshape(2, 3, 2, -1)),
    "Transpose": (lambda x: gf.Transpose(x, (0, 2, 1, 3)), [_normal(2, 3, 4, 2)], [],
                  lambda x: x.permute(0, 2, 1, 3)),
    "Transpose-negative": (lambda x: gf.Transpose(x, (-1, 0, 1)), [_normal(2, 3, 4)], [],
                           lambda x: x.permute(-1, 0, 1)),
    "Concat": (lambda a, b, c: gf.Concat([a, b, c], axis=1),
               [_normal(2, 1, 3), _normal(2, 4, 3), _normal(2, 2, 3)], [],
               lambda a, b, c: torch.cat([a, b, c], dim=1)),
    "Concat-last-axis-same-input": (lambda a, b: gf.Concat([a, b, a], axis=-1),
                                    [_normal(2, 3), _normal(2, 1)], [],
                                    lambda a, b: torch.cat([a, b, a], dim=-1)),
    "Slice": (lambda x: gf.Slice(x, 1, 4, axis=1), [_normal(3, 6)], [], lambda x: x[:, 1:4]),
    "Slice-negative-length-1": (lambda x: gf.Slice(x, -1, None, axis=0), [_normal(3, 2)], [],
                                lambda x: x[-1:]),
    "GELU": (gf.GELU, [_normal(3, 4) * 3], [], F.gelu),
    "GELU-tanh": (lambda x: gf.GELU(x, approximate="tanh"), [_normal(3, 4) * 3], [],
                  lambda x: F.gelu(x, approximate="tanh")),
    "SiLU": (gf.SiLU, [_normal(3, 4) * 3], [], F.silu),
    "SDPA": (*_sdpa()[:1], [_normal(2, 2, 3, 4), _normal(2, 2, 3, 4), _normal(2, 2, 3, 2)], [],
             _sdpa()[1]),
    "SDPA-causal": (_sdpa(causal=True)[0],
                    [_normal(1, 2, 5, 3), _normal(1, 2, 5, 3), _normal(1, 2, 5, 3)], [],
                    _sdpa(causal=True)[1]),
    "SDPA-causal-Tq-lt-Tk": (_sdpa(causal=True)[0],
                             [_normal(1, 2, 3, 4), _normal(1, 2, 5, 4), _normal(1, 2, 5, 2)], [],
                             _sdpa(causal=True)[1]),
    "SDPA-mask-as-causal": (_sdpa(mask=CAUSAL_5)[0],
                            [_normal(1, 1, 5, 3), _normal(1, 1, 5, 3), _normal(1, 1, 5, 3)], [],
                            _sdpa(mask=CAUSAL_5)[1]),
    "SDPA-mask-blocked-row": (_sdpa(mask=BLOCKS)[0],
                              [_normal(2, 1, 3, 2), _normal(2, 1, 3, 2), _normal(2, 1, 3, 2)],
                              [], _sdpa(mask=BLOCKS)[1]),
    "SDPA-mask-broadcast": (_sdpa(mask=BATCH_MASK)[0],
                            [_normal(2, 2, 3, 2), _normal(2, 2, 4, 2), _normal(2, 2, 4, 3)], [],
                            _sdpa(mask=BATCH_MASK)[1]),
    "SDPA-length-1": (_sdpa(causal=True)[0],
                      [_normal(2, 1, 1, 3), _normal(2, 1, 1, 3), _normal(2, 1, 1, 3)], [],
                      _sdpa(causal=True)[1]),
    "Linear-3d": (gf.Linear, [_normal(2, 3, 4), _normal(4, 5), _normal(5)], [],
                  lambda x, w, b: x @ w + b),
    "Linear-4d-one-row": (gf.Linear, [_normal(1, 2, 1, 3), _normal(3, 2), _normal(2)], [],
                          lambda x, w, b: x @ w + b),
    "SCE-3d-ignore": (lambda z, y: gf.SoftmaxCrossEntropy(y, z), [_normal(2, 4, 5) * 3],
                      [LABELS], _torch_cross_entropy),
    "SCE-2d-ignore": (lambda z, y: gf.SoftmaxCrossEntropy(y, z), [_normal(8, 5) * 3],
                      [LABELS.reshape(-1)], _torch_cross_entropy),
    "SCE-3d-length-1": (lambda z, y: gf.SoftmaxCrossEntropy(y, z), [_normal(3, 1, 4)],
                        [np.array([[3], [0], [-100]])], _torch_cross_entropy),
    "Positions": (lambda W, ids: Positions(ids, W), [_normal(5, 3)], [IDS],
                  lambda W, ids: W[:ids.shape[-1]]),
    "Positions-whole-table": (lambda W, ids: Positions(ids, W), [_normal(3, 2)], [IDS],
                              lambda W, ids: W[:ids.shape[-1]]),
    "LSTM": (gf.LSTM, _lstm_inputs(2, 4, 3, 2), [], _torch_lstm),
    "LSTM-length-1": (gf.LSTM, _lstm_inputs(2, 1, 3, 2), [], _torch_lstm),
    "LSTM-shared-bias": (lambda x, w_ih, w_hh, b: gf.LSTM(x, w_ih, w_hh, b, b),
                         _lstm_inputs(1, 3, 2, 2)[:4], [],
                         lambda x, w_ih, w_hh, b: _torch_lstm(x, w_ih, w_hh, b, b)),
}


def _build(name):
    """(node, float Inputs, integer Inputs, feed) for a case, on fresh Inputs."""
    builder, floats, integers, _ = CASES[name]
    float_inputs = [gf.Input(name=f"x{i}") for i in range(len(floats))]
    int_inputs = [gf.Input(name=f"ids{i}") for i in range(len(integers))]
    node = builder(*float_inputs, *int_inputs)
    feed = dict(zip(float_inputs + int_inputs, floats + integers))
    return node, float_inputs, int_inputs, feed


def _torch(name, upstream=None):
    """torch's output and the gradients of sum(output * upstream) for every float input."""
    _, floats, integers, fn = CASES[name]
    tensors = [torch.tensor(a, requires_grad=True) for a in floats]
    out = fn(*tensors, *(torch.tensor(a) for a in integers))
    if upstream is not None:
        (out * torch.tensor(upstream)).sum().backward()
    return out.detach().numpy(), [t.grad.numpy() if t.grad is not None else None
                                  for t in tensors]


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_central_differences(name, device):
    node, *_, feed = _build(name)
    report = gf.gradient_check(node, feed, device=device, samples=24)
    assert report.ok, str(report)


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_gradients_equal_torch_autograd_in_float64(name, device):
    # MiniFlow's surface: topological_sort + forward_and_backward
    node, float_inputs, _, feed = _build(name)
    expected, _ = _torch(name)
    R = gf.Input(name="R")
    feed[R] = upstream = RNG.normal(size=expected.shape)
    Project(node, R)
    graph = gf.topological_sort(feed, device=device, dtype="float64")
    gf.forward_and_backward(graph)
    expected, grads = _torch(name, upstream)
    np.testing.assert_allclose(host(device, node.value), expected, rtol=1e-9, atol=1e-12,
                               err_msg=f"{name} forward on {device.name}")
    for inp, want in zip(float_inputs, grads):
        got = host(device, inp.gradients[inp])
        assert got.shape == want.shape, (name, inp.label, got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12,
                                   err_msg=f"{name}: d/d {inp.label} on {device.name}")


# float32 through gf.Graph: each node once (JAX compiles every new shape: time)
FLOAT32_CASES = ["Embedding", "MatMul-broadcast", "MatMul-rows-transposed", "Mul-broadcast-both",
                 "BiasAdd", "Scale", "Reshape-minus-one", "Transpose", "Concat", "Slice", "GELU",
                 "GELU-tanh", "SiLU",
                 "SDPA-causal", "SDPA-mask-broadcast", "LSTM", "Linear-3d", "SCE-3d-ignore"]


@pytest.mark.parametrize("name", FLOAT32_CASES)
def test_float32_through_a_graph(name, device):
    node, float_inputs, int_inputs, feed = _build(name)
    expected, _ = _torch(name)
    R = gf.Input(name="R")
    feed[R] = upstream = RNG.normal(size=expected.shape)
    graph = gf.Graph(Project(node, R), device=device, dtype="float32",
                     inputs=[R, *int_inputs, *float_inputs], parameters=float_inputs)
    for _ in range(2):  # a second step reuses what the first one kept
        loss = graph.step(feed)
    expected, grads = _torch(name, upstream)
    assert host(device, node.value).dtype == np.float32
    np.testing.assert_allclose(host(device, node.value), expected, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(graph.item(loss), float((expected * upstream).sum()),
                               rtol=1e-4, atol=1e-5)
    for inp, want in zip(float_inputs, grads):
        np.testing.assert_allclose(host(device, inp.gradients[inp]), want, rtol=1e-4,
                                   atol=1e-5, err_msg=f"{name}: d/d {inp.label}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_scatter_add_rows_adds_repeated_ids_and_keeps_non_finite_rows_apart(device, dtype):
    """Embedding's backward (`ops.scatter_add_rows`; NumPy: one onehot^T @ values product
    for a small table, np.add.at otherwise) equals np.add.at; on NumPy and torch an inf or
    NaN stays in its own row (the product would spread 0 inf = NaN: NumPy falls back)."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 7, 50)
    ids[:3] = 2  # repeated ids
    values = rng.normal(size=(50, 4)).astype(dtype)
    want = np.zeros((9, 4), dtype)
    np.add.at(want, ids, values)
    put = lambda a: device.put(a, dtype=device.dtype(dtype) if a.dtype.kind == "f" else None)
    got = device.ops.scatter_add_rows(device.put(ids), put(values), 9,
                                      out=device.new_buffer((9, 4), device.dtype(dtype))
                                      if device.mutable_arrays else None)
    np.testing.assert_allclose(host(device, got), want, rtol=1e-5 if dtype == "float32" else
                               1e-12, atol=1e-6)
    if device.backend in ("numpy", "torch"):
        values[ids == 2] = np.inf
        values[ids == 5, 1] = np.nan
        got = host(device, device.ops.scatter_add_rows(device.put(ids), put(values), 9))
        assert np.isinf(got[2]).all() and np.isnan(got[5, 1])
        others = [r for r in range(9) if r not in (2, 5)]
        assert np.isfinite(got[others]).all() and (got[[7, 8]] == 0).all()


def test_embedding_gradient_with_uint8_ids_and_a_table_past_256_rows(device):
    """Regression: NumPy's one-hot backward compared uint8 ids with arange(rows) made in
    uint8, which wraps at 256, so rows 257-259 got the gradients of ids 1-3 too."""
    ids, W, R = gf.Input(name="ids"), gf.Input(name="W"), gf.Input(name="R")
    node = gf.Embedding(ids, W)
    Project(node, R)
    rng = np.random.default_rng(0)
    feed = {ids: np.array([[1, 2, 3]], np.uint8), W: rng.normal(size=(300, 4)),
            R: rng.normal(size=(1, 3, 4))}
    gf.forward_and_backward(gf.topological_sort(feed, device=device, dtype="float64"))
    grad = host(device, W.gradients[W])
    assert list(np.flatnonzero(np.abs(grad).sum(axis=1))) == [1, 2, 3]
    np.testing.assert_allclose(grad[1:4], feed[R][0], rtol=1e-12)


def test_scatter_add_rows_of_no_rows_is_zeros(device):
    """No ids (an empty batch): a table of zeros, as np.add.at gives (the NumPy one-hot path
    took the max of an empty array)."""
    values = device.put(np.zeros((0, 4)), dtype=device.dtype("float64"))
    got = device.ops.scatter_add_rows(device.put(np.zeros(0, np.int64)), values, 5)
    np.testing.assert_array_equal(host(device, got), np.zeros((5, 4)))


def test_sum_over_no_axis_is_the_array_itself(device):
    """ops.sum(x, axis=()) reduces nothing, as NumPy and the array API (torch's sum(dim=())
    summed over every axis: a 1-D LayerNorm's gamma gradient on torch without its fused
    route came out as one number)."""
    x = np.arange(6.0).reshape(2, 3)
    got = device.ops.sum(device.put(x, dtype=device.dtype("float64")), axis=())
    np.testing.assert_array_equal(host(device, got), x)


def test_matmul_with_a_2d_weight_multiplies_rows_as_one_matrix(device, monkeypatch):
    """a (N, T, k) @ b (k, m), as attention's projections: each product one 2-D matmul over
    the N*T rows (as Linear's N-D path and torch.matmul), b's gradient included: no batched
    (N, k, m) product summed over the batch afterwards."""
    a, b, R = gf.Input(name="a"), gf.Input(name="b"), gf.Input(name="R")
    node = gf.MatMul(a, b)
    feed = {a: _normal(2, 3, 4), b: _normal(4, 5), R: _normal(2, 3, 5)}
    graph = gf.Graph(Project(node, R), device=device, dtype="float64", inputs=[R],
                     parameters=[a, b])
    graph.step(feed)  # bound: node.ops is the device's
    shapes, matmul = [], node.ops.matmul
    monkeypatch.setattr(node.ops, "matmul", lambda x1, x2, out=None: shapes.append(
        (tuple(x1.shape), tuple(x2.shape))) or matmul(x1, x2, out=out))
    graph.step(feed)
    assert sorted(shapes) == sorted([((6, 4), (4, 5)), ((6, 5), (5, 4)), ((4, 6), (6, 5))])
    want = torch.tensor(feed[a]).reshape(6, 4).T @ torch.tensor(feed[R]).reshape(6, 5)
    np.testing.assert_allclose(host(device, b.gradients[b]), want.numpy(), rtol=1e-12)


def test_embedding_repeated_ids_add_up(device):
    ids, W = gf.Input(name="ids"), gf.Input(name="W")
    node = gf.Embedding(ids, W)
    R = gf.Input()
    w = _normal(4, 3)
    Project(node, R)
    graph = gf.topological_sort({ids: np.array([[2, 2], [2, 0]]), W: w, R: np.ones((2, 2, 3))},
                                device=device, dtype="float64")
    gf.forward_and_backward(graph)
    np.testing.assert_array_equal(host(device, W.gradients[W]),
                                  [[1, 1, 1], [0, 0, 0], [3, 3, 3], [0, 0, 0]])
    assert not np.issubdtype(host(device, ids.value).dtype, np.floating), "ids became floats"
    assert ids not in node.gradients, "ids got a gradient"


# -- the tails ------------------------------------------------------------------------------
TAILS = np.array([-1e4, -50.0, -10.0, -6.0, -2.5, -1e-30, 0.0, 1e-30, 2.5, 6.0, 10.0, 50.0, 1e4])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["none", "tanh", "silu"])
def test_gelu_and_silu_tails_equal_torch_without_nan_or_warning(device, dtype, kind):
    X, R = gf.Input(), gf.Input()
    node = gf.SiLU(X) if kind == "silu" else gf.GELU(X, approximate=kind)
    Project(node, R)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise", under="ignore"):
            graph = gf.topological_sort({X: TAILS, R: np.ones_like(TAILS)}, device=device,
                                        dtype=dtype)
            gf.forward_and_backward(graph)
    x = torch.tensor(TAILS, dtype=getattr(torch, dtype), requires_grad=True)
    out = F.silu(x) if kind == "silu" else F.gelu(x, approximate=kind)
    out.sum().backward()
    value, grad = host(device, node.value), host(device, X.gradients[X])
    assert np.isfinite(value).all() and np.isfinite(grad).all(), (value, grad)
    # atol: 1 + erf and 1 + tanh cancel in the far negative tail, in torch as here (float64
    # rounding of a quantity of order 1)
    rtol, atol = (1e-12, 1e-14) if dtype == "float64" else (1e-5, 1e-6)
    np.testing.assert_allclose(value, out.detach().numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=rtol, atol=atol)


FUSED_ROUTES = ("gelu", "gelu_backward", "layer_norm", "layer_norm_backward", "softmax",
                "softmax_backward")


def _fused_case(kind, device, dtype, monkeypatch, fused):
    """(value, gradients) of one GELU / LayerNorm / causal attention step in `dtype`, with the
    device's fused routes or (fused=False) with them set to None: the portable code."""
    with monkeypatch.context() as patch:
        if not fused:
            for name in FUSED_ROUTES:
                patch.setattr(device.ops, name, None)
        rng = np.random.default_rng(5)
        if kind == "attention":
            shapes = [(2, 3, 5, 4)] * 3
            inputs = [gf.Input(name=n) for n in "qkv"]
            node = gf.ScaledDotProductAttention(*inputs, causal=True)
        elif kind in ("layer_norm", "layer_norm_1d"):  # 1-D: no batch axis to sum over
            shapes = [(2, 5, 6) if kind == "layer_norm" else (6,), (6,), (6,)]
            inputs = [gf.Input(name=n) for n in ("x", "gamma", "beta")]
            node = gf.LayerNorm(*inputs)
        else:
            shapes, inputs = [(3, 7)], [gf.Input(name="x")]
            node = gf.GELU(inputs[0], approximate=kind)
        feed = {n: rng.normal(size=s) * 3.0 for n, s in zip(inputs, shapes)}
        R = gf.Input(name="R")
        Project(node, R)  # MiniFlow's surface: no loss scaling in float16
        feed[R] = rng.normal(size=(2, 3, 5, 4) if kind == "attention" else shapes[0])
        gf.forward_and_backward(gf.topological_sort(feed, device=device, dtype=dtype))
        return ([host(device, node.value).astype(np.float64)] +
                [host(device, n.gradients[n]).astype(np.float64) for n in inputs])


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["none", "tanh", "layer_norm", "layer_norm_1d", "attention"])
def test_torch_fused_routes_equal_the_portable_code(device, dtype, kind, monkeypatch):
    """On torch devices GELU, LayerNorm and the attention's softmax run torch's own kernels
    (gelu, native_layer_norm, _softmax and their backward functions: one pass each where the
    portable code makes several); value and every gradient equal the portable code's, in
    every floating dtype (float16/bfloat16: torch computes inside in float32 and rounds once,
    the portable code rounds at each step)."""
    if device.backend != "torch":
        pytest.skip(f"{device.name}: no fused routes (the portable code runs)")
    assert all(getattr(device.ops, name) is not None for name in FUSED_ROUTES)
    fused = _fused_case(kind, device, dtype, monkeypatch, True)
    portable = _fused_case(kind, device, dtype, monkeypatch, False)
    rtol, atol = {"float64": (1e-12, 1e-13), "float32": (2e-5, 2e-6), "float16": (1e-2, 1e-2),
                  "bfloat16": (5e-2, 5e-2)}[dtype]  # atol: of the array's largest entry
    for got, want in zip(fused, portable):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * np.abs(want).max())


def test_the_subnormal_flush_route_equals_the_portable_one(device, monkeypatch):
    """`ops.flush_subnormals` (torch: hardshrink, one pass; NumPy: three passes) sets exactly
    the float32 subnormals to 0 and keeps NaN, inf and every normal number, as the four
    portable passes do."""
    from gpuflow.nodes.shapes import _flush_subnormals
    if device.backend not in ("numpy", "torch"):
        pytest.skip(f"{device.name}: the portable flush runs")
    assert device.ops.flush_subnormals is not None
    tiny = float(np.finfo(np.float32).smallest_normal)
    values = np.array([np.nan, np.inf, -np.inf, tiny, -tiny, tiny * (1 - 2**-23),
                       -tiny * (1 - 2**-23), 1e-40, -1e-45, 0.0, -3.0, 1e-30], np.float32)
    X = gf.Input()
    node = gf.Scale(X, 1.0)
    gf.topological_sort({X: values}, device=device, dtype="float32")
    results = []
    for route in (device.ops.flush_subnormals, None):
        with monkeypatch.context() as patch:
            patch.setattr(device.ops, "flush_subnormals", route)
            results.append(host(device, _flush_subnormals(node, device.put(values.copy()),
                                                          "flush")))
    expected = np.where(np.abs(values) < tiny, 0.0, values).astype(np.float32)
    for got in results:
        np.testing.assert_array_equal(got, expected)


def _subnormals(device, array):
    a = np.abs(host(device, array))
    return int(((0 < a) & (a < np.finfo(a.dtype).smallest_normal)).sum())


def test_float32_gelu_attention_and_cross_entropy_make_no_subnormal_value(device):
    """A CPU BLAS without flush-to-zero runs a matmul with subnormal inputs up to 100x slower
    (a GPT's step on the cpu device went from 0.4 s to 5 s once training sharpened): GELU's
    gradient at x = -14 (G x phi(x), phi(-14) ~ 1e-43), a softmax entry 95 or 200 below its
    row's maximum (exp(-95) ~ 5e-42) and cross-entropy's gradient there are set to 0."""
    X, R = gf.Input(), gf.Input()
    gelu = gf.GELU(X)
    Project(gelu, R)
    x = np.array([[-14.0, -13.5, -13.0, -1.0, 2.0]])
    graph = gf.topological_sort({X: x, R: np.ones_like(x)}, device=device, dtype="float32")
    gf.forward_and_backward(graph)
    assert _subnormals(device, X.gradients[X]) == 0, host(device, X.gradients[X])
    for gap in (95.0, 200.0):  # scores q.k / sqrt(4): gap, 0.25 and -0.5 in each row
        q = np.zeros((1, 1, 2, 4))
        q[..., 0] = 2.0
        k = np.zeros((1, 1, 3, 4))
        k[0, 0, :, 0] = [gap, 0.25, -0.5]
        Q, K, V, R = gf.Input(), gf.Input(), gf.Input(), gf.Input()
        attention = gf.ScaledDotProductAttention(Q, K, V)
        Project(attention, R)
        graph = gf.topological_sort({Q: q, K: k, V: _normal(1, 1, 3, 4), R: np.ones((1, 1, 2, 4))},
                                    device=device, dtype="float32")
        gf.forward_and_backward(graph)
        for what, a in (("p", attention.p), ("dq", Q.gradients[Q]), ("dk", K.gradients[K]),
                        ("dv", V.gradients[V])):
            assert _subnormals(device, a) == 0, (gap, what, host(device, a))
    Z, Y = gf.Input(), gf.Input()
    gf.SoftmaxCrossEntropy(Y, Z)
    graph = gf.topological_sort({Z: np.array([[0.0, 100.0, 90.0]]), Y: np.array([1])},
                                device=device, dtype="float32")
    gf.forward_and_backward(graph)
    assert _subnormals(device, Z.gradients[Z]) == 0, host(device, Z.gradients[Z])


def test_every_devices_erf_is_accurate_to_float64_rounding(device):
    mpmath = pytest.importorskip("mpmath")
    x = np.concatenate([np.linspace(-7.0, 7.0, 4001), np.geomspace(1e-300, 7.0, 600),
                        [0.0, 1.9999999999999998, 2.0, 6.0, 1e4, -1e4]])
    x = np.concatenate([x, -x])
    exact = np.array([float(mpmath.erf(mpmath.mpf(v))) for v in x])
    got = host(device, device.ops.erf(device.put(x)))
    ulps = np.abs(got - exact) / np.spacing(np.abs(exact))
    assert ulps.max() <= 2, f"{ulps.max()} ulp at x = {x[ulps.argmax()]} on {device.name}"


def test_every_devices_float32_erf_is_accurate_to_float32_rounding(device):
    """float32 erf within 1.5 ulp of float32 (against mpmath's erf at float32 points: a dense
    grid over [-10, 10], both sides of the formula's joins at 1 and 4, tiny and subnormal x,
    infinities), in float32, with NaN kept. The float32
    formula (special._ERF32_*) measured 1.32 ulp at most over every 7th float32 in [0, 4]
    (1.37 on this grid); the float64 formula run in float32, used before, was 2.8 ulp off."""
    mpmath = pytest.importorskip("mpmath")
    joins = np.array([1.0, 4.0, 3.92, 2.0], dtype=np.float32)
    # XLA flushes subnormal float32 to zero (JAX's own erf): subnormal x elsewhere only
    tiny = np.finfo(np.float32).tiny if device.backend == "jax" else 1e-45
    x = np.concatenate([np.linspace(-10.0, 10.0, 20001, dtype=np.float32),
                        np.geomspace(tiny, 10.0, 2000).astype(np.float32),
                        np.nextafter(joins, np.float32(0)), joins, np.nextafter(joins, np.inf),
                        [0.0, np.inf]]).astype(np.float32)
    x = np.concatenate([x, -x])
    exact = np.array([float(mpmath.erf(mpmath.mpf(float(v)))) for v in x])
    got = host(device, device.ops.erf(device.put(x, device.dtype("float32"))))
    assert got.dtype == np.float32, got.dtype
    ulps = np.abs(got - exact) / np.spacing(np.abs(exact).astype(np.float32))
    # JAX binds its own erf (XLA's float32 rational), up to 4.7 ulp off near |x| = 3.8
    bound = 5.0 if device.backend == "jax" else 1.5
    assert ulps.max() <= bound, f"{ulps.max()} ulp at x = {x[ulps.argmax()]} on {device.name}"
    assert np.array_equal(np.signbit(got), np.signbit(x)), "erf(-0.0) is -0.0, erf is odd"
    nan = host(device, device.ops.erf(device.put(np.array([np.nan, 1.0]),
                                                              device.dtype("float32"))))
    assert np.isnan(nan[0]) and abs(nan[1] - math.erf(1.0)) < 1e-7, nan


def test_cpu_erf_writes_into_out_and_equals_the_portable_formula():
    """The cpu device's erf (NumPy's in-place block version) gives the very numbers of
    special.erf on any namespace, float32 and float64, any shape, and writes into `out`."""
    from gpuflow.backends import numpy as numpy_backend, special
    rng = np.random.default_rng(6)
    for dtype in (np.float32, np.float64):
        x = np.concatenate([rng.normal(size=70001) * 3, [np.nan, np.inf, -np.inf, -0.0, 1e-300,
                                                         1.0, 2.0, 4.0, 6.0]]).astype(dtype)
        with np.errstate(all="ignore"):
            expected = special.erf(np, x)
        out = np.empty((7001, 10), dtype)
        got = numpy_backend.OPS.erf(x.reshape(7001, 10), out=out)
        assert got is out
        np.testing.assert_array_equal(got.reshape(-1), expected)
        assert np.array_equal(np.signbit(got.reshape(-1)), np.signbit(expected))
        transposed = x[:7000].reshape(70, 100).T  # not contiguous, no out: a new array
        np.testing.assert_array_equal(numpy_backend.OPS.erf(transposed), expected[:7000]
                                      .reshape(70, 100).T)


# -- bad inputs ------------------------------------------------------------------------------
def expect(fn, *parts):
    with pytest.raises(gf.GraphError) as info:
        fn()
    msg = str(info.value)
    for part in (*parts, "help:"):
        assert part in msg, f"{part!r} missing from: {msg}"
    return msg


def _embedding_graph(device, ids):
    ids_in, W = gf.Input(name="ids"), gf.Parameter(_normal(5, 3), name="table")
    node = gf.Embedding(ids_in, W, name="embed")
    R = gf.Input(name="R")
    graph = gf.Graph(Project(node, R), device=device, dtype="float64", inputs=[ids_in, R])
    return graph, ids_in, W, node, R


@pytest.mark.parametrize("bad", [-1, 5, 9])
def test_ids_out_of_range_are_refused_when_fed(device, bad):
    graph, ids, W, node, R = _embedding_graph(device, None)
    graph.step(np.array([[0, 4]]), np.ones((1, 2, 3)))
    before = (host(device, ids.value).copy(), host(device, W.value).copy(),
              host(device, W.gradients[W]).copy())
    expect(lambda: graph.step(np.array([[0, bad]]), np.ones((1, 2, 3))),
           "Input 'ids'", f"from {min(0, bad)} to {max(0, bad)}", "0 .. 4",
           "vocabulary of 5", "Parameter 'table'")
    after = (host(device, ids.value), host(device, W.value), host(device, W.gradients[W]))
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_ids_out_of_range_on_the_first_step_of_a_fed_table(device):
    # W an Input fed with the ids: the vocabulary is known at the first forward
    ids, W = gf.Input(name="ids"), gf.Input(name="W")
    node = gf.Embedding(ids, W, name="embed")
    graph = gf.topological_sort({ids: np.array([1, 7]), W: _normal(4, 2)}, device=device)
    expect(lambda: gf.forward_pass(node, graph), "Embedding 'embed'", "Input 'ids'",
           "from 1 to 7", "4 entries")


@pytest.mark.parametrize("when", ["build", "later"])
def test_float_ids_are_refused(device, when):
    if when == "build":
        expect(lambda: _embedding_graph(device, None)[0].step(np.array([[0.0, 1.5]]),
                                                              np.ones((1, 2, 3))),
               "Input 'ids'", "ids have dtype float64", "integer token ids")
        return
    graph, ids, *_ = _embedding_graph(device, None)
    graph.step(np.array([[0, 1]]), np.ones((1, 2, 3)))
    expect(lambda: graph.step(np.array([[0.0, 1.0]]), np.ones((1, 2, 3))),
           "Input 'ids'", "ids have dtype float64")
    np.testing.assert_array_equal(host(device, ids.value), [[0, 1]])


def _sce_graph(device, labels):
    y, Z = gf.Input(name="y"), gf.Parameter(_normal(2, 4, 5), name="logits")
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, Z, name="loss"), device=device,
                     dtype="float64", inputs=[y])
    loss = graph.step(labels)
    return graph, y, Z, loss


@pytest.mark.parametrize("bad", [-1, -99, 5])
def test_labels_out_of_range_beside_ignored_ones_are_refused_when_fed(device, bad):
    graph, y, Z, _ = _sce_graph(device, LABELS)
    before = host(device, Z.gradients[Z]).copy()
    labels = LABELS.copy()
    labels[1, 1] = bad
    expect(lambda: graph.step(labels), "Input 'y'", str(bad), "0 .. 4",
           "-100, the ignore_index")
    np.testing.assert_array_equal(host(device, y.value), LABELS)
    np.testing.assert_array_equal(host(device, Z.gradients[Z]), before)


def test_every_label_ignored_gives_nan_as_torch_and_a_zero_gradient(device):
    with warnings.catch_warnings():  # NumPy warns of 0 / 0; torch says nothing
        warnings.simplefilter("ignore", RuntimeWarning)
        graph, y, Z, loss = _sce_graph(device, np.full((2, 4), -100))
    assert math.isnan(graph.item(loss))
    assert not host(device, Z.gradients[Z]).any()
    expected = _torch_cross_entropy(torch.tensor(host(device, Z.value)),
                                    torch.full((2, 4), -100))
    assert math.isnan(float(expected))


def test_labels_of_the_wrong_shape_for_3d_logits(device):
    y, Z = gf.Input(name="y"), gf.Input(name="Z")
    loss = gf.SoftmaxCrossEntropy(y, Z, name="loss")
    graph = gf.topological_sort({y: LABELS.T, Z: _normal(2, 4, 5)}, device=device)
    expect(lambda: gf.forward_pass(loss, graph), "SoftmaxCrossEntropy 'loss'",
           "labels have shape (4, 2)", "logits (2, 4, 5)", "labels (N, T)")


def _attention(device, mask, shape=(1, 2, 3, 4)):
    q = gf.Input(name="q")
    node = gf.ScaledDotProductAttention(q, q, q, mask=mask, name="attn")
    graph = gf.topological_sort({q: _normal(*shape)}, device=device)
    return lambda: gf.forward_pass(node, graph)


@pytest.mark.parametrize("mask", [np.ones((4, 3), dtype=bool), np.ones((2, 2, 3, 3), dtype=bool),
                                  np.ones((1, 1, 1, 3, 3), dtype=bool)])
def test_a_mask_of_the_wrong_shape(device, mask):
    expect(_attention(device, mask), "ScaledDotProductAttention 'attn'",
           f"mask has shape {mask.shape}", "(1, 2, 3, 3)")


def test_a_mask_that_is_not_boolean_and_a_mask_with_causal():
    q = gf.Input()
    expect(lambda: gf.ScaledDotProductAttention(q, q, q, mask=np.ones((3, 3))),
           "mask has dtype float64", "boolean")
    expect(lambda: gf.ScaledDotProductAttention(q, q, q, mask=CAUSAL_5, causal=True),
           "not both")


def test_a_reshape_that_does_not_fit(device):
    for shape, count in [((5, -1), 24), ((4, 5), 24), ((0, -1), 24)]:
        X = gf.Input(name="x")
        node = gf.Reshape(X, shape, name="r")
        graph = gf.topological_sort({X: _normal(2, 3, 4)}, device=device)
        expect(lambda: gf.forward_pass(node, graph), "Reshape 'r'", "(2, 3, 4)",
               str(shape), f"multiply to {count}")
    X = gf.Input(name="x")
    node = gf.Reshape(X, (None, 3, None, -1), name="r")
    graph = gf.topological_sort({X: _normal(4, 6)}, device=device)
    expect(lambda: gf.forward_pass(node, graph), "Reshape 'r'", "position 2 (None)",
           "(4, 6) (2-D)")
    expect(lambda: gf.Reshape(X, (-1, -1)), "at most one -1")


def test_bad_axes(device):
    X = gf.Input(name="x")
    expect(lambda: gf.Transpose(X, (0, 0, 1)), "not a permutation")
    expect(lambda: gf.Transpose(X, (0, 3, 1)), "not a permutation")
    expect(lambda: gf.Transpose(X, 0.5), "not a permutation")
    assert X.outbound_nodes == [], "a refused node stayed attached to its input"
    cases = [(lambda x: gf.Transpose(x, (1, 0)), "(2, 3, 4) (3-D)"),
             (lambda x: gf.Concat([x, x], axis=3), "axis 3"),
             (lambda x: gf.Slice(x, 0, 1, axis=-4), "axis -4"),
             (lambda x: gf.Concat([x, gf.Transpose(x, (0, 2, 1))], axis=0),
              "differ outside axis 0"),
             (lambda x: gf.MatMul(x, x), "a.shape[-1] == b.shape[-2]"),
             (lambda x: gf.Mul(x, gf.Transpose(x, (1, 0, 2))), "do not broadcast"),
             (lambda x: gf.BiasAdd(gf.Slice(x, 0, 1, axis=1), x), "would broadcast x")]
    for builder, part in cases:
        X = gf.Input(name="x")
        node = builder(X)
        graph = gf.topological_sort({X: _normal(2, 3, 4)}, device=device)
        expect(lambda: gf.forward_pass(node, graph), node.label, part)


def test_lstm_shapes_that_do_not_fit(device):
    good = {"x": (2, 3, 4), "W_ih": (8, 4), "W_hh": (8, 2), "b_ih": (8,), "b_hh": (8,)}
    for slot, shape in [("x", (2, 4)), ("x", (2, 0, 4)), ("x", (2, 3, 5)), ("W_ih", (8, 3)),
                        ("W_hh", (8, 3)), ("W_hh", (6, 2)), ("b_ih", (4,)), ("b_hh", (8, 1))]:
        inputs = {k: gf.Input(name=k) for k in good}
        node = gf.LSTM(*inputs.values(), name="rnn")
        feed = {inputs[k]: _normal(*(shape if k == slot else s)) for k, s in good.items()}
        graph = gf.topological_sort(feed, device=device)
        expect(lambda: gf.forward_pass(node, graph), "LSTM 'rnn'", str(shape),
               "W_hh (4H, H)", "Input 'W_ih'")


def test_bad_options():
    X = gf.Input()
    expect(lambda: gf.GELU(X, approximate="erf"), "'none' or 'tanh'")
    expect(lambda: gf.Scale(X, math.inf), "finite")
    expect(lambda: gf.Scale(X, np.ones(2)), "Python number")
    expect(lambda: gf.Slice(X, 0.5, 2), "start=0.5")
    expect(lambda: gf.Concat([]), "at least one")
    expect(lambda: gf.Concat([X], axis=None), "axis None")
    expect(lambda: gf.ScaledDotProductAttention(X, X, X, mask=[["a"]]), "not numbers")
    assert X.outbound_nodes == [], "a refused node stayed attached to its input"


def _cross_entropy_step(device, labels_fed, ignore_index=-100, dtype="float32"):
    """(loss, logits' gradient, node) of one Graph step of SoftmaxCrossEntropy over fixed
    logits, each batch of `labels_fed` fed in turn through graph.step (the host check)."""
    z = gf.Parameter(np.random.default_rng(2).normal(size=(6, 4, 5)) * 3, name="z")
    y = gf.Input(name="y")
    node = gf.SoftmaxCrossEntropy(y, z, ignore_index=ignore_index)
    graph = gf.Graph(node, device=device, dtype=dtype, inputs=[y])
    for labels in labels_fed:
        loss = graph.step(labels)
    return graph.item(loss), host(device, z.gradients[z]), node


def test_cross_entropy_counts_every_row_without_a_mask_when_no_label_is_ignored(device):
    """Labels checked on the host to hold no ignore_index (-100) take the unmasked route
    (a W2 step paid ~12 us for the mask); its loss and gradient equal the masked route's bit
    for bit (an ignore_index of 4 that no label uses keeps the mask on). A later batch that
    holds -100 takes the masked route again."""
    labels = np.random.default_rng(3).integers(0, 4, (6, 4))  # no label 4
    # twice: the first feed comes before the node knows its classes (at its first forward)
    fast = _cross_entropy_step(device, [labels, labels])
    masked = _cross_entropy_step(device, [labels, labels], ignore_index=4)
    if device.is_host:  # labels already on a GPU are not read on the host: the mask stays
        assert fast[2].valid is None
    assert masked[2].valid is not None
    assert fast[0] == masked[0]
    np.testing.assert_array_equal(fast[1], masked[1])
    ignored = labels.copy()
    ignored[0, :3] = -100
    after = _cross_entropy_step(device, [labels, ignored])
    alone = _cross_entropy_step(device, [ignored])
    assert after[2].valid is not None
    assert after[0] == alone[0]
    np.testing.assert_array_equal(after[1], alone[1])
    np.testing.assert_array_equal(after[1][0, :3], 0.0)
