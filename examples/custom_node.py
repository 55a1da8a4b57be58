"""Write your own node, MiniFlow style, and check its gradient by finite differences.

    python examples/custom_node.py                       # CPU
    python examples/custom_node.py --device array_api_strict:device1 --steps 50

`LeakyReLU` below uses only `self.xp`, the array namespace of the graph's device, so the
same class runs on NumPy, CuPy, PyTorch or array_api_strict. It is trained in a small
classifier on the bundled digits; then `gf.gradient_check` compares its backward pass (and the
whole graph's) with central differences (f(w + h) - f(w - h)) / 2h in float64.
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

    # Check LeakyReLU's backward (and everything below it) in float64 on the same device:
    # gf.gradient_check builds the graph again in float64 and compares each parameter's
    # gradient with central differences on a few entries (the border pixels of the digits
    # are always 0, so many entries of W1 have a zero gradient either way).
    print("finite-difference check (float64, 16 digits):")
    report = gf.gradient_check(graph, X_all[:16], y_all[:16], samples=20, seed=args.seed,
                               raise_on_failure=False)
    print(report)
    # ... and LeakyReLU alone, on inputs away from its kink at 0.
    x = gf.Input(name="x")
    rng = np.random.default_rng(args.seed)
    x0 = rng.uniform(0.1, 2.0, size=(4, 5)) * rng.choice([-1.0, 1.0], size=(4, 5))
    alone = gf.gradient_check(LeakyReLU(x, alpha=0.1), {x: x0}, device=args.device,
                              raise_on_failure=False)
    print(alone)
    ok = report.ok and alone.ok
    print(f"max relative error {max(r.max_rel_error for r in report.inputs + alone.inputs):.1e}"
          f": {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
