"""Seeded train/test splitting and epoch-wise mini-batch iteration over host (NumPy) arrays."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import DataError, check_int

__all__ = ["Batches", "train_test_split"]

_UNSET: Any = object()


def _check_pair(X: np.ndarray, y: np.ndarray, where: str) -> None:
    """Require X and y to be non-empty arrays with the same number of samples."""
    if X.ndim == 0 or y.ndim == 0:
        raise DataError(
            f"{where}: X has shape {X.shape} and y has shape {y.shape}, expected at least 1 dim "
            f"each (samples first).\nhelp: pass arrays, not scalars."
        )
    if len(X) != len(y):
        raise DataError(
            f"{where}: X holds {len(X)} samples but y holds {len(y)}; expected equal counts.\n"
            f"help: pass matching X and y."
        )
    if len(X) == 0:
        raise DataError(f"{where}: X holds 0 samples, expected at least 1.\n"
                        "help: pass non-empty data.")


def _test_count(test_size: Any, n: int, where: str) -> int:
    """The number of test samples for scikit-learn's `test_size`: a fraction in (0, 1), rounded
    up as scikit-learn does, or a count in [1, n - 1]."""
    if isinstance(test_size, numbers.Integral) and not isinstance(test_size, bool):
        n_test = int(test_size)
    elif (isinstance(test_size, numbers.Real) and not isinstance(test_size, bool)
          and 0.0 < float(test_size) < 1.0):
        n_test = math.ceil(float(test_size) * n)
    else:
        raise DataError(
            f"{where}: test_size is {test_size!r}, expected a fraction with 0 < test_size < 1 "
            f"or a number of samples.\nhelp: pass e.g. test_size=0.25 or test_size=100."
        )
    if not 0 < n_test < n:
        raise DataError(
            f"{where}: {n} samples with test_size={test_size!r} give {n_test} test and "
            f"{n - n_test} train samples, expected at least 1 of each.\nhelp: use more data or "
            f"another test_size."
        )
    return n_test


def train_test_split(
    X: np.ndarray, y: np.ndarray, *, test_size: float | int = 0.25, seed: int = 0,
    test_fraction: Any = _UNSET,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split (X, y) by a seeded permutation, as scikit-learn's train_test_split does.

    X: (n, ...) and y: (n, ...) host arrays, rows paired. test_size: a fraction in (0, 1)
    (rounded up to whole samples) or a number of test samples; 0.25 by default, as in
    scikit-learn. seed: the permutation's seed (scikit-learn's random_state).
    Returns (X_train, X_test, y_train, y_test), scikit-learn's order.
    """
    where = "train_test_split"
    if test_fraction is not _UNSET:  # the old name, whose return order was different
        raise DataError(
            f"{where}: test_fraction was renamed test_size, and the result is now "
            f"(X_train, X_test, y_train, y_test), scikit-learn's order (it was X_train, "
            f"y_train, X_test, y_test).\nhelp: pass test_size={test_fraction!r} and unpack "
            f"X_train, X_test, y_train, y_test = train_test_split(...)."
        )
    X, y = np.asarray(X), np.asarray(y)
    _check_pair(X, y, where)
    seed = check_int(seed, "seed", 0, where=where, error=DataError)
    n = len(X)
    n_test = _test_count(test_size, n, where)
    order = np.random.default_rng(seed).permutation(n)
    test, train = order[:n_test], order[n_test:]
    return (
        np.take(X, train, axis=0),
        np.take(X, test, axis=0),
        np.take(y, train, axis=0),
        np.take(y, test, axis=0),
    )


class Batches:
    """Mini-batches of (X, y) per epoch: seeded per (seed, epoch), optionally put on a device."""

    def __init__(
        self,
        X: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        """Check the arrays and options; iteration starts at epoch 0.

        X: (n, ...) and y: (n, ...) host arrays. device: None (batches stay NumPy arrays) or
        anything with `put(host_array, dtype=None)`, e.g. a gpuflow Device; dtype: X's dtype
        on the way (y keeps its own).
        """
        where = "Batches"
        X, y = np.asarray(X), np.asarray(y)
        _check_pair(X, y, where)
        batch_size = check_int(batch_size, "batch_size", 1, where=where, error=DataError)
        if drop_last and batch_size > len(X):
            raise DataError(
                f"{where}: drop_last with batch_size={batch_size} > {len(X)} samples would give "
                f"0 batches per epoch, expected at least 1.\nhelp: lower batch_size or pass "
                f"drop_last=False."
            )
        if device is not None and not callable(getattr(device, "put", None)):
            raise DataError(
                f"{where}: device {device!r} has no put(host_array, dtype=None) method "
                f"(0 of 1 required methods).\nhelp: pass a gpuflow Device or device=None."
            )
        self.X, self.y = X, y
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = check_int(seed, "seed", 0, where=where, error=DataError)
        self.drop_last = bool(drop_last)
        self.device = device
        self.dtype = dtype
        self.epoch = 0

    @property
    def num_samples(self) -> int:
        """Number of samples in X (and y)."""
        return len(self.X)

    def __len__(self) -> int:
        """Number of batches per epoch."""
        full, rest = divmod(self.num_samples, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def order(self, epoch: int | None = None) -> np.ndarray:
        """Sample indices for epoch (default: the current one), a function of (seed, epoch) only."""
        if epoch is None:
            epoch = self.epoch
        else:
            epoch = check_int(epoch, "epoch", 0, where="Batches.order", error=DataError)
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        """Yield this epoch's (Xb, yb) batches; once all are consumed, epoch advances by one."""
        return self._run(self.order())

    def _run(self, order: np.ndarray) -> Iterator[tuple[Any, Any]]:
        """Generator behind __iter__, with the epoch's order fixed when iteration began."""
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size]
            Xb = np.take(self.X, idx, axis=0)
            yb = np.take(self.y, idx, axis=0)
            if self.device is not None:
                yield self.device.put(Xb, self.dtype), self.device.put(yb)
            elif self.dtype is not None:
                yield Xb.astype(self.dtype, copy=False), yb
            else:
                yield Xb, yb
        self.epoch += 1

    def state_dict(self) -> dict[str, int]:
        """Return {'epoch', 'seed'}, enough to resume the same batch order."""
        return {"epoch": int(self.epoch), "seed": int(self.seed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore epoch and seed from a state_dict(), e.g. read back from a checkpoint."""
        where = "Batches.load_state_dict"
        missing = [key for key in ("epoch", "seed") if key not in state]
        if missing:
            raise DataError(
                f"{where}: state is missing keys {missing} ({len(state)} keys present: "
                f"{sorted(state)}).\nhelp: pass the dict returned by Batches.state_dict()."
            )
        values = {}
        for key in ("epoch", "seed"):
            value = state[key]
            if isinstance(value, np.ndarray) and value.shape == ():
                value = value.item()  # plain ints come back as 0-d arrays from .npz checkpoints
            values[key] = check_int(value, key, 0, where=where, error=DataError)
        self.epoch, self.seed = values["epoch"], values["seed"]
