"""Tests for gpuflow.data: bundled digits, IDX/MNIST loading, splitting and Batches; text and
SequenceBatches."""

from __future__ import annotations

import ast
import gzip
import hashlib
import math
import random
import struct
import time
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from gpuflow.data import (Batches, SequenceBatches, load_digits, load_mnist, load_text, read_idx,
                          train_test_split)
from gpuflow.data.digits import DIGITS_SHA256, parse_digits
from gpuflow.errors import DataError

TYPE_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C,
              np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode array as an IDX file: 00 00 type ndim, big-endian uint32 dims, big-endian data."""
    code = TYPE_CODES[array.dtype.type]
    head = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write array to path as IDX, gzipped when gz."""
    blob = idx_bytes(array)
    path.write_bytes(gzip.compress(blob) if gz else blob)
    return path


def synthetic_mnist(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return n random 28x28 uint8 images and uint8 labels 0..9."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, size=n, dtype=np.uint8))


# --- bundled digits -------------------------------------------------------------------------


def test_digits_shapes_dtypes_ranges():
    X, y = load_digits()
    assert X.shape == (1797, 64) and X.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert X.min() == 0.0 and X.max() == 1.0
    # Pixels were 0..16 integers, so X * 16 must be whole numbers.
    np.testing.assert_array_equal(X * 16, np.round(X * 16))


def test_digits_class_counts_and_known_values():
    X, y = load_digits()
    # Class counts of scikit-learn's load_digits().target.
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # The first image is a 0 whose raw pixels (0..16) sum to 294; all raw pixels sum to 561718.
    assert y[0] == 0 and y[1] == 1
    assert round(float(X[0].astype(np.float64).sum() * 16)) == 294
    assert round(float(X.astype(np.float64).sum() * 16)) == 561718
    assert (X[0].reshape(8, 8)[0] * 16).tolist() == [0, 0, 5, 13, 9, 1, 0, 0]


def test_digits_file_hash_matches_constant():
    blob = resources.files("gpuflow.data").joinpath("digits.csv.gz").read_bytes()
    assert hashlib.sha256(blob).hexdigest() == DIGITS_SHA256


def _bundled_lines() -> list[str]:
    blob = resources.files("gpuflow.data").joinpath("digits.csv.gz").read_bytes()
    return gzip.decompress(blob).decode().splitlines()


def test_digits_damaged_file_hash_error():
    blob = bytearray(resources.files("gpuflow.data").joinpath("digits.csv.gz").read_bytes())
    blob[100] ^= 0xFF
    with pytest.raises(DataError, match=r"digits\.csv\.gz: SHA-256 is [0-9a-f]{64}, expected"):
        parse_digits(bytes(blob), name="digits.csv.gz", sha256=DIGITS_SHA256)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda lines: lines[:-1], r"shape \(1796, 65\), expected \(1797, 65\)"),
        (lambda lines: [lines[0].replace("0,0,5", "0,0,17", 1)] + lines[1:],
         r"pixel values span 0\.\.17, expected 0\.\.16"),
        (lambda lines: [lines[0][:-1] + "12"] + lines[1:], r"labels span 0\.\.12, expected 0\.\.9"),
        (lambda lines: [ln[:-1] + "0" for ln in lines[:300]] + lines[300:],
         r"per-class counts are \[\d+, .*\], expected each within 170\.\.190"),
        (lambda lines: ["a,b"] + lines[1:], r"not a numeric CSV table"),
    ],
)
def test_digits_structural_damage_errors(mutate, pattern):
    blob = gzip.compress("\n".join(mutate(_bundled_lines())).encode())
    with pytest.raises(DataError, match=pattern) as info:
        parse_digits(blob, name="digits.csv.gz")
    assert "digits.csv.gz" in str(info.value) and "reinstall" in str(info.value)


def test_digits_not_gzip_error():
    with pytest.raises(DataError, match=r"digits\.csv\.gz: cannot decompress \(5 bytes\)"):
        parse_digits(b"hello", name="digits.csv.gz")


# --- train_test_split -----------------------------------------------------------------------


def test_split_sizes_disjoint_and_complete():
    X = np.arange(100 * 3).reshape(100, 3)
    y = np.arange(100)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, seed=3)
    assert (len(X_tr), len(X_te), len(y_tr), len(y_te)) == (75, 25, 75, 25)
    assert set(y_tr.tolist()).isdisjoint(y_te.tolist())
    assert sorted(y_tr.tolist() + y_te.tolist()) == list(range(100))
    np.testing.assert_array_equal(X_tr[:, 0] // 3, y_tr)  # rows stay paired with labels
    np.testing.assert_array_equal(X_te[:, 0] // 3, y_te)


def test_split_follows_scikit_learn_order_and_test_size():
    """X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=...), as in
    scikit-learn: a fraction rounds the test count up, an int is the test count."""
    X = np.arange(10 * 2, dtype=np.float64).reshape(10, 2)
    y = np.arange(10) + 100   # labels differ from every X value, so a swap cannot pass
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, seed=0)
    assert X_train.shape == (7, 2) and X_test.shape == (3, 2)   # ceil(2.5) = 3, as sklearn
    assert y_train.shape == (7,) and y_test.shape == (3,)
    np.testing.assert_array_equal(X_train[:, 0] // 2 + 100, y_train)
    np.testing.assert_array_equal(X_test[:, 0] // 2 + 100, y_test)
    assert [len(a) for a in train_test_split(X, y, test_size=4)] == [6, 4, 6, 4]
    assert len(train_test_split(X, y)[1]) == 3   # default test_size 0.25, as sklearn


def test_split_old_test_fraction_is_refused_with_the_new_order():
    with pytest.raises(DataError, match=r"test_fraction was renamed test_size.*\n"
                                        r"help: pass test_size=0\.2 and unpack X_train, X_test"):
        train_test_split(np.zeros((10, 2)), np.zeros(10), test_fraction=0.2)


def test_split_seeded():
    X, y = load_digits()
    a = train_test_split(X, y, seed=7)
    b = train_test_split(X, y, seed=7)
    c = train_test_split(X, y, seed=8)
    assert len(a[1]) == math.ceil(1797 * 0.25)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[3], c[3])


@pytest.mark.parametrize("size", [0.0, 1.0, -0.1, 1.5, float("nan"), "0.2", True, None])
def test_split_bad_test_size(size):
    with pytest.raises(DataError, match=r"test_size is .*0 < test_size < 1 or a number"):
        train_test_split(np.zeros((10, 2)), np.zeros(10), test_size=size)


@pytest.mark.parametrize("size", [0, 10, -1, 11])
def test_split_bad_test_count(size):
    with pytest.raises(DataError, match=rf"10 samples with test_size={size} give {size} test"):
        train_test_split(np.zeros((10, 2)), np.zeros(10), test_size=size)


def test_split_length_mismatch_and_too_small():
    with pytest.raises(DataError, match=r"X holds 10 samples but y holds 9"):
        train_test_split(np.zeros((10, 2)), np.zeros(9))
    with pytest.raises(DataError, match=r"2 samples with test_size=0\.99 give 2 test"):
        train_test_split(np.zeros((2, 2)), np.zeros(2), test_size=0.99)


# --- read_idx -------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-128, -1, 0, 127], dtype=np.int8),
        np.array([[-30000, 1], [2, 30000]], dtype=np.int16),
        np.array([-(2**31), 2**31 - 1, 5], dtype=np.int32),
        np.array([[1.5, -2.25], [np.inf, 0.0]], dtype=np.float32),
        np.array([1e300, -1e-300], dtype=np.float64),
        np.zeros((0, 5), dtype=np.uint8),
    ],
)
def test_idx_round_trip(tmp_path, array, gz):
    # A misleading extension: gzip is detected by magic bytes, not by the name.
    path = write_idx(tmp_path / ("data.idx" if gz else "data.gz"), array, gz=gz)
    out = read_idx(path)
    assert out.dtype == array.dtype and out.dtype.isnative
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    assert out.flags.writeable and out.flags.c_contiguous


def test_idx_truncated(tmp_path):
    blob = idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8))  # 16-byte header + 48 payload bytes
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(blob[:-5])
    with pytest.raises(DataError) as info:
        read_idx(path)
    msg = str(info.value)
    assert "short-idx3-ubyte" in msg and "need exactly 48 payload bytes, found 43" in msg
    assert "(3, 4, 4)" in msg and "re-download" in msg


def test_idx_trailing_bytes(tmp_path):
    path = tmp_path / "long-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(10, dtype=np.int16)) + b"\0\0\0")
    with pytest.raises(DataError, match=r"long-idx1-ubyte: header dims \(10,\) of int16 need "
                                        r"exactly 20 payload bytes, found 23"):
        read_idx(path)


def test_idx_gz_truncated_and_trailing(tmp_path):
    array = np.arange(100, dtype=np.uint8)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(idx_bytes(array)[:-10]))
    with pytest.raises(DataError, match=r"short\.gz: .*need exactly 100 payload bytes, found 90"):
        read_idx(short)
    long = tmp_path / "long.gz"
    long.write_bytes(gzip.compress(idx_bytes(array) + b"xyz"))
    with pytest.raises(DataError, match=r"long\.gz: .*need exactly 100 payload bytes, found 103"):
        read_idx(long)


@pytest.mark.parametrize(
    "head, pattern",
    [
        (b"\x01\x00\x08\x01", r"bad IDX magic 01 00 08 01"),
        (b"\x00\x00\x0a\x01", r"got type 0x0A, ndim 1"),
        (b"\x00\x00\x08\x00", r"got type 0x08, ndim 0"),
        (b"PK\x03\x04", r"bad IDX magic 50 4b 03 04"),
    ],
)
def test_idx_bad_magic(tmp_path, head, pattern):
    path = tmp_path / "bad.idx"
    path.write_bytes(head + b"\x00\x00\x00\x01" + b"\x07")
    with pytest.raises(DataError, match=pattern) as info:
        read_idx(path)
    assert "bad.idx" in str(info.value) and "0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E" in str(info.value)


def test_idx_too_short_for_header(tmp_path):
    path = tmp_path / "tiny.idx"
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match=r"tiny\.idx: 2 bytes, expected at least 4"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x01")
    with pytest.raises(DataError, match=r"tiny\.idx: header declares 3 dims needing 12 bytes, "
                                        r"only 4 follow"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_huge_dims_tiny_file(tmp_path, gz):
    # Claims 4e9 * 4e9 * 4e9 float64 values (~5e29 bytes); must fail fast without allocating.
    head = b"\x00\x00\x0e\x03" + struct.pack(">3I", 4_000_000_000, 4_000_000_000, 4_000_000_000)
    blob = head + b"\x00" * 8
    path = tmp_path / "huge.idx"
    path.write_bytes(gzip.compress(blob) if gz else blob)
    expected = 8 * 4_000_000_000**3
    with pytest.raises(DataError, match=rf"huge\.idx: .*need exactly {expected} payload bytes"):
        read_idx(path)


def test_idx_gz_bomb_is_bounded(tmp_path):
    # Header claims 10 bytes, but the stream decompresses to 50 MB: stop after one chunk.
    blob = idx_bytes(np.zeros(10, dtype=np.uint8)) + b"\0" * 50_000_000
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(blob, compresslevel=1))
    with pytest.raises(DataError, match=r"need exactly 10 payload bytes, found \d+ or more"):
        read_idx(path)


def test_idx_corrupt_gzip(tmp_path):
    good = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32)))
    cases = {
        "crc.gz": good[:-8] + bytes([good[-8] ^ 0xFF]) + good[-7:],  # bad CRC32
        "cut.gz": good[: len(good) // 2],  # stream ends early
        "junk.gz": good[:10] + b"\xff" * 40,  # not a deflate stream
        "header.gz": b"\x1f\x8b\x07" + good[3:],  # unknown compression method
    }
    for name, blob in cases.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(DataError) as info:
            read_idx(path)
        assert name in str(info.value) and "re-download" in str(info.value)
        assert f"{len(blob)} bytes" in str(info.value) or "payload bytes" in str(info.value)


def test_idx_missing_and_folder(tmp_path):
    with pytest.raises(DataError, match=r"nope\.idx: no such file"):
        read_idx(tmp_path / "nope.idx")
    with pytest.raises(DataError, match=r"is a folder, expected an IDX file"):
        read_idx(tmp_path)


def test_idx_fuzz_mutations(tmp_path):
    """Random mutations of valid IDX files either load or raise DataError, never anything else."""
    rng = random.Random(1234)
    base = idx_bytes(np.arange(6 * 5 * 4, dtype=np.uint8).reshape(6, 5, 4))
    base16 = idx_bytes(np.arange(30, dtype=np.int16).reshape(5, 6))
    start = time.monotonic()
    outcomes = {"ok": 0, "error": 0}
    path = tmp_path / "fuzz"
    for i in range(300):
        blob = bytearray(base if i % 3 else base16)
        if i % 2:
            blob = bytearray(gzip.compress(bytes(blob)))
        for _ in range(rng.randint(1, 4)):
            action = rng.random()
            if action < 0.4 and blob:
                blob[rng.randrange(len(blob))] = rng.randrange(256)
            elif action < 0.6:
                del blob[rng.randrange(len(blob) + 1):]
            elif action < 0.75:
                blob += bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            elif action < 0.9 and len(blob) > 8:
                pos = rng.randrange(4, 8)  # hit the dims, including the top byte
                blob[pos] = rng.randrange(256)
            elif blob:
                del blob[rng.randrange(len(blob))]
        path.write_bytes(bytes(blob))
        try:
            read_idx(path)
            outcomes["ok"] += 1
        except DataError:
            outcomes["error"] += 1
    assert outcomes["error"] > 100  # the mutations really do break files
    assert time.monotonic() - start < 5.0


# --- load_mnist -----------------------------------------------------------------------------


def make_mnist_folder(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = False) -> dict:
    """Write a synthetic MNIST folder; return the arrays written."""
    folder.mkdir(exist_ok=True)
    arrays = {}
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_mnist(n, seed)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, gz=gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz=gz)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_folder(tmp_path, gz):
    arrays = make_mnist_folder(tmp_path / "mnist", gz=gz)
    for split, prefix, n in (("train", "train", 12), ("test", "t10k", 5)):
        X, y = load_mnist(tmp_path / "mnist", split=split)
        images, labels = arrays[prefix]
        assert X.shape == (n, 784) and X.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int64
        np.testing.assert_allclose(X, images.reshape(n, -1) / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(y, labels)
        assert 0.0 <= X.min() and X.max() <= 1.0


def test_load_mnist_npz(tmp_path):
    (xtr, ytr), (xte, yte) = synthetic_mnist(7, 0), synthetic_mnist(3, 1)
    path = tmp_path / "mnist.npz"
    np.savez_compressed(path, x_train=xtr, y_train=ytr.astype(np.int64), x_test=xte, y_test=yte)
    X, y = load_mnist(path)
    np.testing.assert_allclose(X, xtr.reshape(7, -1) / 255.0, rtol=1e-6)
    assert y.dtype == np.int64 and y.tolist() == ytr.tolist()
    X, y = load_mnist(str(path), split="test")
    assert X.shape == (3, 784) and y.tolist() == yte.tolist()


def test_load_mnist_missing_things(tmp_path):
    with pytest.raises(DataError, match=r"(?s)nowhere: not found .*train-images-idx3-ubyte"):
        load_mnist(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path / "empty", split="test")
    msg = str(info.value)
    assert "empty" in msg and "0 of 2" in msg
    assert "t10k-images-idx3-ubyte, t10k-images-idx3-ubyte.gz" in msg
    make_mnist_folder(tmp_path / "mnist")
    with pytest.raises(DataError, match=r"split is 'val', expected one of \['test', 'train'\]"):
        load_mnist(tmp_path / "mnist", split="val")


def test_load_mnist_count_mismatch(tmp_path):
    folder = tmp_path / "mnist"
    make_mnist_folder(folder)
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(11, dtype=np.uint8))
    with pytest.raises(DataError) as info:
        load_mnist(folder)
    msg = str(info.value)
    assert "holds 12 images" in msg and "holds 11 labels" in msg
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg


def test_load_mnist_wrong_ranks(tmp_path):
    folder = tmp_path / "mnist"
    make_mnist_folder(folder)
    write_idx(folder / "train-images-idx3-ubyte", np.zeros((12, 784), dtype=np.uint8))
    with pytest.raises(DataError, match=r"images have 2 dims \(12, 784\), expected 3"):
        load_mnist(folder)
    make_mnist_folder(folder)
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros((12, 1), dtype=np.uint8))
    with pytest.raises(DataError, match=r"labels have 2 dims \(12, 1\), expected 1"):
        load_mnist(folder)
    make_mnist_folder(folder)
    write_idx(folder / "train-images-idx3-ubyte", np.zeros((12, 28, 28), dtype=np.float32))
    with pytest.raises(DataError, match=r"images have dtype float32, expected uint8"):
        load_mnist(folder)


def test_load_mnist_npz_errors(tmp_path):
    xtr, ytr = synthetic_mnist(4)
    partial = tmp_path / "partial.npz"
    np.savez(partial, x_train=xtr, y_train=ytr)
    with pytest.raises(DataError, match=r"partial\.npz: missing keys \['x_test', 'y_test'\] "
                                        r"\(2 keys present"):
        load_mnist(partial, split="test")
    bogus = tmp_path / "bogus.npz"
    bogus.write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match=r"bogus\.npz: not a valid \.npz \(zip\) archive "
                                        r"\(16 bytes\)"):
        load_mnist(bogus)
    labels = tmp_path / "labels.npz"
    np.savez(labels, x_train=xtr, y_train=ytr.astype(np.int64) + 300)
    with pytest.raises(DataError, match=r"labels\.npz\[y_train\]: label values span \d+\.\.\d+, "
                                        r"expected 0\.\.255"):
        load_mnist(labels)
    objects = tmp_path / "objects.npz"
    np.savez(objects, x_train=np.array([None, 1], dtype=object), y_train=ytr)
    with pytest.raises(DataError, match=r"objects\.npz: cannot read arrays .*pickle"):
        load_mnist(objects)
    damaged = tmp_path / "damaged.npz"
    with zipfile.ZipFile(damaged, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("x_train.npy", b"\x93NUMPY garbage")
        zf.writestr("y_train.npy", b"")
    with pytest.raises(DataError, match=r"damaged\.npz: cannot read arrays"):
        load_mnist(damaged)


# --- Batches --------------------------------------------------------------------------------


def _data(n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    X = np.arange(n * 2, dtype=np.float64).reshape(n, 2)
    return X, np.arange(n)


def test_batches_cover_every_sample_once_with_partial_last():
    X, y = _data(10)
    batches = Batches(X, y, 4, seed=5)
    assert len(batches) == 3
    out = list(batches)
    assert [len(yb) for _, yb in out] == [4, 4, 2]
    seen = np.concatenate([yb for _, yb in out])
    assert sorted(seen.tolist()) == list(range(10))
    assert not np.array_equal(seen, np.arange(10))  # really shuffled
    for Xb, yb in out:
        np.testing.assert_array_equal(Xb[:, 0] // 2, yb)  # rows stay paired with labels
        assert Xb.flags.c_contiguous and yb.flags.c_contiguous
    assert batches.epoch == 1


def test_batches_drop_last_and_exact_division():
    X, y = _data(10)
    batches = Batches(X, y, 4, drop_last=True)
    assert len(batches) == 2
    assert [len(yb) for _, yb in batches] == [4, 4]
    assert len(Batches(X, y, 5)) == 2 and len(Batches(X, y, 5, drop_last=True)) == 2
    assert len(Batches(X, y, 11)) == 1
    with pytest.raises(DataError, match=r"batch_size=11 > 10 samples would give 0 batches"):
        Batches(X, y, 11, drop_last=True)


def test_batches_no_shuffle_in_order():
    X, y = _data(7)
    batches = Batches(X, y, 3, shuffle=False)
    for _ in range(2):
        assert [yb.tolist() for _, yb in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches.epoch == 2


def _epoch_orders(batches: Batches, epochs: int) -> list[list[int]]:
    return [np.concatenate([yb for _, yb in batches]).tolist() for _ in range(epochs)]


def test_batches_deterministic_per_seed_and_epoch():
    X, y = _data(50)
    a = _epoch_orders(Batches(X, y, 8, seed=3), 4)
    b = _epoch_orders(Batches(X, y, 8, seed=3), 4)
    c = _epoch_orders(Batches(X, y, 8, seed=4), 4)
    assert a == b
    assert a != c
    assert len({tuple(order) for order in a}) == 4  # a new permutation each epoch
    # The order depends only on (seed, epoch): jumping straight to epoch 2 reproduces it.
    jumped = Batches(X, y, 8, seed=3)
    jumped.epoch = 2
    assert _epoch_orders(jumped, 2) == a[2:]
    assert Batches(X, y, 8, seed=3).order(epoch=3).tolist() == a[3]


def test_batches_state_dict_round_trip():
    X, y = _data(30)
    run = Batches(X, y, 7, seed=11)
    _epoch_orders(run, 3)
    state = run.state_dict()
    assert state == {"epoch": 3, "seed": 11}
    assert all(type(v) is int for v in state.values())
    expected = _epoch_orders(run, 2)
    resumed = Batches(X, y, 7, seed=0)
    resumed.load_state_dict(state)
    assert _epoch_orders(resumed, 2) == expected
    # Values read back from an .npz checkpoint arrive as 0-d arrays.
    again = Batches(X, y, 7)
    again.load_state_dict({k: np.array(v) for k, v in state.items()})
    assert _epoch_orders(again, 2) == expected


def test_batches_load_state_dict_errors():
    batches = Batches(*_data(5), 2)
    with pytest.raises(DataError, match=r"missing keys \['seed'\] \(1 keys present"):
        batches.load_state_dict({"epoch": 1})
    with pytest.raises(DataError, match=r"epoch must be an integer >= 0, got -1"):
        batches.load_state_dict({"epoch": -1, "seed": 0})
    with pytest.raises(DataError, match=r"seed must be an integer >= 0, got 1\.5"):
        batches.load_state_dict({"epoch": 0, "seed": 1.5})


def test_batches_abandoned_epoch_does_not_advance():
    batches = Batches(*_data(10), 3)
    iterator = iter(batches)
    next(iterator)
    assert batches.epoch == 0
    first = [yb.tolist() for _, yb in batches]
    assert batches.epoch == 1
    assert first[0] == Batches(*_data(10), 3).order(0)[:3].tolist()


class FakeDevice:
    """Records every put; returns a tagged tuple instead of a device array."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, object]] = []

    def put(self, host_array, dtype=None):
        self.calls.append((host_array.shape, dtype))
        return ("on-device", host_array, dtype)


def test_batches_device_put_once_per_array():
    X, y = _data(10)
    device = FakeDevice()
    batches = Batches(X, y, 4, device=device, dtype="float16")
    out = list(batches)
    assert len(device.calls) == 2 * len(batches) == 6
    assert device.calls[:2] == [((4, 2), "float16"), ((4,), None)]
    assert device.calls[-2:] == [((2, 2), "float16"), ((2,), None)]
    for xb, yb in out:
        assert xb[0] == "on-device" and xb[2] == "float16"
        assert yb[0] == "on-device" and yb[2] is None and yb[1].dtype.kind == "i"


def test_batches_host_dtype_cast():
    X, y = _data(6)
    (Xb, yb), *_ = Batches(X, y, 6, dtype=np.float32)
    assert Xb.dtype == np.float32 and yb.dtype == y.dtype


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"batch_size": 0}, r"batch_size must be an integer >= 1, got 0"),
        ({"batch_size": 2.0}, r"batch_size must be an integer >= 1, got 2\.0"),
        ({"batch_size": True}, r"batch_size must be an integer >= 1, got True"),
        ({"batch_size": 2, "seed": -3}, r"seed must be an integer >= 0, got -3"),
        ({"batch_size": 2, "device": object()}, r"has no put\(host_array, dtype=None\) method"),
    ],
)
def test_batches_bad_options(kwargs, pattern):
    with pytest.raises(DataError, match=pattern):
        Batches(*_data(5), **kwargs)


def test_batches_bad_arrays():
    with pytest.raises(DataError, match=r"X holds 5 samples but y holds 4"):
        Batches(np.zeros((5, 2)), np.zeros(4), 2)
    with pytest.raises(DataError, match=r"X holds 0 samples, expected at least 1"):
        Batches(np.zeros((0, 2)), np.zeros(0), 2)
    with pytest.raises(DataError, match=r"expected at least 1 dim"):
        Batches(np.float64(1.0), np.zeros(1), 2)


def test_batches_on_digits_end_to_end():
    X, y = load_digits()
    X_tr, _, y_tr, _ = train_test_split(X, y, test_size=0.2)
    batches = Batches(X_tr, y_tr, 64, seed=1)
    total = sum(len(yb) for _, yb in batches)
    assert total == len(X_tr) == 1797 - math.ceil(1797 * 0.2)


# --- text and SequenceBatches ---------------------------------------------------------------


def test_load_text_default_is_pythons_own_docs():
    from pydoc_data.topics import topics
    ids, vocabulary = load_text()
    text = "\n\n".join(topics[k] for k in sorted(topics))
    assert ids.dtype == np.int64 and ids.shape == (len(text),) and len(text) > 400_000
    assert vocabulary == "".join(sorted(set(text)))
    assert "".join(vocabulary[i] for i in ids[:5000]) == text[:5000]
    np.testing.assert_array_equal(ids[-5000:], [vocabulary.index(c) for c in text[-5000:]])
    again, _ = load_text("python-docs")
    np.testing.assert_array_equal(again, ids)


def test_load_text_from_a_utf8_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("héllo wörld\n€ 😀", encoding="utf-8")
    for source in (path, str(path)):
        ids, vocabulary = load_text(source)
        assert vocabulary == "".join(sorted(set("héllo wörld\n€ 😀")))
        assert "".join(vocabulary[i] for i in ids) == "héllo wörld\n€ 😀"


@pytest.mark.parametrize("name, content, pattern", [
    ("missing.txt", None, r"missing\.txt: no such file"),
    ("empty.txt", b"", r"empty\.txt: the text is empty"),
    ("image.bin", b"\x89PNG\r\n\x1a\n\xff\x00", r"image\.bin: not UTF-8 text \(byte 0 of 10"),
    ("nul.txt", b"ab\x00cd", r"nul\.txt: holds NUL bytes \(the first at byte 2 of 5\)"),
    ("folder", "folder", r"folder: is a folder"),
])
def test_load_text_bad_files(tmp_path, name, content, pattern):
    path = tmp_path / name
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=pattern) as info:
        load_text(path)
    assert str(path) in str(info.value) and "\nhelp: " in str(info.value)


def _epoch(batches):
    return [(x.copy(), y.copy()) for x, y in batches]


def test_sequence_batches_windows_shift_by_one_and_hold_out_the_tail():
    ids = np.arange(1000)  # every id is its position
    batches = SequenceBatches(ids, 8, 16, seed=3, held_out=0.1)
    n_train = 900
    for epoch in range(3):
        starts = []
        for x, y in batches:
            assert x.shape[1] == y.shape[1] == 8 and x.dtype == y.dtype == np.int64
            np.testing.assert_array_equal(x, x[:, :1] + np.arange(8))  # contiguous windows
            np.testing.assert_array_equal(y, x + 1)                     # shifted by one
            assert y.max() < n_train, "a training window reached the held-out tail"
            starts += x[:, 0].tolist()
        assert len(starts) == len(set(starts)) == (n_train - 1) // 8 == 112 == 16 * len(batches), \
            "windows repeat or go missing"
        assert len({s % 8 for s in starts}) == 1, "windows overlap"
    held = list(batches.held_out_batches())
    x = np.concatenate([x for x, _ in held])
    y = np.concatenate([y for _, y in held])
    np.testing.assert_array_equal(x[:, 0], ids[900 + 8 * np.arange(len(x))])
    np.testing.assert_array_equal(y, ids[900 + 8 * np.arange(len(x))[:, None] + np.arange(1, 9)])
    assert len(x) == 99 // 8 and [len(b) for b, _ in held] == [12]
    assert list(SequenceBatches(ids, 8, 16, held_out=0).held_out_batches()) == []


def test_sequence_batches_fresh_order_each_epoch_seeded_and_resumable():
    ids = np.arange(2000)
    a = SequenceBatches(ids, 10, 8, seed=1)
    first, second = _epoch(a), _epoch(a)
    assert not np.array_equal(first[0][0], second[0][0]), "the same order twice"
    assert len({a.offset(epoch) for epoch in range(10)}) > 1, "the same windows every epoch"
    again = SequenceBatches(ids, 10, 8, seed=1)
    for (x1, y1), (x2, y2) in zip(first, _epoch(again)):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    other = SequenceBatches(ids, 10, 8, seed=2)
    assert not np.array_equal(_epoch(other)[0][0], first[0][0])
    resumed = SequenceBatches(ids, 10, 8, seed=0)
    resumed.load_state_dict(a.state_dict())
    for (x1, _), (x2, _) in zip(_epoch(a), _epoch(resumed)):
        np.testing.assert_array_equal(x1, x2)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"ids": np.arange(20), "context": 20}, r"context=20 needs 21 ids a window .* the training "
                                            r"part has 18 \(20 ids, held_out=0\.1\)"),
    ({"ids": np.arange(200), "context": 20}, r"the held-out tail has 20 \(200 ids"),
    ({"ids": np.arange(0), "context": 2}, r"the training part has 0"),
    ({"ids": np.arange(50), "context": 2, "held_out": 1.0}, r"held_out is 1\.0"),
    ({"ids": np.arange(50.0), "context": 2}, r"dtype float64; expected a 1-D integer array"),
    ({"ids": np.arange(50), "context": 0}, r"context must be an integer >= 1, got 0"),
])
def test_sequence_batches_bad_inputs(kwargs, pattern):
    kwargs = {"batch_size": 4, **kwargs}
    with pytest.raises(DataError, match=pattern):
        SequenceBatches(**kwargs)


# --- house style ----------------------------------------------------------------------------


def test_data_package_follows_the_house_style():
    """Relative imports like the rest of gpuflow, every DataError with a help: line, and no
    `Device` of its own (it clashed with gpuflow.Device)."""
    import gpuflow.data

    folder = Path(gpuflow.data.__file__).parent
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("gpuflow"), \
                    f"{path.name}:{node.lineno} imports {node.module} absolutely"
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "DataError"):
                text = "".join(part.value for part in ast.walk(node.args[0])
                               if isinstance(part, ast.Constant) and isinstance(part.value, str))
                assert "\nhelp: " in text, f"{path.name}:{node.lineno}: no help: line in {text!r}"
    assert not hasattr(gpuflow.data, "Device")
