"""Host-side data: the bundled digits, MNIST-style IDX files, splits and batch iteration."""

from gpuflow.data.digits import load_digits

__all__ = ["load_digits"]
