"""Host-side data: the bundled digits, MNIST-style IDX files, splits and batch iteration."""

from gpuflow.data.batches import Batches, Device, train_test_split
from gpuflow.data.digits import load_digits
from gpuflow.data.idx import load_mnist, read_idx

__all__ = ["Batches", "Device", "load_digits", "load_mnist", "read_idx", "train_test_split"]
