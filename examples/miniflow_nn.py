"""The MiniFlow lesson's nn.py, run by gpuflow on any device.

From the line `# Load data` to the end, this file is the lesson's nn.py but for three lines
(tests/test_examples.py checks that nothing else differs):

- `data = load_boston()` is `data = boston_like()`: scikit-learn no longer ships the Boston
  housing data, so a seeded synthetic set of the same shape (506 x 13, a nonlinear target)
  stands in for it;
- `epochs = 10` is `epochs = args.epochs` (`--epochs`, default 10);
- the last print formats `float(loss/steps_per_epoch)`: the loss is a 0-d array on the
  graph's device, which NumPy, CuPy and torch format with '.3f' but array_api_strict does not.

Above that line, instead of the lesson's imports (`from miniflow import *`, scikit-learn's
`load_boston` and `resample`): `from gpuflow import *`; `--device` reaches the lesson's
`topological_sort(feed_dict)` through $GPUFLOW_DEVICE, which its `device=None` reads;
`--seed` seeds NumPy's global generator, which the lesson's `np.random.randn` and
`resample` draw from; `resample` is scikit-learn's (rows drawn with replacement), written
out; and the device in use is printed.

    python examples/miniflow_nn.py                      # NumPy on the CPU
    python examples/miniflow_nn.py --device cuda        # CuPy on the first GPU
    python examples/miniflow_nn.py --device array_api_strict:device1 --epochs 2
"""

import argparse
import os

import numpy as np

from gpuflow import *

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--device", default="cpu",
                    help="'cpu', 'cuda', 'cuda:N', 'auto', 'torch:cpu', ... (default: cpu)")
parser.add_argument("--epochs", type=int, default=10, help="passes over the data (default: 10)")
parser.add_argument("--seed", type=int, default=0,
                    help="seed of the initial weights and batch sampling (default: 0)")
args = parser.parse_args()

os.environ["GPUFLOW_DEVICE"] = args.device   # topological_sort(feed_dict) runs there
device = get_device(args.device)             # an unknown device fails here, before any work
print("Device: {} ({})".format(device.name, device.describe()))
np.random.seed(args.seed)


def resample(*arrays, n_samples):
    """sklearn.utils.resample(*arrays, n_samples=n): n rows drawn with replacement from
    NumPy's global generator (the same draws as scikit-learn's)."""
    rows = np.random.randint(0, len(arrays[0]), size=(n_samples,))
    return [a[rows] for a in arrays]


def boston_like():
    """506 examples of 13 features like Boston housing, with a nonlinear target; seeded on
    its own, so --seed changes only the weights and the batches."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(506, 13)) * rng.uniform(0.5, 20.0, size=13) + 5.0
    y = np.tanh(X @ rng.normal(size=13) / 30.0) * 10.0 + 22.0 + rng.normal(scale=1.0, size=506)
    return {'data': X, 'target': y}


# Load data
data = boston_like()
X_ = data['data']
y_ = data['target']

# Normalize data
X_ = (X_ - np.mean(X_, axis=0)) / np.std(X_, axis=0)

n_features = X_.shape[1]
n_hidden = 10
W1_ = np.random.randn(n_features, n_hidden)
b1_ = np.zeros(n_hidden)
W2_ = np.random.randn(n_hidden, 1)
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

graph = topological_sort(feed_dict)
trainables = [W1, b1, W2, b2]

print("Total number of examples = {}".format(m))

# Step 4
for i in range(epochs):
    loss = 0
    for j in range(steps_per_epoch):
        # Step 1
        # Randomly sample a batch of examples
        X_batch, y_batch = resample(X_, y_, n_samples=batch_size)

        # Reset value of X and y Inputs
        X.value = X_batch
        y.value = y_batch

        # Step 2
        forward_and_backward(graph)

        # Step 3
        sgd_update(trainables)

        loss += graph[-1].value

    print("Epoch: {}, Loss: {:.3f}".format(i+1, float(loss/steps_per_epoch)))
