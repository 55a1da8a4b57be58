"""The benchmark's workloads: the network, its loss, the fixed host batch, the initial weights.

W1-W4 are MLPs (`Workload`), W5-W6 small convolutional networks (`ConvWorkload`), W7 a small
character-level GPT (`GPTWorkload`, gf.layers.gpt). Each builds
gpuflow's own model from seeded Parameters (for the Graph variant), the same network over given
weight nodes (for the MiniFlow variant), and gives the weights as host arrays for the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

import gpuflow as gf
from gpuflow.backends.numpy import host_rng

LEARNING_RATE = 1e-2
CHECK_STEPS = 3   # steps of every variant whose losses are compared before timing


@dataclass(frozen=True)
class Workload:
    """An MLP training step: layer sizes, hidden activation, loss, batch size."""

    name: str
    sizes: tuple[int, ...]
    activation: str     # 'sigmoid' or 'relu'
    loss: str           # 'mse' or 'ce' (softmax cross-entropy)
    batch: int
    gpu_only: bool = False

    def describe(self) -> str:
        loss = "MSE" if self.loss == "mse" else "softmax CE"
        return (f"{'-'.join(map(str, self.sizes))} {self.activation}, {loss}, "
                f"batch {self.batch}")

    def fields(self) -> dict[str, Any]:
        """What the JSON report records about the workload."""
        return {"sizes": list(self.sizes), "activation": self.activation, "loss": self.loss,
                "batch": self.batch}

    def make_data(self, dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The fixed host batch: X (batch, n_in) in `dtype`; y float (batch, 1) for MSE, int64
        class labels (batch,) for cross-entropy."""
        rng = np.random.default_rng(seed + 1)
        x = rng.standard_normal((self.batch, self.sizes[0])).astype(dtype)
        if self.loss == "mse":
            y = rng.standard_normal((self.batch, self.sizes[-1])).astype(dtype)
        else:
            y = rng.integers(0, self.sizes[-1], size=self.batch).astype(np.int64)
        return x, y

    def model(self, seed: int) -> tuple[gf.Input, gf.Input, gf.Node, list[gf.Parameter]]:
        """gpuflow's own MLP (seeded Parameters) with its loss: X, y, loss, parameters."""
        X, y = gf.Input(name="X"), gf.Input(name="y")
        out, params = gf.mlp(X, self.sizes, activation=self.activation, seed=seed)
        return X, y, self._loss(y, out), list(params.values())

    def parameters(self, seed: int) -> list[gf.Parameter]:
        """The seeded Parameters W1, b1, W2, b2, ... as gf.mlp draws them."""
        return self.model(seed)[3]

    def network(self, X: gf.Node, y: gf.Node, weights: Sequence[gf.Node]) -> gf.Node:
        """The same network and loss over given weight nodes [W1, b1, W2, b2, ...]."""
        act = {"relu": gf.ReLU, "sigmoid": gf.Sigmoid}[self.activation]
        h: gf.Node = X
        n_layers = len(self.sizes) - 1
        for i in range(n_layers):
            h = gf.Linear(h, weights[2 * i], weights[2 * i + 1])
            if i < n_layers - 1:
                h = act(h)
        return self._loss(y, h)

    def _loss(self, y: gf.Node, out: gf.Node) -> gf.Node:
        return gf.MSE(y, out) if self.loss == "mse" else gf.SoftmaxCrossEntropy(y, out)


@dataclass(frozen=True)
class ConvWorkload:
    """A convolutional network's training step, NCHW. `layers` lists ("conv", out_channels,
    kernel, padding) (stride 1, then ReLU), ("pool", 2) (2x2 max pooling, stride 2) and
    ("fc", n_out) (Linear, ReLU on all but the last; the first flattens); softmax CE."""

    name: str
    title: str
    image: tuple[int, int, int]    # (C, H, W) of one example
    layers: tuple[tuple[Any, ...], ...]
    batch: int
    gpu_only: bool = False
    activation = "relu"
    loss = "ce"

    @property
    def classes(self) -> int:
        return self.layers[-1][1]

    def describe(self) -> str:
        c, h, w = self.image
        return f"{self.title} {c}x{h}x{w}, softmax CE, batch {self.batch}"

    def fields(self) -> dict[str, Any]:
        """What the JSON report records about the workload."""
        return {"image": list(self.image), "layers": [list(spec) for spec in self.layers],
                "activation": self.activation, "loss": self.loss, "batch": self.batch}

    def plan(self) -> list[tuple[tuple[Any, ...], tuple[int, ...], tuple[int, ...]]]:
        """Each layer as (spec, input shape, output shape), shapes without the batch axis:
        (C, H, W) for images, (n,) for features."""
        shape: tuple[int, ...] = self.image
        out = []
        for spec in self.layers:
            if spec[0] == "conv":
                _, o, k, p = spec
                new: tuple[int, ...] = (o, shape[1] + 2 * p - k + 1, shape[2] + 2 * p - k + 1)
            elif spec[0] == "pool":
                new = (shape[0], shape[1] // spec[1], shape[2] // spec[1])
            else:
                new = (spec[1],)
            out.append((spec, shape, new))
            shape = new
        return out

    def parameter_shapes(self) -> list[tuple[tuple[int, ...], str, int, int]]:
        """[(shape, initialiser, fan_in, fan_out)] for W1, b1, W2, b2, ... in gpuflow's
        layouts: conv W (out, in, kh, kw), Linear W (in, out)."""
        out = []
        plan = self.plan()
        for i, (spec, shape_in, shape_out) in enumerate(plan):
            if spec[0] == "conv":
                _, o, k, _ = spec
                c = shape_in[0]
                out += [((o, c, k, k), "he", c * k * k, o * k * k), ((o,), "zeros", 1, 1)]
            elif spec[0] == "fc":
                n_in, n_out = int(np.prod(shape_in)), spec[1]
                init = "xavier" if i == len(plan) - 1 else "he"  # as gf.dense: He before ReLU
                out += [((n_in, n_out), init, n_in, n_out), ((n_out,), "zeros", 1, 1)]
        return out

    def make_data(self, dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The fixed host batch: X (batch, C, H, W) in `dtype`, int64 labels y (batch,)."""
        rng = np.random.default_rng(seed + 1)
        x = rng.standard_normal((self.batch, *self.image)).astype(dtype)
        y = rng.integers(0, self.classes, size=self.batch).astype(np.int64)
        return x, y

    def parameters(self, seed: int) -> list[gf.Parameter]:
        """The seeded Parameters W1, b1, W2, b2, ... (one host generator, drawn in order)."""
        rng = host_rng(seed)
        return [gf.Parameter(shape, init, name=f"p{i}", rng=rng, fan_in=fi, fan_out=fo)
                for i, (shape, init, fi, fo) in enumerate(self.parameter_shapes())]

    def model(self, seed: int) -> tuple[gf.Input, gf.Input, gf.Node, list[gf.Parameter]]:
        """gpuflow's own network (seeded Parameters) with its loss: X, y, loss, parameters."""
        params = self.parameters(seed)
        X, y = gf.Input(name="X"), gf.Input(name="y")
        return X, y, self.network(X, y, params), params

    def network(self, X: gf.Node, y: gf.Node, weights: Sequence[gf.Node]) -> gf.Node:
        """The network and loss over given weight nodes [W1, b1, W2, b2, ...]."""
        h: gf.Node = X
        it = iter(weights)
        plan = self.plan()
        flat = False
        for i, (spec, _, _) in enumerate(plan):
            if spec[0] == "conv":
                h = gf.ReLU(gf.Conv2D(h, next(it), next(it), padding=spec[3]))
            elif spec[0] == "pool":
                h = gf.MaxPool2D(h, spec[1])
            else:
                if not flat:
                    h, flat = gf.Flatten(h), True
                h = gf.Linear(h, next(it), next(it))
                if i < len(plan) - 1:
                    h = gf.ReLU(h)
        return gf.SoftmaxCrossEntropy(y, h)


@dataclass(frozen=True)
class GPTWorkload:
    """A GPT training step (gf.layers.gpt: token and position embeddings, `layers` pre-LayerNorm
    causal transformer blocks with an exact-GELU MLP, a final LayerNorm, a linear head) on
    integer ids (batch, context), softmax CE over every position's next id. No dropout."""

    name: str
    vocab: int
    context: int
    dim: int
    layers: int
    heads: int
    batch: int
    gpu_only: bool = False
    mlp_ratio = 4
    loss = "ce"
    miniflow = False   # the lessons' MiniFlow loop has no GPT (its weights are gpt's Parameters)

    def describe(self) -> str:
        return (f"GPT {self.layers} layers, width {self.dim}, {self.heads} heads, context "
                f"{self.context}, vocab {self.vocab}, softmax CE, batch {self.batch}")

    def fields(self) -> dict[str, Any]:
        """What the JSON report records about the workload."""
        return {"vocab": self.vocab, "context": self.context, "dim": self.dim,
                "layers": self.layers, "heads": self.heads, "mlp_ratio": self.mlp_ratio,
                "loss": self.loss, "batch": self.batch}

    def make_data(self, dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The fixed host batch: int64 ids x (batch, context) and their targets y, x shifted by
        one position (a random id last), as a language model's batch (`dtype` is unused)."""
        rng = np.random.default_rng(seed + 1)
        ids = rng.integers(0, self.vocab, size=(self.batch, self.context + 1)).astype(np.int64)
        return np.ascontiguousarray(ids[:, :-1]), np.ascontiguousarray(ids[:, 1:])

    def model(self, seed: int) -> tuple[gf.Input, gf.Input, gf.Node, list[gf.Parameter]]:
        """gf.layers.gpt (seeded) with its loss: ids, y, loss, parameters."""
        ids, y = gf.Input(name="ids"), gf.Input(name="y")
        logits, params = gf.layers.gpt(ids, self.vocab, self.context, self.dim, self.layers,
                                       self.heads, mlp_ratio=self.mlp_ratio, rng=seed)
        return ids, y, gf.SoftmaxCrossEntropy(y, logits), list(params.values())

    def parameters(self, seed: int) -> list[gf.Parameter]:
        """gf.layers.gpt's seeded Parameters, in its order (see `names`)."""
        return self.model(seed)[3]

    def names(self) -> list[str]:
        """The parameters' names, in `parameters`' order: the state_dict keys of the equal torch
        module ("tok_emb.weight", ..., "blocks.0.attn.in_proj_weight", ..., "head.bias").
        Linear weights ("*.mlp.0.weight", "*.mlp.2.weight", "head.weight") are gpuflow's
        (in, out), the transpose of torch's; every other weight is laid out as torch's."""
        out = ["tok_emb.weight", "pos_emb.weight"]
        for i in range(self.layers):
            out += [f"blocks.{i}.{key}" for key in (
                "ln1.weight", "ln1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
                "attn.out_proj.weight", "attn.out_proj.bias", "ln2.weight", "ln2.bias",
                "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")]
        return out + ["ln_f.weight", "ln_f.bias", "head.weight", "head.bias"]


AnyWorkload = Workload | ConvWorkload | GPTWorkload

WORKLOADS: dict[str, AnyWorkload] = {w.name: w for w in (
    Workload("W1", (13, 10, 1), "sigmoid", "mse", 11),
    Workload("W2", (784, 128, 10), "relu", "ce", 64),
    Workload("W3", (784, 1024, 1024, 10), "relu", "ce", 512),
    Workload("W4", (4096, 4096, 4096, 10), "relu", "ce", 4096, gpu_only=True),
    ConvWorkload("W5", "LeNet-5", (1, 28, 28),
                 (("conv", 6, 5, 2), ("pool", 2), ("conv", 16, 5, 0), ("pool", 2),
                  ("fc", 120), ("fc", 84), ("fc", 10)), 64),
    ConvWorkload("W6", "conv 32-64-128 + pool", (3, 32, 32),
                 (("conv", 32, 3, 1), ("pool", 2), ("conv", 64, 3, 1), ("pool", 2),
                  ("conv", 128, 3, 1), ("pool", 2), ("fc", 10)), 128),
    GPTWorkload("W7", vocab=96, context=64, dim=128, layers=2, heads=4, batch=32),
)}


def initial_weights(w: AnyWorkload, seed: int) -> list[np.ndarray]:
    """[W1, b1, W2, b2, ...] as float64 host arrays, drawn by gpuflow's initialisers."""
    return [np.array(p.value, dtype=np.float64) for p in w.parameters(seed)]
