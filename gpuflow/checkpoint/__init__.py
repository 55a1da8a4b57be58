"""Checkpoints: a graph's parameters, its optimizer's and nodes' state, a schedule's state,
counters and extra state in one safetensors file.

    save(path, graph, optimizer, schedule=sched, step=7, epoch=1, state={"batches.epoch": 1})
    info = load(path, graph, optimizer, schedule=sched)   # {"step", "epoch", "state", "meta"}

The file is safetensors (github.com/huggingface/safetensors): an 8-byte length, a JSON header,
raw little-endian buffers; `safetensors.numpy.load_file` or `safetensors.torch.load_file` open
it. Its tensors:

    param/<name>            one per parameter, on the host, in the graph's dtype (a mixed-
                            precision graph's float32 master weights)
    optim/<name>/<buffer>   optimizer buffers (SGD 'momentum', Adam 'm' and 'v')
    node/<node>/<key>       the state of every node with `state_dict()` (BatchNorm's statistics)
    schedule/<key>          array entries of a schedule's state (its numbers are metadata)
    ema/<name>              one per parameter: the weight average of `save(..., ema=)`
                            (gpuflow.optim.EMA; its decay and update count are metadata)
    state/<key>             extra state that is an array (scalars live in the metadata)

Its string metadata: "format" ("gpuflow-checkpoint"), "format_version" ("2"),
"gpuflow_version", "architecture" (JSON: the graph's nodes in order, each {"name", "type",
"inputs"}) and "gpuflow" (JSON: dtype, device, parameter names and shapes, optimizer class,
hyper-parameters, step count and buffer names, node state keys, schedule class and numbers,
the EMA's decay, update count and names, a mixed-precision graph's loss scale, step, epoch, scalar extra state, CRC-32s).

`save` writes this format whatever the file is called, but refuses a name ending in `.npz`,
the old format (a zip of `.npy` members), which `load` still reads (checkpoint_npz.py); `load`
tells the formats apart by the file's first bytes. Saving is atomic (checkpoint_io.py): a crash
leaves either the old checkpoint or the new one. Loading checks everything against the graph,
the optimizer and the schedule before it assigns anything: a refused load leaves them as they
were. Values land on the graph's current device, in its dtype, whatever device wrote them.
`load_weights` / `export_weights` (weights.py) exchange plain weight files with other frameworks.
"""

from __future__ import annotations

import json
import numbers
import os
import zlib
from typing import Any

import numpy as np

from . import io as checkpoint_io
from ..backends import dtype_name, to_host
from .graph import architecture, gpuflow_version, like, stateful_nodes
from .io import NPZ, fspath
from .meta import bad_meta, check_depth, check_meta, pack, unpack
from ..errors import CheckpointError, CheckpointProblem, checkpoint_path
from .weights import export_weights, load_weights

__all__ = ["save", "load", "read_info", "load_weights", "export_weights", "check_save_path",
           "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 2   # 1: the old .npz; 2: safetensors
_FORMAT_NAME = "gpuflow-checkpoint"
_HYPER_SKIP = {"params", "state", "t"}  # optimizer attributes that are not hyper-parameters
# What a safetensors file holds natively; complex arrays are stored as (..., 2) real pairs.
_TENSOR_DTYPES = {"bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
                  "uint64", "float16", "float32", "float64"}


# -- saving -------------------------------------------------------------------------------------
def save(path: "str | os.PathLike[str]", graph: Any, optimizer: Any = None, *,
         schedule: Any = None, step: int = 0, epoch: int = 0,
         state: "dict[str, Any] | None" = None, ema: Any = None) -> None:
    """Write `graph`'s parameters and node state (and `optimizer`'s, `schedule`'s and `ema`'s
    state) to the safetensors file `path`, atomically.

    step, epoch: ints stored as they are. schedule: an object with `state_dict()` (numbers) and
    `load_state_dict()`, e.g. gpuflow.optim.StepLR. ema: a gpuflow.optim.EMA of `graph`
    (not swapped in: the parameters saved are the graph's own). state: extra things to restore, {str: int,
    float, str, bool, list of numbers, or NumPy array} (e.g. a Batches' state_dict, a host RNG's
    state). The file at `path` is replaced only once the new one is complete on disk.
    Raises CheckpointError for a value that cannot be stored, a path ending in `.npz`, or a
    file that cannot be written; nothing is written then.
    """
    path = check_save_path(path)
    with checkpoint_path(path):  # the checks below raise without the path
        step = _check_int(step, "step")
        epoch = _check_int(epoch, "epoch")
        arrays: dict[str, np.ndarray] = {}
        ema_meta = None if ema is None else _ema_meta(ema, graph, arrays)
        params = graph.named_parameters()
        # Mixed precision: the float32 masters are the weights, checked against the values the
        # graph computes with (one read each: a value changed in place gets a new master).
        amp = getattr(graph, "amp", None)
        for name, p in params.items():
            value = amp.current_master(p) if amp is not None else p.value
            arrays[f"param/{name}"] = np.asarray(  # C order: what safetensors writes
                to_host(value, graph.device, what=f"checkpoint of {p.label}"), order="C")
        meta: dict[str, Any] = {
            "format": _FORMAT_NAME,
            "format_version": CHECKPOINT_FORMAT,
            "gpuflow_version": gpuflow_version(),
            "numpy_version": np.__version__,
            "device": graph.device.name,
            "dtype": dtype_name(graph.dtype) if graph.dtype is not None else None,
            "parameters": [{"name": name, "shape": list(arrays[f"param/{name}"].shape),
                            "dtype": str(arrays[f"param/{name}"].dtype)} for name in params],
            "optimizer": None if optimizer is None else _optimizer_meta(optimizer, arrays),
            "amp": None if amp is None else {
                "dtype": amp.name, "scaler": pack(amp.scaler.state_dict(), arrays, "amp/")},
            "nodes": {},
            "schedule": None,
            "ema": ema_meta,
            "step": step,
            "epoch": epoch,
        }
        for name, (node, node_state) in stateful_nodes(graph).items():
            meta["nodes"][name] = list(node_state)
            for key, value in node_state.items():
                arrays[f"node/{name}/{key}"] = np.asarray(to_host(
                    value, graph.device, what=f"state {key!r} of {node.label}"), order="C")
        if schedule is not None:
            meta["schedule"] = {"class": type(schedule).__name__,
                                "state": pack(_state_of(schedule), arrays, "schedule/")}
        meta["state"] = pack(state, arrays, "state/")
        for key, array in arrays.items():
            if array.dtype.name not in _TENSOR_DTYPES:
                raise CheckpointProblem(f": {key!r} has dtype {array.dtype}, which "
                                        "a safetensors file cannot hold.\nhelp: use float64 or "
                                        "float32 (or an integer dtype).")
        # safetensors has no checksum (zip had CRC-32): a flipped byte in a buffer or in the JSON
        # would load as a valid but wrong checkpoint. CRC-32s of every buffer and of the JSON catch
        # that (accidents, not tampering: see SECURITY.md).
        meta["crc32"] = {key: _crc(array) for key, array in arrays.items()}
        text = json.dumps(meta, sort_keys=True)
        metadata = {"format": _FORMAT_NAME, "format_version": str(CHECKPOINT_FORMAT),
                    "gpuflow_version": gpuflow_version(), "architecture": architecture(graph),
                    "gpuflow": text, "gpuflow_crc32": str(zlib.crc32(text.encode("utf-8")))}
    checkpoint_io.write_atomically(path, checkpoint_io.safetensors_bytes(arrays, metadata))


def _crc(array: np.ndarray) -> int:
    """CRC-32 of an array's bytes as safetensors stores them (C order, little-endian)."""
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return zlib.crc32(np.asarray(little, order="C").reshape(-1).view(np.uint8))


def check_save_path(path: "str | os.PathLike[str]") -> str:
    """`path` as a str if `save` can write there; CheckpointError for a name ending in `.npz`
    (the old format, which gpuflow reads but no longer writes)."""
    path = fspath(path)
    if path.lower().endswith(".npz"):
        raise CheckpointError(
            f"checkpoint {path!r}: gpuflow writes safetensors checkpoints, not .npz (which it "
            f"still loads).\nhelp: save to {path[:-4] + '.safetensors'!r}.")
    return path


def _optimizer_meta(optimizer: Any, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The optimizer's class, hyper-parameters and step count; its buffers go into `arrays`."""
    sd = optimizer.state_dict()
    buffers: dict[str, list[str]] = {}
    for key, host in sd.items():
        if key == "t":
            continue
        name, _, buf = key.rpartition("/")
        buffers.setdefault(name, []).append(buf)
        arrays[f"optim/{key}"] = np.asarray(host, order="C")
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


def _ema_meta(ema: Any, graph: Any, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The EMA's decay, update count and parameter names; its averages go into `arrays`."""
    if getattr(ema, "graph", None) is not graph or not callable(getattr(ema, "state_dict", None)):
        raise CheckpointProblem(f": ema must be the gpuflow.optim.EMA of this "
                                f"graph, got {type(ema).__name__}.\nhelp: pass EMA(graph), or "
                                "ema=None.")
    if getattr(ema, "_swapped", None) is not None:
        raise CheckpointProblem(f": the EMA's averaged weights are swapped into "
                                "the graph, which would save them as its parameters.\nhelp: save "
                                "outside `with ema.swapped():` (or after ema.swap_out()).")
    sd = ema.state_dict()
    names = [k for k in sd if k not in ("n_averaged", "decay")]
    for name in names:
        arrays[f"ema/{name}"] = np.asarray(sd[name], order="C")
    return {"class": type(ema).__name__, "decay": float(sd["decay"]),
            "n_averaged": int(sd["n_averaged"]), "names": names}


def _jsonable(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return True
    return isinstance(value, list) and all(isinstance(v, (bool, int, float, str)) for v in value)


def _state_of(schedule: Any) -> dict[str, Any]:
    state = getattr(schedule, "state_dict", None)
    if not callable(state) or not callable(getattr(schedule, "load_state_dict", None)):
        raise CheckpointProblem(f": schedule must have state_dict() and "
                                f"load_state_dict(), got {type(schedule).__name__}.\nhelp: pass "
                                "a gpuflow.optim schedule (StepLR, ...), or schedule=None.")
    return state()


def load(path: "str | os.PathLike[str]", graph: Any, optimizer: Any = None, *,
         schedule: Any = None, ema: Any = None) -> dict[str, Any]:
    """Restore a checkpoint written by `save` (safetensors, or an old `.npz`) into `graph` (and
    `optimizer`, `schedule` and `ema`, a gpuflow.optim.EMA of `graph`), on the graph's current
    device and in its dtype.

    Returns {"step": int, "epoch": int, "state": {key: value}, "meta": {...}}; array state comes
    back as NumPy arrays, scalars as Python ints, floats, strs and bools, lists as lists. The
    optimizer's hyper-parameters are not changed (the saved ones are in
    meta["optimizer"]["hyper"]); a schedule sets the optimizer's rate when it is restored.
    Raises CheckpointError, naming the file and the problem, for a missing or damaged file, a
    file that is not a gpuflow checkpoint, a parameter or node state missing, extra or of
    another shape, an optimizer or schedule of another class, or an EMA the file does not
    hold; nothing is changed then.
    """
    path = fspath(path)
    with checkpoint_path(path):
        contents = checkpoint_io.read(path)
        meta = _parse_meta(contents)
        arrays = contents.arrays
        _check_contents(meta, arrays, legacy=contents.kind == NPZ)
        params = graph.named_parameters()
        nodes = stateful_nodes(graph)
        _check_fit(meta, arrays, params, nodes)
        opt_state = _check_optimizer(meta, arrays, optimizer) if optimizer is not None else None
        sched_state = _check_schedule(meta, arrays, schedule) if schedule is not None else None
        ema_state = _check_ema(meta, arrays, ema, graph) if ema is not None else None
        state = unpack(meta["state"], arrays, "state/")

    # Everything is checked: move the values to the device (nothing assigned yet), restore the
    # optimizer (which assigns only once all its buffers are on the device), the nodes' and
    # the schedule's state, then the parameters.
    put = graph.device.put
    amp = getattr(graph, "amp", None)
    new_values, masters = {}, {}
    for name, p in params.items():
        dtype = graph.dtype if graph.dtype is not None else p.value.dtype
        new_values[name] = put(arrays[f"param/{name}"], dtype,
                               what=f"checkpoint value of {p.label}")
        if amp is not None:  # the saved (float32 or wider) values are the masters
            masters[name] = put(arrays[f"param/{name}"], amp.master_dtype,
                                what=f"checkpoint master of {p.label}")
    new_states = {}
    for name, (node, current) in nodes.items():
        new_states[name] = {key: like(graph.device, arrays[f"node/{name}/{key}"], old,
                                       f"checkpoint state {key!r} of {node.label}")
                            for key, old in current.items()}
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    for name, (node, _) in nodes.items():
        node.load_state_dict(new_states[name])
    if sched_state is not None:
        schedule.load_state_dict(sched_state)
    if ema_state is not None:
        ema.load_state_dict(ema_state)
    for name, p in params.items():
        p.value = new_values[name]
        if amp is not None:
            amp.set_master(p, masters[name])
    if amp is not None and meta["amp"] is not None:
        amp.scaler.load_state_dict(unpack(meta["amp"]["scaler"], arrays, "amp/"))
    meta["architecture"] = contents.metadata.get("architecture")
    return {"step": meta["step"], "epoch": meta["epoch"], "state": state, "meta": meta}


def read_info(path: "str | os.PathLike[str]") -> dict[str, Any]:
    """What the checkpoint at `path` holds, without a graph: {"meta": its checked metadata (as
    `load` returns it), "state": its extra state (as `load` returns it)}. Checks the file as
    `load` does before it compares it with a graph (CheckpointError for damage); `gpuflow
    train --resume` reads the run's settings from it before it builds the model."""
    path = fspath(path)
    with checkpoint_path(path):
        contents = checkpoint_io.read(path)
        meta = _parse_meta(contents)
        _check_contents(meta, contents.arrays, legacy=contents.kind == NPZ)
    meta["architecture"] = contents.metadata.get("architecture")
    return {"meta": meta, "state": unpack(meta["state"], contents.arrays, "state/")}


def _parse_meta(contents: checkpoint_io.Contents) -> dict[str, Any]:
    """The JSON metadata, its format and version checked, then every field (_check_meta)."""
    text = contents.metadata.get("gpuflow")
    if text is None or contents.metadata.get("format", _FORMAT_NAME) != _FORMAT_NAME:
        names = sorted(contents.arrays)
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        raise CheckpointProblem(f" is not a gpuflow checkpoint: a safetensors file without "
                                f"gpuflow's metadata (it holds [{shown}]).\nhelp: for weights "
                                "saved by another framework, use "
                                "gpuflow.checkpoint.load_weights.", before="")
    if contents.kind != NPZ and contents.metadata.get("gpuflow_crc32") != str(
            zlib.crc32(text.encode("utf-8"))):
        raise CheckpointProblem(f" is damaged (truncated or corrupted?): its "
                                "metadata does not match its checksum (CRC-32).\nhelp: use an "
                                "earlier checkpoint.")
    check_depth(text)  # before json.loads, which recursion too deep would end
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSON errors
        raise CheckpointProblem(f" is not a gpuflow checkpoint: its metadata is "
                                f"unreadable ({exc}).\nhelp: pass a file written by "
                                "gpuflow.checkpoint.save.", before="") from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise CheckpointProblem(f" is not a gpuflow checkpoint: its metadata is unreadable "
                                f"(format is {found!r:.60}, expected {_FORMAT_NAME!r}).\nhelp: "
                                "pass a file written by gpuflow.checkpoint.save.", before="")
    version = meta.get("format_version")
    if (not isinstance(version, int) or isinstance(version, bool) or version < 1
            or version > CHECKPOINT_FORMAT):
        raise CheckpointProblem(
            f" has format version {version!r:.40}; this gpuflow "
            f"({gpuflow_version()}) reads versions 1..{CHECKPOINT_FORMAT}.\n"
            f"help: load it with the gpuflow that wrote it ({meta.get('gpuflow_version')!r:.40}).")
    if (version == 1) != (contents.kind == NPZ):
        raise bad_meta(f"format version {version} in a {contents.kind} file")
    check_meta(meta)
    return meta


def _check_contents(meta: dict[str, Any], arrays: dict[str, np.ndarray], *,
                    legacy: bool) -> None:
    """The file agrees with its own metadata: every listed array is there, with its shape and a
    dtype of the right kind, and it holds nothing else."""
    floating = "f"
    listed: list[tuple[str, Any, str]] = []   # (key, shape or None, allowed dtype kinds)
    shapes = {}
    for p in meta["parameters"]:
        shapes[p["name"]] = tuple(p["shape"])
        listed.append((f"param/{p['name']}", tuple(p["shape"]), floating))
    if meta["optimizer"] is not None:
        for name, bufs in meta["optimizer"]["buffers"].items():
            listed += [(f"optim/{name}/{b}", shapes.get(name), floating) for b in bufs]
    if meta["ema"] is not None:
        listed += [(f"ema/{name}", shapes.get(name), floating) for name in meta["ema"]["names"]]
    for name, keys in meta["nodes"].items():
        listed += [(f"node/{name}/{k}", None, "biuf") for k in keys]
    packs = [("state/", meta["state"])]
    if meta["schedule"] is not None:
        packs.append(("schedule/", meta["schedule"]["state"]))
    for prefix, packed in packs:
        for key, entry in packed.items():
            if entry["kind"] == "array":
                listed.append((prefix + key, None, "biufcUS" if legacy else "biuf"))
            elif entry["kind"] == "complex":
                listed.append((prefix + key, None, "f"))
    for key, shape, kinds in listed:
        if key not in arrays:
            raise CheckpointProblem(f" is damaged: its metadata lists {key!r} "
                                    "but the file does not hold it.\nhelp: use an earlier "
                                    "checkpoint.")
        array = arrays[key]
        problem = None
        if shape is not None and tuple(array.shape) != shape:
            problem = f"has shape {tuple(array.shape)} but its metadata says {shape}"
        elif array.dtype.kind not in kinds:
            problem = f"has dtype {array.dtype}, where a checkpoint holds {_kinds(kinds)}"
        elif key.startswith(("state/", "schedule/")) and kinds == "f" and (
                array.ndim == 0 or array.shape[-1] != 2):
            problem = f"has shape {tuple(array.shape)}; complex values are stored as pairs"
        if problem:
            raise CheckpointProblem(f" is damaged: {key!r} {problem}.\n"
                                    "help: use an earlier checkpoint.")
    if not legacy:  # a zip member's CRC was checked when it was read
        for key, array in arrays.items():
            if meta["crc32"].get(key) != _crc(array):
                raise CheckpointProblem(f" is damaged (truncated or corrupted?):"
                                        f" {key!r} does not match its checksum (CRC-32).\n"
                                        "help: use an earlier checkpoint.")
    extra = sorted(set(arrays) - {key for key, _, _ in listed})
    if extra:
        raise CheckpointProblem(f" is damaged: it holds {extra[:4]}, which its "
                                "metadata does not list.\nhelp: use an earlier checkpoint.")


def _kinds(kinds: str) -> str:
    return "floating-point numbers" if kinds == "f" else "numbers" if kinds == "biuf" else \
        "numbers or strings"


def _check_fit(meta: dict[str, Any], arrays: dict[str, np.ndarray],
               params: dict[str, Any], nodes: dict[str, tuple[Any, dict[str, Any]]]) -> None:
    """Every parameter and node state of the graph is in the checkpoint with its shape, and
    nothing else is."""
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
    saved_nodes = meta["nodes"]
    for name, (node, state) in nodes.items():
        if name not in saved_nodes:
            problems.append(f"the state of {node.label} ({name!r}: {sorted(state)}) is missing "
                            "from the checkpoint")
            continue
        if sorted(saved_nodes[name]) != sorted(state):
            problems.append(f"{node.label}: state keys {sorted(state)} (this model), "
                            f"{sorted(saved_nodes[name])} (checkpoint)")
            continue
        for key, value in state.items():
            saved_value = arrays[f"node/{name}/{key}"]
            expected, actual = tuple(np.shape(value)), tuple(saved_value.shape)
            if expected != actual:
                problems.append(f"{node.label} state {key!r}: expected shape {expected} (this "
                                f"model), actual {actual} (checkpoint)")
            elif (isinstance(value, numbers.Integral) and not isinstance(value, bool)
                  and not (saved_value.dtype.kind in "iu" and int(saved_value) >= 0)):
                # a counter (Dropout's steps): damage, not another model
                raise bad_meta(f"the counter {key!r} of {node.label} is "
                               f"{saved_value.item()!r:.40}, expected an int >= 0")
    for name in saved_nodes:
        if name not in nodes:
            problems.append(f"node state {name!r} is in the checkpoint but not in this model")
    if problems:
        raise CheckpointProblem(
            f" does not fit this model:\n  " + "\n  ".join(problems) +
            f"\nhelp: build the model the checkpoint was saved from (it has "
            f"{len(saved)} parameters: {', '.join(list(saved)[:6])}"
            f"{', ...' if len(saved) > 6 else ''}).")


def _check_optimizer(meta: dict[str, Any], arrays: dict[str, np.ndarray],
                     optimizer: Any) -> dict[str, Any]:
    """The optimizer's saved state as `load_state_dict` takes it, checked against `optimizer`."""
    saved = meta["optimizer"]
    cls = type(optimizer).__name__
    if saved is None:
        raise CheckpointProblem(f" holds no optimizer state, but load was "
                                f"given {cls}.\nhelp: pass optimizer=None to load only the "
                                "parameters.")
    if saved["class"] != cls:
        raise CheckpointProblem(f" holds optimizer state of class "
                                f"{saved['class']}, but load was given {cls}.\n"
                                f"help: build the optimizer as {saved['class']} (hyper-parameters "
                                f"{saved['hyper']}), or pass optimizer=None.")
    params = {p.name: p for p in optimizer.params}
    state: dict[str, Any] = {"t": saved["t"]}
    for name, bufs in saved["buffers"].items():
        if name not in params:
            raise CheckpointProblem(f": the optimizer state names parameter "
                                    f"{name!r}, which this {cls} does not optimise (it has "
                                    f"{sorted(params)}).\nhelp: pass the optimizer of the model "
                                    "the checkpoint was saved from, or optimizer=None.")
        expected = tuple(params[name].value.shape)
        for b in bufs:
            host = arrays[f"optim/{name}/{b}"]
            if tuple(host.shape) != expected:
                raise CheckpointProblem(f": optimizer buffer {name}/{b}: "
                                        f"expected shape {expected}, actual {tuple(host.shape)}."
                                        "\nhelp: pass the optimizer of the model the checkpoint "
                                        "was saved from.")
            state[f"{name}/{b}"] = host
    return state


def _check_schedule(meta: dict[str, Any], arrays: dict[str, np.ndarray],
                    schedule: Any) -> dict[str, Any]:
    """The schedule's saved state as `load_state_dict` takes it, checked against `schedule`."""
    saved = meta["schedule"]
    cls = type(schedule).__name__
    if saved is None:
        raise CheckpointProblem(f" holds no schedule state, but load was given "
                                f"{cls}.\nhelp: pass schedule=None.")
    if saved["class"] != cls:
        raise CheckpointProblem(f" holds the state of a {saved['class']} "
                                f"schedule, but load was given {cls}.\nhelp: build a "
                                f"{saved['class']}, or pass schedule=None.")
    want = sorted(_state_of(schedule))
    if sorted(saved["state"]) != want:
        raise CheckpointProblem(f": the {cls} state has keys "
                                f"{sorted(saved['state'])}, this {cls} has {want}.\nhelp: build "
                                "the schedule the checkpoint was saved with, or schedule=None.")
    state = unpack(saved["state"], arrays, "schedule/")
    check = getattr(schedule, "check_state", None)
    if callable(check):  # its numbers (a negative epoch ...), before anything is assigned
        try:
            check(state)
        except CheckpointError as exc:
            raise bad_meta(f"schedule.state: {str(exc).splitlines()[0]}") from None
    return state


def _check_ema(meta: dict[str, Any], arrays: dict[str, np.ndarray], ema: Any,
               graph: Any) -> dict[str, Any]:
    """The EMA's saved state as `load_state_dict` takes it, checked against `ema`."""
    saved = meta["ema"]
    if getattr(ema, "graph", None) is not graph:
        raise CheckpointProblem(f": ema must be the gpuflow.optim.EMA of the "
                                f"graph being loaded, got {type(ema).__name__}.\nhelp: pass "
                                "EMA(graph), or ema=None.")
    if saved is None:
        raise CheckpointProblem(f" holds no EMA weights, but load was given "
                                "an EMA.\nhelp: pass ema=None (and start the average afresh).")
    own = {name: tuple(avg.shape) for name, avg in ema.average.items()}
    if sorted(saved["names"]) != sorted(own):
        raise CheckpointProblem(f": its EMA averages {sorted(saved['names'])}, "
                                f"this graph's parameters are {sorted(own)}.\nhelp: build the "
                                "model the checkpoint was saved from, or pass ema=None.")
    state: dict[str, Any] = {"n_averaged": saved["n_averaged"], "decay": saved["decay"]}
    for name in saved["names"]:
        host = arrays[f"ema/{name}"]
        if tuple(host.shape) != own[name]:
            raise CheckpointProblem(f": the EMA average of {name!r} has shape "
                                    f"{tuple(host.shape)}, this graph's parameter {own[name]}.\n"
                                    "help: build the model the checkpoint was saved from.")
        state[name] = host
    return state


def _check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise CheckpointProblem(f": {name} must be an int, got {value!r}.\n"
                                f"help: pass {name}=<int>.")
    return int(value)
