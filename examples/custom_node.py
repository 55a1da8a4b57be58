"""Write your own node, MiniFlow style, and check its gradient by finite differences.

    python examples/custom_node.py                       # CPU
    python examples/custom_node.py --device array_api_strict:device1 --steps 50

`LeakyReLU` below uses only `self.xp`, the array namespace of the graph's device, so the
same class runs on NumPy, CuPy, PyTorch or array_api_strict. It is trained in a small
classifier on the bundled digits; then its backward pass is compared with central
differences (f(w + h) - f(w - h)) / 2h in float64.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import gpuflow as gf
from gpuflow.data import Batches, load_digits
from gpuflow.optim import Adam


class LeakyReLU(gf.Node):
    """x if x > 0 else alpha * x."""

    def __init__(self, node: gf.Node, alpha: float = 0.1, *, name: str | None = None):
        gf.Node.__init__(self, [node], name=name)
        self.alpha = alpha

    def forward(self) -> None:
        x = self.inbound_nodes[0].value
        self.positive = x > 0.0  # all that backward needs
        self.value = self.xp.where(self.positive, x, self.alpha * x)

    def backward(self) -> None:
        G = self.upstream_gradient()  # summed over every outbound node
        self.gradients[self.inbound_nodes[0]] = self.xp.where(self.positive, G, self.alpha * G)


def build(seed: int) -> tuple[gf.Node, gf.Node, gf.Node, list[gf.Parameter]]:
    """X -> Linear(64, 32) -> LeakyReLU -> Linear(32, 10) -> softmax cross-entropy with y."""
    rng = np.random.default_rng(seed)
    X, y = gf.Input(name="X"), gf.Input(name="y")
    W1 = gf.Parameter((64, 32), "he", name="W1", rng=rng)
    b1 = gf.Parameter((32,), "zeros", name="b1", rng=rng)
    W2 = gf.Parameter((32, 10), "xavier", name="W2", rng=rng)
    b2 = gf.Parameter((10,), "zeros", name="b2", rng=rng)
    hidden = LeakyReLU(gf.Linear(X, W1, b1), alpha=0.1, name="leaky")
    loss = gf.SoftmaxCrossEntropy(y, gf.Linear(hidden, W2, b2), name="loss")
    return X, y, loss, [W1, b1, W2, b2]


def gradient_check(graph: gf.Graph, params: list[gf.Parameter], Xb, yb, *, h: float = 1e-6,
                   per_param: int = 5, seed: int = 0) -> float:
    """Max relative error between backward and central differences on a few entries each."""
    rng = np.random.default_rng(seed)
    device = graph.device
    graph.step(Xb, yb)
    worst = 0.0
    for p in params:
        analytic = device.to_host(p.gradients[p])
        base = device.to_host(p.value).copy()
        # Entries with a non-zero gradient (border pixels of the digits are always 0, so some
        # rows of W1 get none); a few of those, chosen at random.
        live = np.flatnonzero(np.abs(analytic) > 1e-6)
        for flat in rng.choice(live, size=min(per_param, live.size), replace=False):
            idx = tuple(int(i) for i in np.unravel_index(flat, base.shape))
            losses = []
            for sign in (+1, -1):
                probe = base.copy()
                probe[idx] += sign * h
                p.value = probe  # a host array: moved to the graph's device
                losses.append(graph.item(graph.run(None, Xb, yb)))
            numeric = (losses[0] - losses[1]) / (2 * h)
            # relative error, with a floor so that tiny gradients are compared absolutely
            error = abs(numeric - analytic[idx]) / max(1e-3, abs(numeric) + abs(analytic[idx]))
            worst = max(worst, error)
            print(f"  {p.name}{list(idx)}: backward {analytic[idx]: .8e}  "
                  f"finite difference {numeric: .8e}  rel. error {error:.1e}")
        p.value = base
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=200, help="training steps (batches of 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    X_all, y_all = load_digits()
    X, y, loss, params = build(args.seed)

    # Train in float32 for a few steps.
    graph = gf.Graph(loss, device=args.device, dtype="float32", inputs=[X, y])
    optimizer = Adam(graph, lr=3e-3)
    steps = 0
    batches = Batches(X_all, y_all, 64, seed=args.seed)
    first = last = None
    while steps < args.steps:
        for Xb, yb in batches:
            value = graph.step(Xb, yb)
            optimizer.step()
            first = graph.item(value) if first is None else first
            steps += 1
            if steps == args.steps:
                break
    last = graph.item(graph.run(None, X_all, y_all))
    print(f"{graph.device.name}: loss on the first batch {first:.4f}, "
          f"on all digits after {steps} steps {last:.4f}")

    # Check LeakyReLU's backward (and everything below it) in float64 on the same device.
    X, y, loss, params = build(args.seed)
    check = gf.Graph(loss, device=args.device, dtype="float64", inputs=[X, y])
    print("finite-difference check (float64, 16 digits):")
    worst = gradient_check(check, params, X_all[:16], y_all[:16], seed=args.seed)
    ok = worst < 1e-5
    print(f"max relative error {worst:.1e}: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
