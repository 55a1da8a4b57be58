"""Trainable parameters with seeded initialisers, and the dense-layer / MLP builders.

Initial weights are drawn in float64 from a seeded host generator and only then moved to the
graph's device (and cast to its dtype), so one seed gives bit-identical weights on every device.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any, Callable, Sequence

from .backends.numpy import host_copy, host_rng, host_zeros
from .errors import GraphError, check_int
from .nodes.conv import Conv2D, Flatten, MaxPool2D, _pair
from .host import to_numpy
from .nodes.activations import ReLU, Sigmoid, Tanh
from .nodes import Add, Input, Linear, Node
from .nodes.norm import BatchNorm, Dropout, LayerNorm
from .nodes.positions import Positions
from .nodes.recurrent import LSTM
from .runtime.recomputation import recompute as _recompute
from .nodes.sequence import (GELU, BiasAdd, Embedding, MatMul, Reshape, ScaledDotProductAttention,
                       Slice, Transpose)


def zeros(rng: Any, shape: tuple[int, ...], fan_in: int, fan_out: int) -> Any:
    """All zeros."""
    return host_zeros(shape)


def ones(rng: Any, shape: tuple[int, ...], fan_in: int, fan_out: int) -> Any:
    """All ones (normalisation scales)."""
    return host_zeros(shape) + 1.0


def normal(rng: Any, shape: tuple[int, ...], fan_in: int, fan_out: int, std: float = 0.01) -> Any:
    """N(0, std^2), std 0.01 by default."""
    return rng.standard_normal(size=shape) * std


def xavier(rng: Any, shape: tuple[int, ...], fan_in: int, fan_out: int) -> Any:
    """Xavier/Glorot uniform: U(-a, a) with a = sqrt(6 / (fan_in + fan_out))."""
    a = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-a, a, size=shape)


def he(rng: Any, shape: tuple[int, ...], fan_in: int, fan_out: int) -> Any:
    """He/Kaiming normal: N(0, 2 / fan_in), for ReLU layers."""
    return rng.standard_normal(size=shape) * math.sqrt(2.0 / fan_in)


def torch_uniform(rng: Any, shape: tuple[int, ...], fan_in: int, fan_out: int) -> Any:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch.nn.Linear's default weight and bias (its
    kaiming_uniform_ with a = sqrt(5)), and every torch.nn.LSTM weight (fan_in = H)."""
    a = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-a, a, size=shape)


def standard_normal(rng: Any, shape: tuple[int, ...], fan_in: int, fan_out: int) -> Any:
    """N(0, 1): torch.nn.Embedding's table."""
    return rng.standard_normal(size=shape)


INITIALIZERS: dict[str, Callable[..., Any]] = {
    "zeros": zeros, "ones": ones, "normal": normal, "xavier": xavier, "glorot": xavier, "he": he,
    "kaiming": he}


class Parameter(Input):
    """A trainable Input: a named array that optimizers update.

    shape: the array's shape (a tuple of positive ints, or one int); or an array (NumPy, any
    device's array, a list of numbers or nested lists), which is then the initial value,
    copied (as `Parameter.from_array(W, name=...)` says explicitly). The rule, as torch's
    `torch.empty((3, 4))` and `torch.tensor([3.0, 4.0])` read them: an int or a tuple of ints
    is a shape, a list (flat or nested) or a nested tuple is a value, in floating point
    (`Parameter([3, 4], ...)` starts from [3.0, 4.0]; for a shape pass `(3, 4)`). init: 'zeros', 'normal', 'xavier'
    (= 'glorot', the default), 'he' (= 'kaiming') or a function (rng, shape, fan_in,
    fan_out) -> host array; rng: a seeded host generator (gpuflow.layers.host_rng(seed)), a
    seed, or None for a seed made from the name (so two layers built apart never start
    identical).
    """

    _trainable = True
    # The name of this parameter in an equal torch module's state_dict, where a layer builder
    # knows it (gf.layers.gpt): export_weights / load_weights use it for layout="torch".
    torch_name: str | None = None

    @property
    def trainable(self) -> bool:
        """Whether optimizers update this parameter and its graph computes its gradient. Set it
        to False to freeze the parameter, also after the graph is built: the graph plans its
        backward pass again before its next step, and optimizers skip it."""
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        if value not in (True, False):
            raise GraphError(f"{self.label}.trainable must be True or False, got {value!r}.\n"
                             "help: p.trainable = False freezes p; True trains it again.")
        if bool(value) != self._trainable:
            self._trainable = bool(value)
            if self._plan is not None:
                self._plan.stale = True  # plan again: compute this gradient or not

    def __init__(self, shape: "Sequence[int] | int | Any",
                 init: "str | Callable[..., Any] | None" = None, *,
                 name: str, rng: Any = None, fan_in: int | None = None,
                 fan_out: int | None = None) -> None:
        Input.__init__(self, name=name)
        if getattr(shape, "ndim", 0) or isinstance(shape, list) or _nested(shape):  # a value
            if init is not None:
                raise GraphError(f"Parameter '{name}': got an initial array and init={init!r}."
                                 "\nhelp: pass either an array (the initial value) or a "
                                 "shape (a tuple) with init.")
            value = host_copy(to_numpy(shape))
            if isinstance(shape, (list, tuple)) and value.dtype.kind in "biu":
                value = value.astype("float64")  # [3, 4] is a value of floats, as weights are
            if value.size == 0:
                raise GraphError(f"Parameter '{name}': the initial value has shape "
                                 f"{tuple(value.shape)}, no entries.\nhelp: pass a value with "
                                 "at least one entry, or a shape tuple, e.g. (3, 4).")
            self.shape = _checked_shape(value.shape, name)
            self.value = value
            return
        shape = _checked_shape(shape, name)
        init = "xavier" if init is None else init
        if isinstance(init, str):
            if init not in INITIALIZERS:
                raise GraphError(f"Parameter '{name}': unknown initialiser {init!r}.\n"
                                 f"help: use one of {sorted(INITIALIZERS)} or a function.")
            init = INITIALIZERS[init]
        rng = _generator(rng, name)
        fan_in = fan_in if fan_in is not None else shape[0]
        fan_out = fan_out if fan_out is not None else shape[-1]
        value = init(rng, shape, fan_in, fan_out)
        if tuple(value.shape) != shape:
            raise GraphError(f"Parameter '{name}': the initialiser returned shape "
                             f"{tuple(value.shape)}, expected {shape}.\nhelp: return an "
                             "array of the shape the initialiser is given.")
        self.shape = shape
        self.value = value

    @classmethod
    def from_array(cls, array: Any, *, name: str) -> "Parameter":
        """A Parameter starting from `array` (copied): e.g. weights one already has."""
        return cls(to_numpy(array), name=name)


def _nested(shape: Any) -> bool:
    """Whether `shape` is a nested list or tuple (rows of numbers): an array, not a shape."""
    return isinstance(shape, (list, tuple)) and any(isinstance(s, (list, tuple)) for s in shape)


def _checked_shape(shape: Any, name: str) -> tuple[int, ...]:
    """`shape` as a tuple of positive ints (one int is a 1-D shape); GraphError otherwise."""
    sizes = (shape,) if isinstance(shape, int) or hasattr(shape, "__index__") else shape
    try:
        sizes = tuple(sizes)
        ok = all(hasattr(s, "__index__") and not isinstance(s, bool) for s in sizes)
    except TypeError:
        ok = False
    if not ok or not sizes or min(int(s) for s in sizes) < 1:
        raise GraphError(f"Parameter '{name}': shape {shape!r:.60} must be a tuple of positive "
                         "ints.\nhelp: pass e.g. Parameter((3, 4), name=...), or a list or an "
                         "array as the initial value (Parameter([0.1, 0.2], name=...)).")
    return tuple(int(s) for s in sizes)


def _generator(rng: Any, name: str) -> Any:
    """A host generator: `rng` itself, one seeded with it, or (None) one seeded by `name`."""
    if hasattr(rng, "standard_normal"):
        return rng
    return host_rng(zlib.crc32(name.encode()) if rng is None else rng)


ACTIVATIONS: dict[str, Callable[..., Node]] = {
    "relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh}


def dense(x: Node, n_in: int, n_out: int, *, name: str, rng: Any = None,
          init: "str | Callable[..., Any] | None" = None,
          activation: str | None = None) -> tuple[Node, dict[str, Parameter]]:
    """One fully connected layer `activation(x @ W + b)`.

    Returns (output node, {"<name>.W": W, "<name>.b": b}). W is (n_in, n_out), initialised
    with He for ReLU and Xavier otherwise (unless `init` says); b starts at zero.
    """
    if activation is not None and activation not in ACTIVATIONS:
        raise GraphError(f"dense '{name}': unknown activation {activation!r}.\n"
                         f"help: use one of {sorted(ACTIVATIONS)} or None.")
    rng = _generator(rng, name)
    init = init or ("he" if activation == "relu" else "xavier")
    W = Parameter((n_in, n_out), init, name=f"{name}.W", rng=rng)
    b = Parameter((n_out,), "zeros", name=f"{name}.b", rng=rng)
    out: Node = Linear(x, W, b, name=name)
    if activation is not None:
        out = ACTIVATIONS[activation](out, name=f"{name}.{activation}")
    return out, {W.name: W, b.name: b}


def _all_or_nothing(build: Callable[..., Any]) -> Callable[..., Any]:
    """A builder of several layers that refuses midway (a bad size or dropout for a later
    layer) leaves x as it was: the layers it already linked to x are taken off again
    (`Node._unlink`, as a refused node is), so no half-built model hangs off the user's graph."""
    @functools.wraps(build)
    def wrapper(x: Node, *args: Any, **kwargs: Any) -> Any:
        before = {id(m) for m in getattr(x, "outbound_nodes", ())}
        try:
            return build(x, *args, **kwargs)
        except BaseException:
            for m in list(getattr(x, "outbound_nodes", ())):
                if id(m) not in before:
                    m._unlink()
            raise
    return wrapper


@_all_or_nothing
def mlp(x: Node, sizes: Sequence[int], *, activation: str = "relu", seed: int = 0,
        name: str = "layer", dropout: float = 0.0,
        recompute: bool = False) -> tuple[Node, dict[str, Parameter]]:
    """A multi-layer perceptron: sizes = [n_in, hidden..., n_out].

    Every layer but the last applies `activation` (then Dropout(`dropout`) if > 0); the last
    returns raw outputs (logits). `recompute`: each hidden layer is a recomputed segment
    (gpuflow/runtime/recomputation.py): the same numbers, less memory.
    Returns (output node, {parameter name: Parameter}) in layer order. One `seed` gives the
    same weights on every device.
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise GraphError(f"mlp: sizes {sizes} must list at least an input and an output size, "
                         "all positive.\nhelp: e.g. mlp(X, [64, 128, 10]).")
    rng = host_rng(seed)
    params: dict[str, Parameter] = {}
    out = x
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        last = i == len(sizes) - 1

        def layer(out: Node, i: int = i, n_in: int = n_in, n_out: int = n_out,
                  last: bool = last) -> tuple[Node, dict[str, Parameter]]:
            out, p = dense(out, n_in, n_out, name=f"{name}{i}", rng=rng,
                           activation=None if last else activation)
            if dropout > 0.0 and not last:
                out = Dropout(out, dropout, seed=seed + i, name=f"{name}{i}.dropout")
            return out, p

        out, p = (_recompute(layer, out, name=f"{name}{i}") if recompute and not last
                  else layer(out))
        params.update(p)
    return out, params


def conv2d(x: Node, in_channels: int, out_channels: int, kernel: Any, *, stride: Any = 1,
           padding: Any = 0, name: str, rng: Any = None,
           init: "str | Callable[..., Any] | None" = None, bias: bool = True,
           activation: str | None = None) -> tuple[Node, dict[str, Parameter]]:
    """One convolution layer `activation(Conv2D(x, W, b))`, x (N, in_channels, H, W).

    kernel: an int or (kh, kw). Returns (output node, {"<name>.W": W, "<name>.b": b}) with W
    (out_channels, in_channels, kh, kw) initialised with He (fan_in = in_channels kh kw)
    unless `init` says, and b (out_channels,) at zero (no b with `bias=False`).
    """
    if activation is not None and activation not in ACTIVATIONS:
        raise GraphError(f"conv2d '{name}': unknown activation {activation!r}.\n"
                         f"help: use one of {sorted(ACTIVATIONS)} or None.")
    kh, kw = _pair(kernel, "kernel", f"conv2d '{name}'", minimum=1)
    rng = _generator(rng, name)
    W = Parameter((out_channels, in_channels, kh, kw), init or "he", name=f"{name}.W", rng=rng,
                  fan_in=in_channels * kh * kw, fan_out=out_channels * kh * kw)
    params = {W.name: W}
    b = None
    if bias:
        b = Parameter((out_channels,), "zeros", name=f"{name}.b", rng=rng)
        params[b.name] = b
    out: Node = Conv2D(x, W, b, stride=stride, padding=padding, name=name)
    if activation is not None:
        out = ACTIVATIONS[activation](out, name=f"{name}.{activation}")
    return out, params


def batchnorm(x: Node, channels: int, *, name: str, momentum: float = 0.1,
              eps: float = 1e-5) -> tuple[Node, dict[str, Parameter]]:
    """BatchNorm over the channels of x (N, C) or (N, C, H, W): returns (node,
    {"<name>.gamma": ones (C,), "<name>.beta": zeros (C,)})."""
    gamma = Parameter((channels,), "ones", name=f"{name}.gamma")
    beta = Parameter((channels,), "zeros", name=f"{name}.beta")
    node = BatchNorm(x, gamma, beta, momentum=momentum, eps=eps, name=name)
    return node, {gamma.name: gamma, beta.name: beta}


def layernorm(x: Node, size: int, *, name: str,
              eps: float = 1e-5) -> tuple[Node, dict[str, Parameter]]:
    """LayerNorm over the last dimension (size) of x: returns (node,
    {"<name>.gamma": ones (size,), "<name>.beta": zeros (size,)})."""
    gamma = Parameter((size,), "ones", name=f"{name}.gamma")
    beta = Parameter((size,), "zeros", name=f"{name}.beta")
    node = LayerNorm(x, gamma, beta, eps=eps, name=name)
    return node, {gamma.name: gamma, beta.name: beta}


def embedding(ids: Node, vocab: int, dim: int, *, name: str,
              rng: Any = None) -> tuple[Node, dict[str, Parameter]]:
    """Token embeddings, as torch.nn.Embedding(vocab, dim): integer ids of any shape give
    ids.shape + (dim,). Returns (node, {"<name>.weight": the (vocab, dim) table}), drawn
    N(0, 1) as torch's."""
    vocab, dim = (check_int(v, k, 1, where=f"embedding '{name}'", error=GraphError)
                  for k, v in (("vocab", vocab), ("dim", dim)))
    W = Parameter((vocab, dim), standard_normal, name=f"{name}.weight", rng=_generator(rng, name))
    return Embedding(ids, W, name=name), {W.name: W}


def lstm(x: Node, input_size: int, hidden_size: int, *, name: str,
         rng: Any = None) -> tuple[Node, dict[str, Parameter]]:
    """One LSTM layer over x (N, T, input_size), as torch.nn.LSTM(input_size, hidden_size,
    batch_first=True) with a zero initial state: gives the hidden states (N, T, hidden_size).

    Returns (node, parameters) named as torch's state_dict: "<name>.weight_ih_l0"
    (4H, input_size), "<name>.weight_hh_l0" (4H, H), "<name>.bias_ih_l0" and
    "<name>.bias_hh_l0" (4H,), the gates stacked i, f, g, o, all drawn U(-1/sqrt(H),
    1/sqrt(H)) as torch's.
    """
    where = f"lstm '{name}'"
    n_in = check_int(input_size, "input_size", 1, where=where, error=GraphError)
    H = check_int(hidden_size, "hidden_size", 1, where=where, error=GraphError)
    rng = _generator(rng, name)
    params = [Parameter(shape, torch_uniform, name=f"{name}.{key}", rng=rng, fan_in=H)
              for key, shape in (("weight_ih_l0", (4 * H, n_in)), ("weight_hh_l0", (4 * H, H)),
                                 ("bias_ih_l0", (4 * H,)), ("bias_hh_l0", (4 * H,)))]
    return LSTM(x, *params, name=name), {p.name: p for p in params}


def attention(x: Node, dim: int, heads: int, *, causal: bool = True, name: str,
              rng: Any = None) -> tuple[Node, dict[str, Parameter]]:
    """Multi-head self-attention over x (N, T, dim), as torch.nn.MultiheadAttention(dim, heads,
    batch_first=True) called as mha(x, x, x) (with a causal mask if `causal`, position t
    attending to positions <= t): gives (N, T, dim).

    Returns (node, parameters) named and laid out as that module's state_dict:
    "<name>.in_proj_weight" (3 dim, dim), the query, key and value projections stacked, drawn
    Xavier-uniform; "<name>.in_proj_bias" (3 dim,) zeros; "<name>.out_proj.weight" (dim, dim)
    drawn U(-1/sqrt(dim), 1/sqrt(dim)); "<name>.out_proj.bias" (dim,) zeros, as torch's.
    Built of the sequence nodes: the projections as MatMul with the transposed weight and
    BiasAdd, the heads split with Reshape and Transpose, ScaledDotProductAttention.
    """
    dim, heads = _heads(f"attention '{name}'", dim, heads)
    rng = _generator(rng, name)
    W_in = Parameter((3 * dim, dim), "xavier", name=f"{name}.in_proj_weight", rng=rng,
                     fan_in=dim, fan_out=3 * dim)
    b_in = Parameter((3 * dim,), "zeros", name=f"{name}.in_proj_bias", rng=rng)
    W_out = Parameter((dim, dim), torch_uniform, name=f"{name}.out_proj.weight", rng=rng,
                      fan_in=dim)
    b_out = Parameter((dim,), "zeros", name=f"{name}.out_proj.bias", rng=rng)
    qkv = BiasAdd(MatMul(x, Transpose(W_in, (1, 0)), name=f"{name}.in_proj"), b_in,
                  name=f"{name}.in_proj_bias_add")

    def split(i: int, part: str) -> Node:  # (N, T, dim) slice -> (N, heads, T, dim / heads)
        sliced = Slice(qkv, i * dim, (i + 1) * dim, axis=-1, name=f"{name}.{part}")
        return Transpose(Reshape(sliced, (None, None, heads, -1), name=f"{name}.{part}.heads"),
                         (0, 2, 1, 3), name=f"{name}.{part}.heads_first")

    out = ScaledDotProductAttention(split(0, "q"), split(1, "k"), split(2, "v"), causal=causal,
                                    name=f"{name}.sdpa")
    merged = Reshape(Transpose(out, (0, 2, 1, 3), name=f"{name}.heads_last"),
                     (None, None, dim), name=f"{name}.merge")
    node = BiasAdd(MatMul(merged, Transpose(W_out, (1, 0)), name=f"{name}.out_proj"), b_out,
                   name=name)
    return node, {p.name: p for p in (W_in, b_in, W_out, b_out)}


def _heads(where: str, dim: Any, heads: Any) -> tuple[int, int]:
    """dim and heads as ints, heads dividing dim; else a GraphError naming `where`."""
    dim = check_int(dim, "dim", 1, where=where, error=GraphError)
    heads = check_int(heads, "heads", 1, where=where, error=GraphError)
    if dim % heads:
        fits = [h for h in range(1, dim + 1) if dim % h == 0]
        raise GraphError(f"{where}: {heads} heads do not divide the width dim={dim} (each head "
                         f"takes dim / heads features).\nhelp: use a head count that divides "
                         f"{dim} ({', '.join(map(str, fits[:8]))}{', ...' if len(fits) > 8 else ''}"
                         f"), or a width that is a multiple of {heads}.")
    return dim, heads


def _gpt2_normal(std: float) -> Callable[..., Any]:
    """N(0, std^2) weights: GPT-2's initialisation (std 0.02), as nanoGPT's."""
    return functools.partial(normal, std=std)


def _linear(x: Node, n_in: int, n_out: int, *, name: str, rng: Any,
            std: float = 0.02) -> tuple[Node, dict[str, Parameter]]:
    """Linear(x, W, b) over x (..., n_in), torch.nn.Linear's names ("<name>.weight" (n_in,
    n_out), gpuflow's layout, "<name>.bias"), W drawn N(0, std^2) and b zero as GPT-2's."""
    W = Parameter((n_in, n_out), _gpt2_normal(std), name=f"{name}.weight", rng=rng)
    b = Parameter((n_out,), "zeros", name=f"{name}.bias", rng=rng)
    return Linear(x, W, b, name=name), {W.name: W, b.name: b}


def _layer_norm(x: Node, dim: int, *, name: str) -> tuple[Node, dict[str, Parameter]]:
    """LayerNorm over the last dimension, torch.nn.LayerNorm's names (weight, bias)."""
    gamma = Parameter((dim,), "ones", name=f"{name}.weight")
    beta = Parameter((dim,), "zeros", name=f"{name}.bias")
    return LayerNorm(x, gamma, beta, name=name), {gamma.name: gamma, beta.name: beta}


def _check_dropout(where: str, dropout: Any) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise GraphError(f"{where}: dropout={dropout!r} must be a number in [0, 1).\nhelp: "
                         "e.g. dropout=0.1, or 0.0 for none.")


def _dropout(x: Node, p: float, rng: Any, *, name: str) -> Node:
    """Dropout(p) with a seed drawn from `rng`, or x itself for p == 0."""
    return Dropout(x, p, seed=int(rng.integers(2**31)), name=name) if p else x


@_all_or_nothing
def transformer_block(x: Node, dim: int, heads: int, *, mlp_ratio: int = 4,
                      dropout: float = 0.0, causal: bool = True, name: str,
                      rng: Any = None) -> tuple[Node, dict[str, Parameter]]:
    """The pre-LayerNorm GPT-2 block over x (N, T, dim), as nanoGPT's `Block`:

        x = x + dropout(attn(ln1(x)))
        x = x + dropout(mlp(ln2(x)))    mlp: Linear(dim, mlp_ratio dim), GELU, Linear back

    attn is gf.attention (torch.nn.MultiheadAttention's parameters and initialisation; causal
    by default), the GELU the exact one (approximate="none", torch.nn.GELU()'s default; GPT-2
    itself used the tanh form), the dropout (none by default) after the attention's and the
    MLP's output projections, as GPT-2's residual dropout. Returns (node, parameters) named as
    the state_dict of a torch module with submodules ln1, attn, ln2 and mlp =
    Sequential(Linear, GELU, Linear): "<name>.ln1.weight", "<name>.attn.in_proj_weight", ...,
    "<name>.mlp.0.weight" (dim, hidden: gpuflow's (in, out) layout, the transpose of
    torch's), "<name>.mlp.2.bias"; the MLP's weights drawn N(0, 0.02^2), biases zero.
    """
    where = f"transformer_block '{name}'"
    dim, heads = _heads(where, dim, heads)
    hidden = dim * check_int(mlp_ratio, "mlp_ratio", 1, where=where, error=GraphError)
    _check_dropout(where, dropout)
    rng = _generator(rng, name)
    params: dict[str, Parameter] = {}

    def add(built: tuple[Node, dict[str, Parameter]]) -> Node:
        params.update(built[1])
        return built[0]

    h = add(_layer_norm(x, dim, name=f"{name}.ln1"))
    h = add(attention(h, dim, heads, causal=causal, name=f"{name}.attn", rng=rng))
    x = Add(x, _dropout(h, dropout, rng, name=f"{name}.attn.dropout"), name=f"{name}.residual1")
    h = add(_layer_norm(x, dim, name=f"{name}.ln2"))
    h = GELU(add(_linear(h, dim, hidden, name=f"{name}.mlp.0", rng=rng)), name=f"{name}.mlp.1")
    h = add(_linear(h, hidden, dim, name=f"{name}.mlp.2", rng=rng))
    x = Add(x, _dropout(h, dropout, rng, name=f"{name}.mlp.dropout"), name=f"{name}.residual2")
    return x, params


@_all_or_nothing
def gpt(ids: Node, vocab: int, context: int, dim: int, layers: int, heads: int, *,
        dropout: float = 0.0, mlp_ratio: int = 4, rng: Any = None,
        name: str = "gpt", recompute: bool = False) -> tuple[Node, dict[str, Parameter]]:
    """A GPT over integer ids (N, T), T <= context: logits (N, T, vocab), as nanoGPT's `GPT`
    (without its weight tying): token embeddings plus learned position embeddings, dropout,
    `layers` transformer_blocks (causal), a final LayerNorm and a linear head (with a bias).

    Returns (logits, parameters) named "<name>." + the state_dict key of the torch module
    with submodules tok_emb = Embedding(vocab, dim), pos_emb = Embedding(context, dim),
    blocks = ModuleList of blocks (see transformer_block), ln_f = LayerNorm(dim), head =
    Linear(dim, vocab) (each Parameter's `torch_name`; export_weights / load_weights use it).
    Initialisation as GPT-2's: embeddings, MLP and head weights N(0, 0.02^2), the MLP's output
    projection N(0, 0.02^2 / (2 layers)), biases zero, the attention as torch's
    MultiheadAttention. A T longer than `context` is a GraphError at the step; a head count
    that does not divide dim one here. One `rng` (a seed) gives the same weights everywhere.
    `recompute`: each block is a recomputed segment (gf.recompute,
    gpuflow/runtime/recomputation.py): only its output is kept after the forward pass; the same
    numbers, less memory.
    """
    where = f"gpt '{name}'"
    vocab, context, layers = (check_int(v, k, 1, where=where, error=GraphError) for k, v in
                              (("vocab", vocab), ("context", context), ("layers", layers)))
    dim, heads = _heads(where, dim, heads)
    _check_dropout(where, dropout)
    rng = _generator(rng, name)
    tok = Parameter((vocab, dim), _gpt2_normal(0.02), name=f"{name}.tok_emb.weight", rng=rng)
    pos = Parameter((context, dim), _gpt2_normal(0.02), name=f"{name}.pos_emb.weight", rng=rng)
    params = {tok.name: tok, pos.name: pos}
    x: Node = BiasAdd(Embedding(ids, tok, name=f"{name}.tok_emb"),
                      Positions(ids, pos, name=f"{name}.pos_emb"), name=f"{name}.embed")
    x = _dropout(x, dropout, rng, name=f"{name}.dropout")
    for i in range(layers):
        block = f"{name}.blocks.{i}"
        build = functools.partial(transformer_block, dim=dim, heads=heads, dropout=dropout,
                                  mlp_ratio=mlp_ratio, name=block, rng=rng)
        x, p = _recompute(build, x, name=block) if recompute else build(x)
        p[f"{block}.mlp.2.weight"].value = p[f"{block}.mlp.2.weight"].value / math.sqrt(
            2 * layers)  # GPT-2's scaled residual projections
        params.update(p)
    x, p = _layer_norm(x, dim, name=f"{name}.ln_f")
    params.update(p)
    logits, p = _linear(x, dim, vocab, name=f"{name}.head", rng=rng)
    params.update(p)
    for key, param in params.items():
        param.torch_name = key[len(name) + 1:]
    return logits, params


@_all_or_nothing
def lenet(x: Node, image_shape: Sequence[int], n_classes: int, *,
          channels: Sequence[int] = (16, 32), hidden: int = 64, dropout: float = 0.0,
          batch_norm: bool = False, seed: int = 0, name: str = "cnn",
          recompute: bool = False) -> tuple[Node, dict[str, Parameter]]:
    """A small LeNet-style CNN for x (N, C, H, W) images of `image_shape` (C, H, W).

    One block per entry of `channels`: a 3x3 convolution (padding 1), BatchNorm if
    `batch_norm` (then the convolution has no bias), ReLU and 2x2 max pooling; then Flatten, a ReLU dense layer of `hidden` units, Dropout(`dropout`) if > 0,
    and a dense layer of `n_classes` logits. Returns (logits, {parameter name: Parameter});
    one `seed` gives the same weights on every device. `recompute`: each block is a
    recomputed segment (gpuflow/runtime/recomputation.py): the same numbers, less memory.
    """
    c, h, w = (int(s) for s in image_shape)
    rng = host_rng(seed)
    params: dict[str, Parameter] = {}
    out = x
    for i, width in enumerate(channels, start=1):
        if h < 2 or w < 2:
            raise GraphError(f"lenet: {len(channels)} pooling blocks halve {tuple(image_shape)} "
                             f"below 2x2 at block {i}.\nhelp: use fewer channels entries.")

        def block(out: Node, i: int = i, c: int = c,
                  width: int = width) -> tuple[Node, dict[str, Parameter]]:
            out, p = conv2d(out, c, width, 3, padding=1, name=f"{name}.conv{i}", rng=rng,
                            bias=not batch_norm)
            if batch_norm:
                out, q = batchnorm(out, width, name=f"{name}.bn{i}")
                p.update(q)
            return MaxPool2D(ReLU(out, name=f"{name}.relu{i}"), 2, name=f"{name}.pool{i}"), p

        out, p = _recompute(block, out, name=f"{name}.block{i}") if recompute else block(out)
        params.update(p)
        c, h, w = width, h // 2, w // 2
    out = Flatten(out, name=f"{name}.flatten")
    out, p = dense(out, c * h * w, hidden, name=f"{name}.fc1", rng=rng, activation="relu")
    params.update(p)
    if dropout > 0.0:
        out = Dropout(out, dropout, seed=seed, name=f"{name}.dropout")
    logits, p = dense(out, hidden, n_classes, name=f"{name}.fc2", rng=rng)
    params.update(p)
    return logits, params
