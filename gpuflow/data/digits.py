"""The bundled 8x8 handwritten digits (UCI optdigits test set, as shipped by scikit-learn)."""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from importlib import resources

import numpy as np

from ..errors import DataError

__all__ = ["load_digits", "DIGITS_SHA256"]

DIGITS_FILE = "digits.csv.gz"
DIGITS_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
N_SAMPLES = 1797
N_PIXELS = 64
N_CLASSES = 10
MAX_PIXEL = 16
# Each of the ten classes holds 174..183 images; anything far off means a damaged file.
MIN_PER_CLASS, MAX_PER_CLASS = 170, 190

_REINSTALL = "reinstall gpuflow (pip install --force-reinstall gpuflow) to restore it"


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Return the bundled digits as X float32 (1797, 64) in [0, 1] and y int64 (1797,)."""
    name = f"gpuflow/data/{DIGITS_FILE}"
    try:
        blob = resources.files("gpuflow.data").joinpath(DIGITS_FILE).read_bytes()
    except OSError as exc:
        raise DataError(f"{name}: cannot read the bundled file: {exc}.\n"
                        f"help: {_REINSTALL}.") from exc
    return parse_digits(blob, name=name, sha256=DIGITS_SHA256)


def parse_digits(
    blob: bytes, *, name: str, sha256: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Parse gzipped digits CSV bytes into (X, y), checking hash, shape, ranges and class counts."""
    if sha256 is not None:
        actual = hashlib.sha256(blob).hexdigest()
        if actual != sha256:
            raise DataError(
                f"{name}: SHA-256 is {actual}, expected {sha256} ({len(blob)} bytes read); "
                f"the bundled file is damaged or replaced.\nhelp: {_REINSTALL}."
            )
    try:
        text = gzip.decompress(blob).decode("ascii")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise DataError(
            f"{name}: cannot decompress ({len(blob)} bytes): {exc}.\nhelp: {_REINSTALL}."
        ) from exc
    try:
        table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise DataError(f"{name}: not a numeric CSV table: {exc}.\nhelp: {_REINSTALL}.") from exc
    expected_shape = (N_SAMPLES, N_PIXELS + 1)
    if table.shape != expected_shape:
        raise DataError(
            f"{name}: table has shape {table.shape}, expected {expected_shape} "
            f"({N_SAMPLES} rows of {N_PIXELS} pixels + 1 label).\nhelp: {_REINSTALL}."
        )
    if not np.array_equal(table, np.round(table)):
        raise DataError(f"{name}: expected whole numbers only, found fractions.\n"
                        f"help: {_REINSTALL}.")
    pixels, labels = table[:, :N_PIXELS], table[:, N_PIXELS]
    lo, hi = pixels.min(), pixels.max()
    if lo < 0 or hi > MAX_PIXEL:
        raise DataError(
            f"{name}: pixel values span {lo:g}..{hi:g}, expected 0..{MAX_PIXEL}.\n"
            f"help: {_REINSTALL}."
        )
    if labels.min() < 0 or labels.max() >= N_CLASSES:
        raise DataError(
            f"{name}: labels span {labels.min():g}..{labels.max():g}, "
            f"expected 0..{N_CLASSES - 1}.\nhelp: {_REINSTALL}."
        )
    y = labels.astype(np.int64)
    counts = np.bincount(y, minlength=N_CLASSES)
    if counts.min() < MIN_PER_CLASS or counts.max() > MAX_PER_CLASS:
        raise DataError(
            f"{name}: per-class counts are {counts.tolist()}, expected each within "
            f"{MIN_PER_CLASS}..{MAX_PER_CLASS}.\nhelp: {_REINSTALL}."
        )
    X = (pixels / MAX_PIXEL).astype(np.float32)
    return X, y
