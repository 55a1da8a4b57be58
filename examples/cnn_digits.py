"""Train a small LeNet-style CNN on the bundled 8x8 digits (as 1x8x8 images) with gpuflow.

    python examples/cnn_digits.py                    # CPU, 20 epochs
    python examples/cnn_digits.py --device torch:cpu # or cuda, array_api_strict, ...

The layers are written out: conv 3x3 (16) - ReLU - max-pool 2 - conv 3x3 (32) - ReLU -
max-pool 2 - flatten - dense 64 - ReLU - dropout - dense 10. Training steps run in training
mode (dropout on); `graph.run` evaluates in evaluation mode (dropout off).
"""

from __future__ import annotations

import argparse
import math
import time

import gpuflow as gf
from gpuflow.data import Batches, load_digits, train_test_split
from gpuflow.optim import Adam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'auto', 'torch:cpu', ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--dropout", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # 1. Data on the host: 1797 images of 8x8 pixels in [0, 1], as (N, 1, 8, 8); labels 0..9.
    X, y = load_digits()
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, seed=args.seed)
    X_train, X_test = X_train.reshape(-1, 1, 8, 8), X_test.reshape(-1, 1, 8, 8)

    # 2. The graph, layer by layer; one host generator draws every initial weight.
    rng = gf.layers.host_rng(args.seed)
    X_in, y_in = gf.Input(name="X"), gf.Input(name="y")
    h, _ = gf.conv2d(X_in, 1, 16, 3, padding=1, name="conv1", rng=rng, activation="relu")
    h = gf.MaxPool2D(h, 2)                                             # (N, 16, 4, 4)
    h, _ = gf.conv2d(h, 16, 32, 3, padding=1, name="conv2", rng=rng, activation="relu")
    h = gf.Flatten(gf.MaxPool2D(h, 2))                                 # (N, 32 * 2 * 2)
    h, _ = gf.dense(h, 128, 64, name="fc1", rng=rng, activation="relu")
    h = gf.Dropout(h, args.dropout, seed=args.seed)
    logits, _ = gf.dense(h, 64, 10, name="fc2", rng=rng)
    loss = gf.SoftmaxCrossEntropy(y_in, logits, name="loss")
    graph = gf.Graph(loss, device=args.device, dtype=args.dtype, inputs=[X_in, y_in],
                     outputs=[logits])
    optimizer = Adam(graph, lr=args.lr)
    print(f"device {graph.device.name}: {graph.device.describe()}; "
          f"{sum(math.prod(p.value.shape) for p in graph.parameters)} parameters")

    # 3. The held-out set lives on the device; accuracy is counted there, read as one number.
    xp = graph.device.xp
    X_test_dev = graph.device.put(X_test, graph.dtype)
    y_test_dev = graph.device.put(y_test)

    def accuracy() -> float:
        predicted = xp.argmax(graph.run(logits, X_test_dev), axis=1)  # evaluation mode
        return graph.item(xp.sum(xp.astype(predicted == y_test_dev, xp.int64))) / len(y_test)

    # 4. Training (training mode: dropout on); the loss is read once per epoch.
    batches = Batches(X_train, y_train, args.batch_size, seed=args.seed)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        total = 0.0
        for Xb, yb in batches:
            total = total + graph.step(Xb, yb) * len(yb)
            optimizer.step()
        mean_loss = graph.item(total) / batches.num_samples
        print(f"epoch {epoch:3d}  loss {mean_loss:.4f}  test accuracy {accuracy():.4f}")
    print(f"final test accuracy {accuracy():.4f} in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
