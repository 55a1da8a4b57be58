"""The format-1 writer as gpuflow 0.1.0 shipped it (gpuflow/checkpoint.py at abc3198), kept to
make old `.npz` checkpoints for the tests of the read path that still loads them."""

from __future__ import annotations

import json
import numbers

import numpy as np

import gpuflow as gf
from gpuflow.backends import dtype_name

_HYPER_SKIP = {"params", "state", "t"}


def legacy_save(path, graph, optimizer=None, *, step=0, epoch=0, state=None):
    """Write a format-1 checkpoint (an .npz of .npy members with JSON metadata) at `path`."""
    arrays = {}
    params = graph.named_parameters()
    for name, p in params.items():
        arrays[f"param/{name}"] = np.asarray(graph.device.to_host(p.value))
    meta = {
        "format": "gpuflow-checkpoint", "format_version": 1,
        "gpuflow_version": gf.__version__, "numpy_version": np.__version__,
        "device": graph.device.name,
        "dtype": dtype_name(graph.dtype) if graph.dtype is not None else None,
        "parameters": [{"name": name, "shape": list(arrays[f"param/{name}"].shape),
                        "dtype": str(arrays[f"param/{name}"].dtype)} for name in params],
        "optimizer": None, "step": int(step), "epoch": int(epoch), "state": {},
    }
    if optimizer is not None:
        sd = optimizer.state_dict()
        buffers = {}
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
            value = list(value) if isinstance(value, tuple) else value
            scalar = (bool, int, float, str)
            if isinstance(value, scalar) or value is None or (
                    isinstance(value, list) and all(isinstance(v, scalar) for v in value)):
                hyper[attr] = value
        cls = type(optimizer)
        meta["optimizer"] = {"class": cls.__name__, "module": cls.__module__, "hyper": hyper,
                             "t": int(sd.get("t", 0)), "buffers": buffers}
    for key, value in (state or {}).items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool):
            meta["state"][key] = {"kind": "bool", "value": value}
        elif isinstance(value, numbers.Integral):
            meta["state"][key] = {"kind": "int", "value": int(value)}
        elif isinstance(value, numbers.Real):
            meta["state"][key] = {"kind": "float", "value": float(value)}
        elif isinstance(value, str):
            meta["state"][key] = {"kind": "str", "value": value}
        else:
            meta["state"][key] = {"kind": "array"}
            arrays[f"state/{key}"] = value
    text = json.dumps(meta, sort_keys=True)
    arrays["__gpuflow__"] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
