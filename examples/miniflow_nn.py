"""The MiniFlow lesson's nn.py training loop, run by gpuflow on any device.

The loop is the lesson's, unchanged but for the import (`from gpuflow import *`) and two
things noted where they happen: the Boston housing data (no longer shipped by scikit-learn)
is replaced by a seeded synthetic regression set of the same size, and the epoch loss is
passed through float() before formatting.

    python examples/miniflow_nn.py                      # NumPy on the CPU
    python examples/miniflow_nn.py --device cuda        # CuPy on the first GPU
    python examples/miniflow_nn.py --device array_api_strict:device1 --epochs 2
"""

import argparse

import numpy as np

from gpuflow import *

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--device", default="cpu",
                    help="'cpu', 'cuda', 'cuda:N', 'auto', 'torch:cpu', ... (default: cpu)")
parser.add_argument("--epochs", type=int, default=10, help="passes over the data (default: 10)")
parser.add_argument("--seed", type=int, default=0,
                    help="seed of the initial weights and batch sampling (default: 0)")
args = parser.parse_args()

# Load data: 506 examples of 13 features like Boston housing, with a nonlinear target.
data_rng = np.random.default_rng(0)
X_ = data_rng.normal(size=(506, 13)) * data_rng.uniform(0.5, 20.0, size=13) + 5.0
y_ = (np.tanh(X_ @ data_rng.normal(size=13) / 30.0) * 10.0 + 22.0
      + data_rng.normal(scale=1.0, size=506))

# Normalize data
X_ = (X_ - np.mean(X_, axis=0)) / np.std(X_, axis=0)

rng = np.random.default_rng(args.seed)
n_features = X_.shape[1]
n_hidden = 10
W1_ = rng.standard_normal((n_features, n_hidden))
b1_ = np.zeros(n_hidden)
W2_ = rng.standard_normal((n_hidden, 1))
b2_ = np.zeros(1)

# Neural network
X, y = Input(), Input()
W1, b1 = Input(), Input()
W2, b2 = Input(), Input()

l1 = Linear(X, W1, b1)
s1 = Sigmoid(l1)
l2 = Linear(s1, W2, b2)
cost = MSE(y, l2)

feed_dict = {
    X: X_,
    y: y_,
    W1: W1_,
    b1: b1_,
    W2: W2_,
    b2: b2_
}

epochs = args.epochs
# Total number of examples
m = X_.shape[0]
batch_size = 11
steps_per_epoch = m // batch_size

graph = topological_sort(feed_dict, device=args.device)
trainables = [W1, b1, W2, b2]

print("Device: {} ({})".format(graph.device.name, graph.device.describe()))
print("Total number of examples = {}".format(m))

# Step 4
for i in range(epochs):
    loss = 0
    for j in range(steps_per_epoch):
        # Step 1
        # Randomly sample a batch of examples (sklearn.utils.resample draws with replacement)
        rows = rng.choice(m, size=batch_size, replace=True)
        X_batch, y_batch = X_[rows], y_[rows]

        # Reset value of X and y Inputs
        X.value = X_batch
        y.value = y_batch

        # Step 2
        forward_and_backward(graph)

        # Step 3
        sgd_update(trainables)

        loss += graph[-1].value

    # float(): the loss is a 0-d array on the graph's device; NumPy, CuPy and torch format it
    # with '.3f' directly, array_api_strict does not.
    print("Epoch: {}, Loss: {:.3f}".format(i+1, float(loss/steps_per_epoch)))
