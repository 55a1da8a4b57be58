"""Train an MLP on MNIST (or Fashion-MNIST) from IDX files or a Keras-style mnist.npz.

    python examples/mnist.py --data ~/data/mnist                  # CPU, 5 epochs
    python examples/mnist.py --data ~/data/mnist.npz --device cuda --epochs 10

--data is a folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte,
t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each optionally .gz), or an .npz with
x_train, y_train, x_test, y_test. gpuflow downloads nothing: fetch the files yourself.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gpuflow as gf
from gpuflow.data import Batches, load_mnist
from gpuflow.optim import Adam

HOW_TO_GET_IT = ("pass --data PATH: a folder with the four MNIST IDX files "
                 "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                 "t10k-labels-idx1-ubyte, optionally .gz) or a Keras-style mnist.npz")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", metavar="PATH", help="MNIST IDX folder or .npz")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.data is None:
        print(f"mnist.py: no data given; {HOW_TO_GET_IT}.", file=sys.stderr)
        return 2
    if not Path(args.data).expanduser().exists():
        print(f"mnist.py: {args.data} does not exist; {HOW_TO_GET_IT}.", file=sys.stderr)
        return 2
    try:
        X_train, y_train = load_mnist(Path(args.data).expanduser(), "train")
        X_test, y_test = load_mnist(Path(args.data).expanduser(), "test")
    except gf.DataError as exc:  # a wrong or damaged file: the message says which and why
        print(f"mnist.py: {exc}", file=sys.stderr)
        return 2
    print(f"{len(X_train)} training and {len(X_test)} test images of {X_train.shape[1]} pixels")

    X, y = gf.Input(name="X"), gf.Input(name="y")
    logits, _ = gf.mlp(X, [X_train.shape[1], args.hidden, 10], seed=args.seed)
    graph = gf.Graph(gf.SoftmaxCrossEntropy(y, logits), device=args.device, dtype=args.dtype,
                     inputs=[X, y], outputs=[logits])
    optimizer = Adam(graph, lr=args.lr)
    print(f"device {graph.device.name}: {graph.device.describe()}")

    xp = graph.device.xp
    X_test_dev = graph.device.put(X_test, graph.dtype)
    y_test_dev = graph.device.put(y_test)

    def accuracy(chunk: int = 2000) -> float:
        correct = 0
        for start in range(0, len(y_test), chunk):
            stop = min(start + chunk, len(y_test))
            predicted = xp.argmax(graph.run(logits, X_test_dev[start:stop, ...]), axis=1)
            correct = correct + xp.sum(xp.astype(predicted == y_test_dev[start:stop], xp.int64))
        return graph.item(correct) / len(y_test)

    batches = Batches(X_train, y_train, args.batch_size, seed=args.seed)
    for epoch in range(1, args.epochs + 1):
        start, total = time.perf_counter(), 0.0
        for Xb, yb in batches:
            total = total + graph.step(Xb, yb) * len(yb)
            optimizer.step()
        print(f"epoch {epoch:2d}  loss {graph.item(total) / len(y_train):.4f}  "
              f"test accuracy {accuracy():.4f}  ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
