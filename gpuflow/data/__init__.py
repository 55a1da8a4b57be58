"""Host-side data: the bundled digits, MNIST-style IDX files, splits and batch iteration, and
character-level text with its sequence windows."""

from .batches import Batches, train_test_split
from .digits import load_digits
from .idx import load_mnist, read_idx
from .text import SequenceBatches, load_text

__all__ = ["Batches", "SequenceBatches", "load_digits", "load_mnist", "load_text", "read_idx",
           "train_test_split"]
