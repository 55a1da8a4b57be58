"""Checkpoints: a graph's parameters, its optimizer's state, counters and extra state in one `.npz`.

    save(path, graph, optimizer, step=7, epoch=1, state={"batches.epoch": 1, ...})
    info = load(path, graph, optimizer)   # {"step", "epoch", "state", "meta"}

Layout of the file (a zip of `.npy` members, read with `numpy.load(allow_pickle=False)`):

    __gpuflow__                 uint8: UTF-8 JSON metadata (format, versions, dtype, parameter
                                names and shapes, optimizer class, hyper-parameters, step count
                                and buffer names, step, epoch, scalar extra state)
    param/<name>                one array per parameter, on the host, in the graph's dtype
    optim/<name>/<buffer>       optimizer buffers (SGD 'momentum', Adam 'm' and 'v')
    state/<key>                 extra state that is an array (scalars live in the metadata)

Saving is atomic: the file is written to a temporary file in the same directory, flushed and
fsynced, then renamed onto `path`, so a crash leaves either the old checkpoint or the new one.
Loading checks everything against the graph and the optimizer before it assigns anything: a
failed load leaves both exactly as they were. Values land on the graph's current device, in its
dtype, whatever device wrote them.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
import zipfile
import zlib
from typing import Any

import numpy as np

from .errors import CheckpointError
from .backends import dtype_name

CHECKPOINT_FORMAT = 1
_META_KEY = "__gpuflow__"
_FORMAT_NAME = "gpuflow-checkpoint"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
# Deflate expands at most about 1032:1, so a deflated member claiming more is damaged.
_MAX_DEFLATE_RATIO = 1100
_HYPER_SKIP = {"params", "state", "t"}  # optimizer attributes that are not hyper-parameters


# -- saving -------------------------------------------------------------------------------------
def save(path: "str | os.PathLike[str]", graph: Any, optimizer: Any = None, *, step: int = 0,
         epoch: int = 0, state: "dict[str, Any] | None" = None) -> None:
    """Write `graph`'s parameters (and `optimizer`'s state) to the `.npz` file `path`, atomically.

    step, epoch: ints stored as they are. state: extra things to restore, {str: int, float,
    str, bool or NumPy array} (e.g. a Batches' state_dict, a host RNG's state). The file at
    `path` is replaced only once the new one is complete on disk.
    Raises CheckpointError for a value that cannot be stored or a file that cannot be written.
    """
    path = _fspath(path)
    step = _check_int(step, "step", path)
    epoch = _check_int(epoch, "epoch", path)
    arrays: dict[str, np.ndarray] = {}
    params = graph.named_parameters()
    dtype = dtype_name(graph.dtype) if graph.dtype is not None else None
    for name, p in params.items():
        arrays[f"param/{name}"] = np.asarray(
            graph.device.to_host(p.value, what=f"checkpoint of {p.label}"))
    meta: dict[str, Any] = {
        "format": _FORMAT_NAME,
        "format_version": CHECKPOINT_FORMAT,
        "gpuflow_version": _version(),
        "numpy_version": np.__version__,
        "device": graph.device.name,
        "dtype": dtype,
        "parameters": [{"name": name, "shape": list(arrays[f"param/{name}"].shape),
                        "dtype": str(arrays[f"param/{name}"].dtype)} for name in params],
        "optimizer": None,
        "step": step,
        "epoch": epoch,
        "state": {},
    }
    if optimizer is not None:
        meta["optimizer"] = _optimizer_meta(optimizer, arrays, path)
    meta["state"] = _pack_state(state, arrays, path)
    text = json.dumps(meta, sort_keys=True)
    arrays[_META_KEY] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    _write_atomically(path, arrays)


def _optimizer_meta(optimizer: Any, arrays: dict[str, np.ndarray], path: str) -> dict[str, Any]:
    """The optimizer's class, hyper-parameters and step count; its buffers go into `arrays`."""
    sd = optimizer.state_dict()
    buffers: dict[str, list[str]] = {}
    for key, host in sd.items():
        if key == "t":
            continue
        name, _, buf = key.rpartition("/")
        buffers.setdefault(name, []).append(buf)
        arrays[f"optim/{key}"] = np.asarray(host)
    hyper = {}
    for attr, value in vars(optimizer).items():
        if attr in _HYPER_SKIP or attr.startswith("_"):
            continue
        if isinstance(value, tuple):
            value = list(value)
        if _jsonable(value):
            hyper[attr] = value
    cls = type(optimizer)
    return {"class": cls.__name__, "module": cls.__module__, "hyper": hyper,
            "t": int(sd.get("t", 0)), "buffers": buffers}


def _jsonable(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return True
    return isinstance(value, list) and all(isinstance(v, (bool, int, float, str)) for v in value)


def _pack_state(state: "dict[str, Any] | None", arrays: dict[str, np.ndarray],
                path: str) -> dict[str, Any]:
    """Scalars of `state` as {"kind", "value"} for the JSON; arrays go into `arrays`."""
    packed: dict[str, Any] = {}
    if state is None:
        return packed
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path!r}: state must be a dict {{str: value}}, got "
                              f"{type(state).__name__}.")
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"checkpoint {path!r}: state key {key!r} is a "
                                  f"{type(key).__name__}, not a str.")
        if isinstance(value, np.generic):
            value = value.item()  # NumPy scalars come back as the matching Python scalar
        if isinstance(value, bool):
            packed[key] = {"kind": "bool", "value": value}
        elif isinstance(value, numbers.Integral):
            packed[key] = {"kind": "int", "value": int(value)}
        elif isinstance(value, numbers.Real):
            # repr round-trips every float; JSON's NaN/Infinity are read back by json.loads
            packed[key] = {"kind": "float", "value": float(value)}
        elif isinstance(value, str):
            packed[key] = {"kind": "str", "value": value}
        elif isinstance(value, np.ndarray) and value.dtype.kind in "biufcUS":
            packed[key] = {"kind": "array"}
            arrays[f"state/{key}"] = value
        else:
            what = (f"a NumPy array of dtype {value.dtype}" if isinstance(value, np.ndarray)
                    else f"a {type(value).__name__}")
            raise CheckpointError(
                f"checkpoint {path!r}: state[{key!r}] is {what}, which a checkpoint cannot "
                "hold without pickling.\nhelp: store ints, floats, strs, bools or NumPy arrays "
                "of numbers or strings (flatten nested dicts into several keys).")
    return packed


def _write_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write the npz to a temporary file beside `path`, fsync it, rename it onto `path`."""
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
            np.savez(f, **arrays)
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
                                  "there (if any) is untouched.") from exc
        raise
    _fsync_directory(directory)


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


# -- loading ------------------------------------------------------------------------------------
def load(path: "str | os.PathLike[str]", graph: Any, optimizer: Any = None) -> dict[str, Any]:
    """Restore a checkpoint written by `save` into `graph` (and `optimizer`), on the graph's
    current device and in its dtype.

    Returns {"step": int, "epoch": int, "state": {key: value}, "meta": {...}}; array state comes
    back as NumPy arrays, scalars as Python ints, floats, strs and bools. The optimizer's
    hyper-parameters are not changed: the saved ones are in meta["optimizer"]["hyper"].
    Raises CheckpointError, naming the file and the problem, for a missing or damaged file, a
    file that is not a gpuflow checkpoint, a parameter missing, extra or of another shape, or an
    optimizer of another class; nothing is changed then.
    """
    path = _fspath(path)
    arrays = _read_npz(path)
    meta = _read_meta(path, arrays)
    _check_contents(path, meta, arrays)
    params = graph.named_parameters()
    _check_parameters(path, meta, arrays, params)
    opt_state = _check_optimizer(path, meta, arrays, optimizer) if optimizer is not None else None
    state = _unpack_state(path, meta, arrays)

    # Everything is checked: move the values to the device (nothing assigned yet), restore the
    # optimizer (which assigns only once all its buffers are on the device), then the parameters.
    new_values = {}
    for name, p in params.items():
        dtype = graph.dtype if graph.dtype is not None else p.value.dtype
        new_values[name] = graph.device.put(arrays[f"param/{name}"], dtype,
                                            what=f"checkpoint value of {p.label}")
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    for name, p in params.items():
        p.value = new_values[name]
    return {"step": meta["step"], "epoch": meta["epoch"], "state": state, "meta": meta}


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """Every member of the npz at `path`, read eagerly; CheckpointError for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path!r} does not exist.\n"
                              "help: check the path, or save a checkpoint there first.") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a file.") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path!r}: {exc}.") from exc
    if not head.startswith(_ZIP_MAGIC):
        raise CheckpointError(f"{path!r} is not a gpuflow checkpoint: {_describe_head(head)}.\n"
                              "help: pass a file written by gpuflow.checkpoint.save.")
    try:
        # our own handle: numpy leaks the one it opens when the zip directory is unreadable
        with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
            size = os.fstat(f.fileno()).st_size
            arrays = {}
            for info in archive.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                arrays[key] = _read_member(path, archive, info, size)
            return arrays
    # zipfile raises NotImplementedError for unknown compression or zip versions and
    # RuntimeError for encrypted members
    except (OSError, ValueError, EOFError, KeyError, NotImplementedError, RuntimeError,
            zipfile.BadZipFile, zlib.error) as exc:
        raise CheckpointError(f"checkpoint {path!r} is damaged (truncated or corrupted?): "
                              f"{type(exc).__name__}: {exc}.\n"
                              "help: use an earlier checkpoint.") from exc


def _read_member(path: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo,
                 file_size: int) -> np.ndarray:
    """One `.npy` member, its sizes checked before anything is allocated: the array its header
    declares must be exactly the bytes the member holds, and the member can hold no more than
    its compressed bytes allow (a crafted header or zip entry cannot make us allocate more than
    about _MAX_DEFLATE_RATIO times the file's size). Object arrays (pickles) are refused."""
    def damaged(problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path!r} is damaged (truncated or corrupted?): "
                               f"member {info.filename!r} {problem}.\n"
                               "help: use an earlier checkpoint.")

    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise damaged(f"uses zip compression method {info.compress_type}; a checkpoint "
                      "holds only stored (or deflated) members")
    ratio = 1 if info.compress_type == zipfile.ZIP_STORED else _MAX_DEFLATE_RATIO
    if info.compress_size > file_size or info.file_size > ratio * info.compress_size + 64:
        raise damaged(f"claims {info.file_size} bytes ({info.compress_size} compressed) in a "
                      f"{file_size}-byte file")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise damaged(f"has .npy format version {version}; expected 1.0 or 2.0")
        if dtype.hasobject:
            raise CheckpointError(f"{path!r} is not a gpuflow checkpoint: member "
                                  f"{info.filename!r} is an object array, which only pickle "
                                  "can load, and gpuflow never unpickles.\nhelp: pass a file "
                                  "written by gpuflow.checkpoint.save.")
        nbytes = math.prod(shape) * dtype.itemsize
        held = info.file_size - member.tell()
        if nbytes != held:
            raise damaged(f"declares shape {shape} of {dtype} ({nbytes} bytes) but holds "
                          f"{held} bytes")
        data = bytearray(nbytes)  # writable, like np.load's arrays
        if member.readinto(data) != nbytes or member.read(1):  # reading to the end checks the CRC
            raise damaged("ends early or late")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _describe_head(head: bytes) -> str:
    if not head:
        return "the file is empty (0 bytes)"
    if head.startswith(b"\x93NUMPY"):
        return "it is a single .npy array, not an .npz archive"
    if head[:1] == b"\x80":
        return "it looks like a Python pickle, which gpuflow never loads"
    return f"it is not an .npz (zip) archive; it starts with {head!r}"


def _read_meta(path: str, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The JSON metadata, checked for this format."""
    raw = arrays.get(_META_KEY)
    if raw is None:
        keys = sorted(arrays)
        shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
        raise CheckpointError(f"{path!r} is not a gpuflow checkpoint: an .npz without the "
                              f"{_META_KEY!r} metadata entry (it holds [{shown}]).\n"
                              "help: pass a file written by gpuflow.checkpoint.save.")
    try:
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise ValueError(f"expected a 1-d uint8 array, got {raw.dtype} {raw.shape}")
        meta = json.loads(raw.tobytes().decode("utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT_NAME:
            raise ValueError(f"format is {meta.get('format') if isinstance(meta, dict) else meta!r}"
                             f", expected {_FORMAT_NAME!r}")
    except ValueError as exc:  # includes JSON and UTF-8 decoding errors
        raise CheckpointError(f"{path!r} is not a gpuflow checkpoint: its metadata is "
                              f"unreadable ({exc}).") from exc
    version = meta.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT or version < 1:
        raise CheckpointError(
            f"checkpoint {path!r} has format version {version!r}; this gpuflow "
            f"({_version()}) reads versions 1..{CHECKPOINT_FORMAT}.\n"
            f"help: load it with the gpuflow that wrote it ({meta.get('gpuflow_version')}).")
    return meta


def _check_contents(path: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """The file agrees with its own metadata: every listed array is there, with its shape."""
    try:
        listed = [(f"param/{p['name']}", tuple(p["shape"])) for p in meta["parameters"]]
        opt = meta["optimizer"]
        if opt is not None:
            shapes = dict(listed)
            for name, bufs in opt["buffers"].items():
                listed += [(f"optim/{name}/{b}", shapes.get(f"param/{name}")) for b in bufs]
            int(opt["t"]), str(opt["class"])
        for key, entry in meta["state"].items():
            if entry["kind"] == "array":
                listed.append((f"state/{key}", None))
        int(meta["step"]), int(meta["epoch"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path!r} has damaged metadata: {type(exc).__name__}: "
                              f"{exc}.") from exc
    for key, shape in listed:
        if key not in arrays:
            raise CheckpointError(f"checkpoint {path!r} is damaged: its metadata lists {key!r} "
                                  "but the file does not hold it.")
        if shape is not None and tuple(arrays[key].shape) != shape:
            raise CheckpointError(f"checkpoint {path!r} is damaged: {key!r} has shape "
                                  f"{tuple(arrays[key].shape)} but its metadata says {shape}.")


def _check_parameters(path: str, meta: dict[str, Any], arrays: dict[str, np.ndarray],
                      params: dict[str, Any]) -> None:
    """Every parameter of the graph is in the checkpoint with its shape, and nothing else is."""
    saved = {p["name"]: tuple(p["shape"]) for p in meta["parameters"]}
    problems = []
    for name, p in params.items():
        expected = tuple(p.value.shape)
        if name not in saved:
            problems.append(f"parameter {name!r} (shape {expected}) is missing from the "
                            "checkpoint")
        elif saved[name] != expected:
            problems.append(f"parameter {name!r}: expected shape {expected} (this model), "
                            f"actual {saved[name]} (checkpoint)")
    for name, shape in saved.items():
        if name not in params:
            problems.append(f"parameter {name!r} (shape {shape}) is in the checkpoint but not "
                            "in this model")
    if problems:
        raise CheckpointError(
            f"checkpoint {path!r} does not fit this model:\n  " + "\n  ".join(problems) +
            f"\nhelp: build the model the checkpoint was saved from (it has "
            f"{len(saved)} parameters: {', '.join(list(saved)[:6])}"
            f"{', ...' if len(saved) > 6 else ''}).")


def _check_optimizer(path: str, meta: dict[str, Any], arrays: dict[str, np.ndarray],
                     optimizer: Any) -> dict[str, Any]:
    """The optimizer's saved state as `load_state_dict` takes it, checked against `optimizer`."""
    saved = meta["optimizer"]
    cls = type(optimizer).__name__
    if saved is None:
        raise CheckpointError(f"checkpoint {path!r} holds no optimizer state, but load was "
                              f"given {cls}.\nhelp: pass optimizer=None to load only the "
                              "parameters.")
    if saved["class"] != cls:
        raise CheckpointError(f"checkpoint {path!r} holds optimizer state of class "
                              f"{saved['class']}, but load was given {cls}.\n"
                              f"help: build the optimizer as {saved['class']} (hyper-parameters "
                              f"{saved['hyper']}), or pass optimizer=None.")
    params = {p.name: p for p in optimizer.params}
    state: dict[str, Any] = {"t": int(saved["t"])}
    for name, bufs in saved["buffers"].items():
        if name not in params:
            raise CheckpointError(f"checkpoint {path!r}: the optimizer state names parameter "
                                  f"{name!r}, which this {cls} does not optimise (it has "
                                  f"{sorted(params)}).")
        expected = tuple(params[name].value.shape)
        for b in bufs:
            host = arrays[f"optim/{name}/{b}"]
            if tuple(host.shape) != expected:
                raise CheckpointError(f"checkpoint {path!r}: optimizer buffer {name}/{b}: "
                                      f"expected shape {expected}, actual {tuple(host.shape)}.")
            state[f"{name}/{b}"] = host
    return state


def _unpack_state(path: str, meta: dict[str, Any],
                  arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    state = {}
    for key, entry in meta["state"].items():
        kind = entry.get("kind")
        if kind == "array":
            state[key] = arrays[f"state/{key}"]
        elif kind in ("int", "float", "str", "bool"):
            state[key] = {"int": int, "float": float, "str": str, "bool": bool}[kind](
                entry["value"])
        else:
            raise CheckpointError(f"checkpoint {path!r} has damaged metadata: state[{key!r}] "
                                  f"has unknown kind {kind!r}.")
    return state


# -- helpers ------------------------------------------------------------------------------------
def _fspath(path: Any) -> str:
    try:
        path = os.fspath(path)
    except TypeError:
        raise CheckpointError(f"checkpoint path must be a str or os.PathLike, got "
                              f"{type(path).__name__} {path!r:.60}.") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    return path


def _check_int(value: Any, name: str, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise CheckpointError(f"checkpoint {path!r}: {name} must be an int, got {value!r}.")
    return int(value)


def _version() -> str:
    from . import __version__  # lazily: gpuflow/__init__ may import this module one day
    return __version__
