"""IDX files (MNIST, Fashion-MNIST) read from disk, gzipped or not; nothing is ever downloaded."""

from __future__ import annotations

import gzip
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import DataError

__all__ = ["read_idx", "load_mnist", "IDX_DTYPES"]

# IDX type code -> big-endian dtype of the payload.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"
# Deflate cannot expand data more than about 1032:1; a gzip file of n bytes therefore cannot hold
# more than this many bytes per compressed byte (with slack for gzip headers).
_MAX_GZIP_RATIO = 1100
_CHUNK = 1 << 20

_REDOWNLOAD = "re-download or re-extract the file from its source"


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (plain or gzipped, detected by magic bytes) into a native-endian array."""
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            file_size = os.fstat(raw.fileno()).st_size
            is_gzip = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
            if is_gzip:
                data = _read_gzip_idx(path, raw, file_size)
            else:
                data = _read_plain_idx(path, raw, file_size)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: no such file (0 bytes found).\nhelp: check the path.") from exc
    except IsADirectoryError as exc:
        raise DataError(f"{path}: is a folder, expected an IDX file.\n"
                        "help: pass the file.") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}.\n"
                        "help: check the path and permissions.") from exc
    dtype, dims, payload = data
    try:
        array = np.frombuffer(payload, dtype=dtype).reshape(dims)
    except ValueError as exc:  # more dims than NumPy supports, or a size it cannot index
        raise DataError(f"{path}: header dims {dims} cannot make a NumPy array ({exc}); "
                        f"the file is not an IDX file or is damaged.\n"
                        f"help: {_REDOWNLOAD}.") from exc
    # The payload is a private writable bytearray, so single-byte types need no copy.
    return array.astype(dtype.newbyteorder("="), copy=False)


def _parse_header(path: Path, head: bytes) -> tuple[np.dtype, int]:
    """Check the 4-byte IDX magic and return (payload dtype, ndim)."""
    if len(head) < 4:
        raise DataError(
            f"{path}: {len(head)} bytes, expected at least 4 for the IDX magic number; "
            f"the file is truncated or not IDX.\nhelp: {_REDOWNLOAD}."
        )
    if head[0] != 0 or head[1] != 0 or head[2] not in IDX_DTYPES or head[3] < 1:
        codes = ", ".join(f"0x{code:02X}" for code in IDX_DTYPES)
        raise DataError(
            f"{path}: bad IDX magic {head[:4].hex(' ')}; expected 00 00 <type> <ndim> with "
            f"type in {{{codes}}} and ndim >= 1 (got type 0x{head[2]:02X}, ndim {head[3]}); "
            f"the file is not an IDX file or is damaged.\nhelp: {_REDOWNLOAD}."
        )
    return IDX_DTYPES[head[2]], head[3]


def _parse_dims(path: Path, blob: bytes, ndim: int) -> tuple[int, ...]:
    """Decode ndim big-endian uint32 dimensions from blob."""
    need = 4 * ndim
    if len(blob) < need:
        raise DataError(
            f"{path}: header declares {ndim} dims needing {need} bytes, only {len(blob)} follow "
            f"the magic; the file is truncated.\nhelp: {_REDOWNLOAD}."
        )
    return tuple(int(d) for d in np.frombuffer(blob[:need], dtype=">u4"))


def _payload_mismatch(path: Path, dims: tuple[int, ...], dtype: np.dtype, expected: int,
                      actual: str) -> DataError:
    """Build the error for a payload whose length does not match the header."""
    return DataError(
        f"{path}: header dims {dims} of {dtype.name} need exactly {expected} payload bytes, "
        f"found {actual}; the file is truncated, has trailing bytes or a wrong header.\n"
        f"help: {_REDOWNLOAD}."
    )


def _read_plain_idx(
    path: Path, raw: BinaryIO, file_size: int
) -> tuple[np.dtype, tuple[int, ...], bytearray]:
    """Read an uncompressed IDX file, checking sizes against the file size before allocating."""
    dtype, ndim = _parse_header(path, raw.read(4))
    dims = _parse_dims(path, raw.read(4 * ndim), ndim)
    expected = math.prod(dims) * dtype.itemsize
    actual = file_size - 4 - 4 * ndim
    if actual != expected:
        raise _payload_mismatch(path, dims, dtype, expected, f"{actual}")
    payload = bytearray(expected)
    got = raw.readinto(payload)
    if got != expected:  # the file shrank while we read it
        raise _payload_mismatch(path, dims, dtype, expected, f"{got}")
    return dtype, dims, payload


def _read_gzip_idx(
    path: Path, raw: BinaryIO, file_size: int
) -> tuple[np.dtype, tuple[int, ...], bytearray]:
    """Read a gzipped IDX file in bounded chunks, never past what the header promises."""
    try:
        with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            dtype, ndim = _parse_header(path, gz.read(4))
            dims = _parse_dims(path, gz.read(4 * ndim), ndim)
            expected = math.prod(dims) * dtype.itemsize
            ceiling = _MAX_GZIP_RATIO * file_size
            if expected > ceiling:
                raise _payload_mismatch(
                    path, dims, dtype, expected,
                    f"a {file_size}-byte gzip file, which cannot hold more than {ceiling}",
                )
            payload = bytearray()
            while len(payload) < expected:
                chunk = gz.read(min(_CHUNK, expected - len(payload)))
                if not chunk:
                    break
                payload += chunk
            if len(payload) < expected:
                raise _payload_mismatch(path, dims, dtype, expected, f"{len(payload)}")
            extra = len(gz.read(_CHUNK))  # also reaches the end of stream, checking the CRC
            if extra:
                more = "" if extra < _CHUNK else " or more"
                raise _payload_mismatch(path, dims, dtype, expected, f"{expected + extra}{more}")
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"{path}: corrupt gzip data ({file_size} bytes on disk): {exc}.\nhelp: {_REDOWNLOAD}."
        ) from exc
    return dtype, dims, payload


MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
NPZ_KEYS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}


def load_mnist(path: str | os.PathLike[str], split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load MNIST-layout data from a folder of IDX files or a Keras-style .npz, as (X, y)."""
    if split not in MNIST_FILES:
        raise DataError(
            f"{path}: split is {split!r}, expected one of {sorted(MNIST_FILES)}.\n"
            f"help: pass split='train' or split='test'."
        )
    path = Path(path)
    if path.is_dir():
        image_file, label_file = (_find_idx(path, stem) for stem in MNIST_FILES[split])
        images, labels = read_idx(image_file), read_idx(label_file)
        names = (image_file, label_file)
    elif path.is_file():
        images, labels = _read_npz(path, *NPZ_KEYS[split])
        names = tuple(f"{path}[{key}]" for key in NPZ_KEYS[split])
    else:
        raise DataError(
            f"{path}: not found (0 files).\nhelp: pass a folder holding "
            f"{', '.join(MNIST_FILES[split])} (optionally .gz) or a Keras-style mnist.npz file."
        )
    return _to_xy(images, labels, *names)


def _find_idx(folder: Path, stem: str) -> Path:
    """Return folder/stem or folder/stem.gz, whichever exists first."""
    candidates = [folder / stem, folder / f"{stem}.gz"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(c.name for c in candidates)
    raise DataError(
        f"{folder}: 0 of {len(candidates)} candidate files found (looked for {looked}).\n"
        f"help: put the MNIST/Fashion-MNIST IDX files in this folder."
    )


def _read_npz(path: Path, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read two arrays from an .npz archive without pickle, turning every failure into DataError."""
    if not zipfile.is_zipfile(path):
        raise DataError(
            f"{path}: not a valid .npz (zip) archive ({path.stat().st_size} bytes).\nhelp: pass a "
            f"folder of IDX files or an .npz with keys {', '.join(sum(NPZ_KEYS.values(), ()))}."
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in (x_key, y_key) if key not in archive.files]
            if missing:
                raise DataError(
                    f"{path}: missing keys {missing} ({len(archive.files)} keys present: "
                    f"{sorted(archive.files)}).\n"
                    f"help: save the archive with keys {x_key} and {y_key}."
                )
            return archive[x_key], archive[y_key]
    except DataError:
        raise
    # zipfile raises NotImplementedError for unknown compression or zip versions and
    # RuntimeError for encrypted members; NumPy allocates the array a header declares before
    # it reads it, so a forged shape can be a MemoryError
    except (OSError, EOFError, ValueError, KeyError, NotImplementedError, RuntimeError,
            MemoryError, zlib.error, zipfile.BadZipFile) as exc:
        raise DataError(
            f"{path}: cannot read arrays {x_key}, {y_key}: {exc}; the archive is damaged or "
            f"holds object arrays (pickle is not allowed).\nhelp: re-create it with numpy.savez."
        ) from exc


def _to_xy(
    images: np.ndarray, labels: np.ndarray, image_name: object, label_name: object
) -> tuple[np.ndarray, np.ndarray]:
    """Validate images (n, rows, cols) uint8 and labels (n,) and convert to float32 X, int64 y."""
    if images.ndim != 3:
        raise DataError(
            f"{image_name}: images have {images.ndim} dims {images.shape}, expected 3 "
            f"(count, rows, cols).\nhelp: pass the images file, not the labels file."
        )
    if images.dtype != np.uint8:
        raise DataError(
            f"{image_name}: images have dtype {images.dtype}, expected uint8 (0..255 pixels).\n"
            f"help: pass the original MNIST-style images."
        )
    if labels.ndim != 1:
        raise DataError(
            f"{label_name}: labels have {labels.ndim} dims {labels.shape}, expected 1 (count,).\n"
            f"help: pass the labels file, not the images file."
        )
    if labels.dtype.kind not in "iu":
        raise DataError(
            f"{label_name}: labels have dtype {labels.dtype}, expected an integer type.\n"
            f"help: pass integer class labels."
        )
    if len(images) != len(labels):
        raise DataError(
            f"{image_name} holds {len(images)} images but {label_name} holds {len(labels)} "
            f"labels; expected equal counts.\nhelp: pass files of the same split."
        )
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise DataError(
            f"{label_name}: label values span {labels.min()}..{labels.max()}, expected 0..255; "
            f"the labels file is damaged.\nhelp: re-download it."
        )
    X = images.reshape(len(images), -1).astype(np.float32)
    X /= np.float32(255)
    return X, labels.astype(np.int64)
