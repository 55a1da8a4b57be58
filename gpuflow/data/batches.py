"""Seeded train/test splitting and epoch-wise mini-batch iteration over host (NumPy) arrays."""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from gpuflow.errors import DataError

__all__ = ["Batches", "train_test_split", "Device"]


class Device(Protocol):
    """Anything that copies a host array onto an accelerator: the one method Batches needs."""

    def put(self, host_array: np.ndarray, dtype: Any = None) -> Any:
        """Return a device array holding host_array, cast to dtype when given."""


def _check_pair(X: np.ndarray, y: np.ndarray, where: str) -> None:
    """Require X and y to be non-empty arrays with the same number of samples."""
    if X.ndim == 0 or y.ndim == 0:
        raise DataError(
            f"{where}: X has shape {X.shape} and y has shape {y.shape}, expected at least 1 dim "
            f"each (samples first); pass arrays, not scalars"
        )
    if len(X) != len(y):
        raise DataError(
            f"{where}: X holds {len(X)} samples but y holds {len(y)}; expected equal counts; "
            f"pass matching X and y"
        )
    if len(X) == 0:
        raise DataError(f"{where}: X holds 0 samples, expected at least 1; pass non-empty data")


def _check_seed(value: object, name: str, where: str) -> int:
    """Return value as a non-negative int or raise DataError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise DataError(f"{where}: {name} is {value!r}, expected an int >= 0; pass e.g. {name}=0")
    return int(value)


def train_test_split(
    X: np.ndarray, y: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split (X, y) by a seeded permutation into (X_train, y_train, X_test, y_test)."""
    where = "train_test_split"
    X, y = np.asarray(X), np.asarray(y)
    _check_pair(X, y, where)
    seed = _check_seed(seed, "seed", where)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not (
        0.0 < float(test_fraction) < 1.0
    ):
        raise DataError(
            f"{where}: test_fraction is {test_fraction!r}, expected a number with "
            f"0 < test_fraction < 1; pass e.g. test_fraction=0.2"
        )
    n = len(X)
    n_test = int(round(n * float(test_fraction)))
    if not 0 < n_test < n:
        raise DataError(
            f"{where}: {n} samples with test_fraction={test_fraction} give {n_test} test and "
            f"{n - n_test} train samples, expected at least 1 of each; use more data or "
            f"another fraction"
        )
    order = np.random.default_rng(seed).permutation(n)
    test, train = order[:n_test], order[n_test:]
    return (
        np.take(X, train, axis=0),
        np.take(y, train, axis=0),
        np.take(X, test, axis=0),
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
        device: Device | None = None,
        dtype: Any = None,
    ) -> None:
        """Check the arrays and options; iteration starts at epoch 0."""
        where = "Batches"
        X, y = np.asarray(X), np.asarray(y)
        _check_pair(X, y, where)
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, numbers.Integral)
            or batch_size < 1
        ):
            raise DataError(
                f"{where}: batch_size is {batch_size!r}, expected an int >= 1; "
                f"pass e.g. batch_size=32"
            )
        if drop_last and batch_size > len(X):
            raise DataError(
                f"{where}: drop_last with batch_size={batch_size} > {len(X)} samples would give "
                f"0 batches per epoch, expected at least 1; lower batch_size or drop_last=False"
            )
        if device is not None and not callable(getattr(device, "put", None)):
            raise DataError(
                f"{where}: device {device!r} has no put(host_array, dtype=None) method "
                f"(0 of 1 required methods); pass a gpuflow device or device=None"
            )
        self.X, self.y = X, y
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = _check_seed(seed, "seed", where)
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
        epoch = self.epoch if epoch is None else _check_seed(epoch, "epoch", "Batches.order")
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
                f"{sorted(state)}); pass the dict returned by Batches.state_dict()"
            )
        values = {}
        for key in ("epoch", "seed"):
            value = state[key]
            if isinstance(value, np.ndarray) and value.shape == ():
                value = value.item()  # plain ints come back as 0-d arrays from .npz checkpoints
            values[key] = _check_seed(value, key, where)
        self.epoch, self.seed = values["epoch"], values["seed"]
