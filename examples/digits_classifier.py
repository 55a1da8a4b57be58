"""Train a small MLP classifier on the bundled 8x8 digits with gpuflow's Graph API.

    python examples/digits_classifier.py                   # CPU, 20 epochs
    python examples/digits_classifier.py --device cuda     # or torch:cpu, array_api_strict, ...

The same model as `gpuflow train`, written out: build the graph once, bind it to a device,
then step / update / read the loss once per epoch.
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
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # 1. Data on the host: 1797 images of 64 pixels in [0, 1], labels 0..9.
    X, y = load_digits()
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, seed=args.seed)

    # 2. The graph: X -> 64-128-10 MLP (ReLU) -> logits -> softmax cross-entropy with y.
    X_in, y_in = gf.Input(name="X"), gf.Input(name="y")
    logits, params = gf.mlp(X_in, [64, 128, 10], seed=args.seed)
    loss = gf.SoftmaxCrossEntropy(y_in, logits, name="loss")
    graph = gf.Graph(loss, device=args.device, dtype=args.dtype, inputs=[X_in, y_in],
                     outputs=[logits])
    optimizer = Adam(graph, lr=args.lr)
    print(f"device {graph.device.name}: {graph.device.describe()}; "
          f"{sum(math.prod(p.value.shape) for p in params.values())} parameters")

    # 3. The held-out set lives on the device; accuracy is counted there, read as one number.
    xp = graph.device.xp
    X_test_dev = graph.device.put(X_test, graph.dtype)
    y_test_dev = graph.device.put(y_test)

    def accuracy() -> float:
        predicted = xp.argmax(graph.run(logits, X_test_dev), axis=1)
        return graph.item(xp.sum(xp.astype(predicted == y_test_dev, xp.int64))) / len(y_test)

    # 4. Training: Batches reshuffles per (seed, epoch); graph.step feeds one batch, runs
    #    forward and backward, and returns the loss as a device scalar (no sync).
    batches = Batches(X_train, y_train, args.batch_size, seed=args.seed)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        total = 0.0
        for Xb, yb in batches:
            total = total + graph.step(Xb, yb) * len(yb)
            optimizer.step()
        mean_loss = graph.item(total) / batches.num_samples  # one read per epoch
        print(f"epoch {epoch:3d}  loss {mean_loss:.4f}  test accuracy {accuracy():.4f}")
    print(f"final test accuracy {accuracy():.4f} in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
