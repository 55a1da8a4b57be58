"""Checkpoint files on disk: the atomic write, and reading a file of either format.

Reading dispatches on the file's first bytes, not its name: a zip archive is an old `.npz`
checkpoint (checkpoint_npz.py), an 8-byte length followed by `{` is safetensors, parsed by the
`safetensors` package (a fuzzed Rust parser: header size limits, offsets that must cover the
file exactly without overlap, shapes that must match their byte ranges, no code execution).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, NamedTuple

import numpy as np

from .npz import ZIP_MAGIC, damaged, read_meta_text, read_npz
from ..errors import CheckpointError, CheckpointProblem, checkpoint_path

SAFETENSORS = "safetensors"
NPZ = "npz"


class Contents(NamedTuple):
    """What a checkpoint file holds: its format, its string metadata and its arrays."""
    kind: str                      # SAFETENSORS or NPZ
    metadata: dict[str, str]       # safetensors' __metadata__; an npz's JSON under "gpuflow"
    arrays: dict[str, np.ndarray]  # host arrays by name


def fspath(path: Any) -> str:
    """`path` as a str; CheckpointError for anything that is not a path."""
    try:
        path = os.fspath(path)
    except TypeError:
        raise CheckpointError(f"checkpoint path must be a str or os.PathLike, got "
                              f"{type(path).__name__} {path!r:.60}.") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    return path


# -- reading ------------------------------------------------------------------------------------
def read(path: str) -> Contents:
    """Every array and the metadata of the checkpoint at `path`, read eagerly (the file is
    closed on return); CheckpointError naming the file for anything that cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path!r} does not exist.\n"
                              "help: check the path, or save a checkpoint there first.") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a file.\n"
                              "help: pass the checkpoint file inside it.") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {exc}.\n"
                              "help: check the file's permissions.") from None
    with checkpoint_path(path):  # the readers' checks raise without the path
        if head.startswith(ZIP_MAGIC):
            arrays = read_npz(path)
            return Contents(NPZ, {"gpuflow": read_meta_text(arrays)}, arrays)
        if len(head) > 8 and head[8:9] == b"{":
            return _read_safetensors(path)
    raise CheckpointError(f"{path!r} is not a gpuflow checkpoint: {_describe_head(head)}.\n"
                          "help: pass a file written by gpuflow.checkpoint.save.")


def _read_safetensors(path: str) -> Contents:
    """The safetensors file at `path` through the safetensors package, as NumPy arrays."""
    import safetensors  # imported here: `import gpuflow` stays light

    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            names = list(f.keys())
            dtypes = {name: f.get_slice(name).get_dtype() for name in names}
            odd = [f"{name!r} ({dtype})" for name, dtype in dtypes.items()
                   if dtype not in _NUMPY_DTYPES]
            if odd:
                raise CheckpointProblem(
                    f" holds tensors of dtypes NumPy cannot hold: "
                    f"{', '.join(odd[:4])}{', ...' if len(odd) > 4 else ''}.\nhelp: save them "
                    "as float32 (in PyTorch: {k: v.float() for k, v in state_dict.items()}).")
            arrays = {name: f.get_tensor(name) for name in names}
    except CheckpointError:
        raise
    # The parser's own errors (SafetensorError: bad header length or JSON, offsets that do not
    # cover the file, unknown dtypes) and whatever else a damaged file makes the binding raise.
    except Exception as exc:  # noqa: BLE001 - every failure of the library is the file's
        raise damaged(f"safetensors: {exc}") from None
    return Contents(SAFETENSORS, metadata, arrays)


# The safetensors dtypes that NumPy has (bfloat16 and the float8s it has not).
_NUMPY_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32",
                 "F64", "C64"}


def _describe_head(head: bytes) -> str:
    if not head:
        return "the file is empty (0 bytes)"
    if head.startswith(b"\x93NUMPY"):
        return "it is a single .npy array, not a checkpoint"
    if head[:1] == b"\x80":
        return "it looks like a Python pickle, which gpuflow never loads"
    return f"it is neither a safetensors file nor an .npz (zip) archive; it starts with {head!r}"


# -- writing ------------------------------------------------------------------------------------
def safetensors_bytes(arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """`arrays` and the string `metadata` as a safetensors file, the same bytes for the same
    contents in every process and every save (so that a file can be hashed and cached).

    The safetensors library keeps the metadata in a Rust HashMap, which writes its keys in a
    new random order each time: the header is written again with them sorted, and the tensor
    entries in the order of their data (which the library sorts by dtype and name), padded
    with spaces to 8 bytes as the library pads it."""
    from safetensors.numpy import save as to_bytes  # imported here: `import gpuflow` stays light

    data = to_bytes(arrays, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__", {}).items()))}
    ordered.update(sorted(header.items(), key=lambda item: item[1]["data_offsets"]))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return b"".join((len(text).to_bytes(8, "little"), text, memoryview(data)[8 + size:]))


def write_atomically(path: str, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, rename it onto `path`, fsync
    the directory: a crash leaves either the old file or the new one, never a mix."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=directory)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path!r}: {exc}.\n"
                              "help: check that the directory exists and is writable.") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; save like open()
            write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise CheckpointError(f"cannot write checkpoint {path!r}: {exc}; the previous file "
                                  "there (if any) is untouched.\nhelp: check the free space "
                                  "and permissions there.") from exc
        raise
    _fsync_directory(directory)


def write_all(f: Any, data: bytes) -> None:
    """The write itself (one function, so that tests can make it die halfway)."""
    f.write(data)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable; some platforms cannot open a directory, which is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
