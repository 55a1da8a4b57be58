"""The metadata of a checkpoint: extra state packed into JSON and arrays, and every field
checked for its type when a file is read, so that damaged metadata (a counter that is not an
int, a list where a number belongs, an entry without its value) is one CheckpointError naming
the file and the field, never a KeyError or TypeError from deep inside `load`. The checks
raise CheckpointProblem, without the file's path, which `load`, `save` and `read_info` add
(errors.checkpoint_path)."""

from __future__ import annotations

import json
import math
import numbers
import re
from typing import Any

import numpy as np

from ..errors import CheckpointProblem

# gpuflow's own metadata nests 5 deep (meta -> schedule -> state -> key -> value list); a file
# nested deeper is refused before json.loads, whose recursion (and that of every walk of the
# parsed value) a file nested thousands deep would exhaust: a RecursionError, not one error.
MAX_DEPTH = 64
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def check_depth(text: str) -> None:
    """CheckpointError if the JSON `text` nests arrays and objects deeper than MAX_DEPTH; one
    linear scan, no recursion (brackets inside strings do not count)."""
    depth = deepest = 0
    for bracket in _JSON_BRACKET.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_DEPTH:
        raise bad_meta(f"its JSON is nested {deepest} deep, where gpuflow's metadata "
                       f"nests at most {MAX_DEPTH} deep")


def pack(state: "dict[str, Any] | None", arrays: dict[str, np.ndarray],
         prefix: str) -> dict[str, Any]:
    """Scalars of `state` as {"kind", "value"} for the JSON; arrays go into `arrays`."""
    packed: dict[str, Any] = {}
    if state is None:
        return packed
    where = "state" if prefix == "state/" else "schedule state"
    if not isinstance(state, dict):
        raise CheckpointProblem(f": {where} must be a dict {{str: value}}, got "
                                f"{type(state).__name__}.\nhelp: pass a dict.")
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointProblem(f": {where} key {key!r} is a "
                                    f"{type(key).__name__}, not a str.\nhelp: use str keys.")
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
        elif isinstance(value, (list, tuple)) and all(
                isinstance(v, (bool, int, float)) for v in value):
            packed[key] = {"kind": "list", "value": list(value)}
        elif isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            packed[key] = {"kind": "array"}
            arrays[prefix + key] = np.asarray(value, order="C")
        elif isinstance(value, np.ndarray) and value.dtype.kind == "c":
            packed[key] = {"kind": "complex", "dtype": value.dtype.name}
            arrays[prefix + key] = np.asarray(value, order="C").view(value.real.dtype).reshape(
                value.shape + (2,))
        elif isinstance(value, np.ndarray) and value.dtype.kind in "US":
            text = [s.decode("latin-1") if isinstance(s, bytes) else s
                    for s in value.ravel().tolist()]
            packed[key] = {"kind": "strings", "dtype": value.dtype.str,
                           "shape": list(value.shape), "value": text}
        else:
            what = (f"a NumPy array of dtype {value.dtype}" if isinstance(value, np.ndarray)
                    else f"a {type(value).__name__}")
            raise CheckpointProblem(
                f": {where}[{key!r}] is {what}, which a checkpoint cannot "
                "hold without pickling.\nhelp: store ints, floats, strs, bools, lists of "
                "numbers or NumPy arrays of numbers or strings (flatten nested dicts into "
                "several keys).")
    return packed

def bad_meta(problem: str) -> CheckpointProblem:
    return CheckpointProblem(f" has damaged metadata: {problem}.\n"
                             "help: use an earlier checkpoint.")


def check_meta(meta: dict[str, Any]) -> None:
    """Every field the loader reads has the type it needs (damaged metadata is one error)."""
    meta.setdefault("nodes", {})      # absent from format 1
    meta.setdefault("schedule", None)
    meta.setdefault("amp", None)      # absent before mixed precision
    meta.setdefault("ema", None)      # absent before weight averaging
    if meta["format_version"] >= 2:
        for key, crc in _field(meta, "crc32", "dict").items():
            _expect(crc, "size", f"crc32[{key!r}]")
    _field(meta, "step", "size")   # counters: a negative one is damage (issue 18)
    _field(meta, "epoch", "size")
    _field(meta, "dtype", "str?")
    names = set()
    for i, p in enumerate(_field(meta, "parameters", "list")):
        _expect(p, "dict", f"parameters[{i}]")
        name = _field(p, "name", "str", f"parameters[{i}].")
        for j, n in enumerate(_field(p, "shape", "list", f"parameters[{i}].")):
            _expect(n, "size", f"parameters[{i}].shape[{j}]")
        if name in names:
            raise bad_meta(f"parameter {name!r} is listed twice")
        names.add(name)
    opt = _field(meta, "optimizer", "dict?")
    if opt is not None:
        _field(opt, "class", "str", "optimizer.")
        _field(opt, "hyper", "dict", "optimizer.")
        _field(opt, "t", "size", "optimizer.")
        for name, bufs in _field(opt, "buffers", "dict", "optimizer.").items():
            for j, b in enumerate(_expect(bufs, "list", f"optimizer.buffers[{name!r}]")):
                _expect(b, "str", f"optimizer.buffers[{name!r}][{j}]")
    for name, keys in _field(meta, "nodes", "dict").items():
        for j, k in enumerate(_expect(keys, "list", f"nodes[{name!r}]")):
            _expect(k, "str", f"nodes[{name!r}][{j}]")
    sched = _field(meta, "schedule", "dict?")
    if sched is not None:
        _field(sched, "class", "str", "schedule.")
        _check_packed(_field(sched, "state", "dict", "schedule."), "schedule.state")
    ema = _field(meta, "ema", "dict?")
    if ema is not None:
        _field(ema, "class", "str", "ema.")
        _field(ema, "decay", "float", "ema.")
        _field(ema, "n_averaged", "size", "ema.")
        for j, name in enumerate(_field(ema, "names", "list", "ema.")):
            _expect(name, "str", f"ema.names[{j}]")
    amp = _field(meta, "amp", "dict?")
    if amp is not None:
        _field(amp, "dtype", "str", "amp.")
        scaler = _check_packed(_field(amp, "scaler", "dict", "amp."), "amp.scaler")
        for key in ("scale", "good_steps", "skipped"):
            entry = scaler.get(key, {})
            value = entry.get("value")
            ok = entry.get("kind") in ("int", "float") and math.isfinite(value) and (
                value > 0 if key == "scale" else value >= 0)
            if not ok:
                raise bad_meta(f"amp.scaler[{key!r}] is {value!r:.40}, expected a "
                               "finite number > 0 (scale) or an int >= 0")
    _check_packed(_field(meta, "state", "dict"), "state")


def _check_packed(packed: dict[str, Any], where: str) -> dict[str, Any]:
    """Each entry of packed state is {"kind", "value"} with a value of that kind; returns
    `packed`."""
    for key, entry in packed.items():
        at = f"{where}[{key!r}]"
        _expect(entry, "dict", at)
        kind = _field(entry, "kind", "str", f"{at}.")
        if kind in ("int", "float", "str", "bool"):
            _field(entry, "value", kind, f"{at}.")
        elif kind == "list":
            for j, v in enumerate(_field(entry, "value", "list", f"{at}.")):
                _expect(v, "scalar", f"{at}.value[{j}]")
        elif kind == "complex":
            if _field(entry, "dtype", "str", f"{at}.") not in ("complex64", "complex128"):
                raise bad_meta(f"{at}.dtype is {entry['dtype']!r:.40}, not a complex dtype")
        elif kind == "strings":
            dtype = _field(entry, "dtype", "str", f"{at}.")
            shape = _field(entry, "shape", "list", f"{at}.")
            for j, n in enumerate(shape):
                _expect(n, "size", f"{at}.shape[{j}]")
            text = _field(entry, "value", "list", f"{at}.")
            for j, s in enumerate(text):
                _expect(s, "str", f"{at}.value[{j}]")
            try:  # a forged dtype ('<U99999999999') must not allocate: bounded by the text
                itemsize = np.dtype(dtype).itemsize if dtype[1:2] in ("U", "S") else -1
            except (TypeError, ValueError, OverflowError):
                itemsize = -1
            longest = max((len(s) for s in text), default=0)
            if (not 0 <= itemsize <= 4 * (longest + 64) or dtype[0] not in "<>|="
                    or len(text) != math.prod(shape)):
                raise bad_meta(f"{at} holds {len(text)} strings of dtype {dtype!r:.20} "
                                f"for shape {tuple(shape)}")
        elif kind != "array":
            raise bad_meta(f"{at} has unknown kind {kind!r:.40}")
    return packed

_TYPES: dict[str, Any] = {"int": int, "size": int, "float": (int, float), "str": str,
                          "bool": bool, "list": list, "dict": dict, "scalar": (int, float)}
_WORDS = {"int": "an int", "size": "an int >= 0", "float": "a number", "str": "a str",
          "bool": "true or false", "scalar": "a number or a bool", "list": "a list",
          "dict": "a JSON object"}


def _expect(value: Any, kind: str, what: str) -> Any:
    """`value` if it is of `kind` ('int', 'size', 'float', 'str', 'bool', 'list', 'dict'; a
    trailing '?' allows null); else the damaged-metadata error naming `what`."""
    if kind.endswith("?"):
        if value is None:
            return value
        kind = kind[:-1]
    ok = isinstance(value, _TYPES[kind]) and (
        kind in ("bool", "scalar") or not isinstance(value, bool))
    if ok and kind == "size":
        ok = value >= 0
    if not ok:
        shown = json.dumps(value) if isinstance(value, (list, dict, str)) else repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise bad_meta(f"{what} is {shown} (a {type(value).__name__}), expected "
                        f"{_WORDS[kind]}")
    return value


def _field(obj: dict[str, Any], key: str, kind: str, where: str = "") -> Any:
    if key not in obj:
        raise bad_meta(f"{where}{key} is missing")
    return _expect(obj[key], kind, f"{where}{key}")


def unpack(packed: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str) -> dict[str, Any]:
    """Packed state (checked by _check_meta and _check_contents) as Python values and arrays."""
    out: dict[str, Any] = {}
    for key, entry in packed.items():
        kind = entry["kind"]
        if kind == "array":
            out[key] = arrays[prefix + key]
        elif kind == "complex":
            pairs = np.asarray(arrays[prefix + key], dtype=np.float64)
            out[key] = (pairs[..., 0] + 1j * pairs[..., 1]).astype(entry["dtype"])
        elif kind == "strings":
            text = entry["value"]
            if "S" in entry["dtype"]:
                text = [s.encode("latin-1", "replace") for s in text]
            out[key] = np.array(text, dtype=entry["dtype"]).reshape(entry["shape"])
        elif kind == "list":
            out[key] = list(entry["value"])
        else:
            out[key] = {"int": int, "float": float, "str": str, "bool": bool}[kind](
                entry["value"])
    return out
