"""Reading the old `.npz` checkpoints (format 1), so that nobody loses a trained model.

gpuflow writes safetensors now (see checkpoint.py); this module only reads. An `.npz` is a zip
of `.npy` members, which gpuflow parses itself with the hardening its fuzzing history asked for:
only stored or deflated members, sizes checked against the file before anything is allocated,
`.npy` headers read with NumPy's literal parser, object arrays (pickles) refused.

Layout of a format-1 file:

    __gpuflow__                 uint8: UTF-8 JSON metadata (format, versions, dtype, parameter
                                names and shapes, optimizer class, hyper-parameters, step count
                                and buffer names, step, epoch, scalar extra state)
    param/<name>                one array per parameter, on the host, in the graph's dtype
    optim/<name>/<buffer>       optimizer buffers (SGD 'momentum', Adam 'm' and 'v')
    state/<key>                 extra state that is an array (scalars live in the metadata)
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib

import numpy as np

from ..errors import CheckpointError, CheckpointProblem

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
META_KEY = "__gpuflow__"
# Deflate expands at most about 1032:1, so a deflated member claiming more is damaged.
_MAX_DEFLATE_RATIO = 1100


def damaged(problem: str) -> CheckpointProblem:
    """The one error for a file that is not what it claims to be (one line, one help line)."""
    problem = " ".join(str(problem).split())  # a library's message may span lines
    return CheckpointProblem(f" is damaged (truncated or corrupted?): "
                             f"{problem}.\nhelp: use an earlier checkpoint.")


def read_npz(path: str) -> dict[str, np.ndarray]:
    """Every member of the npz at `path`, read eagerly; CheckpointError for anything else."""
    try:
        # our own handle: numpy leaks the one it opens when the zip directory is unreadable
        with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
            size = os.fstat(f.fileno()).st_size
            arrays = {}
            for info in archive.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                arrays[key] = _read_member(archive, info, size)
            return arrays
    except CheckpointError:
        raise  # already names the member (read adds the file): wrapping it would nest them
    # zipfile raises NotImplementedError for unknown compression or zip versions and
    # RuntimeError for encrypted members
    except (OSError, ValueError, EOFError, KeyError, NotImplementedError, RuntimeError,
            OverflowError, zipfile.BadZipFile, zlib.error) as exc:
        raise damaged(f"{type(exc).__name__}: {exc}") from exc


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo,
                 file_size: int) -> np.ndarray:
    """One `.npy` member, its sizes checked before anything is allocated: the array its header
    declares must be exactly the bytes the member holds, and the member can hold no more than
    its compressed bytes allow (a crafted header or zip entry cannot make us allocate more than
    about _MAX_DEFLATE_RATIO times the file's size). Object arrays (pickles) are refused."""
    def member(problem: str) -> CheckpointProblem:
        return damaged(f"member {info.filename!r} {problem}")

    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise member(f"uses zip compression method {info.compress_type}; a checkpoint "
                     "holds only stored (or deflated) members")
    ratio = 1 if info.compress_type == zipfile.ZIP_STORED else _MAX_DEFLATE_RATIO
    if info.compress_size > file_size or info.file_size > ratio * info.compress_size + 64:
        raise member(f"claims {info.file_size} bytes ({info.compress_size} compressed) in a "
                     f"{file_size}-byte file")
    with archive.open(info) as stream:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise member(f"has .npy format version {version}; expected 1.0 or 2.0")
        if dtype.hasobject:
            raise CheckpointProblem(f" is not a gpuflow checkpoint: member "
                                    f"{info.filename!r} is an object array, which only pickle "
                                    "can load, and gpuflow never unpickles.\nhelp: pass a file "
                                    "written by gpuflow.checkpoint.save.", before="")
        nbytes = math.prod(shape) * dtype.itemsize
        held = info.file_size - stream.tell()
        if nbytes != held:
            raise member(f"declares shape {shape} of {dtype} ({nbytes} bytes) but holds "
                         f"{held} bytes")
        data = bytearray(nbytes)  # writable, like np.load's arrays
        if stream.readinto(data) != nbytes or stream.read(1):  # reading to the end checks the CRC
            raise member("ends early or late")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def read_meta_text(arrays: dict[str, np.ndarray]) -> str:
    """The `__gpuflow__` member as text; CheckpointError if it is missing or not UTF-8 bytes."""
    raw = arrays.pop(META_KEY, None)
    if raw is None:
        keys = sorted(arrays)
        shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
        raise CheckpointProblem(f" is not a gpuflow checkpoint: an .npz without the "
                                f"{META_KEY!r} metadata entry (it holds [{shown}]).\n"
                                "help: pass a file written by gpuflow.checkpoint.save.", before="")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointProblem(f" is not a gpuflow checkpoint: its metadata is "
                                f"unreadable (expected a 1-d uint8 array, got {raw.dtype} "
                                f"{raw.shape}).\nhelp: pass a file written by "
                                "gpuflow.checkpoint.save.", before="")
    try:
        return raw.tobytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointProblem(f" is not a gpuflow checkpoint: its metadata is "
                                f"unreadable ({exc}).\nhelp: pass a file written by "
                                "gpuflow.checkpoint.save.", before="") from None
