"""Host-side data: the bundled digits, MNIST-style IDX files, splits and batch iteration."""

from .batches import Batches, train_test_split
from .digits import load_digits
from .idx import load_mnist, read_idx

__all__ = ["Batches", "load_digits", "load_mnist", "read_idx", "train_test_split"]
