"""`gpuflow export CHECKPOINT --onnx PATH | --python FOLDER`: the model a checkpoint of
`gpuflow train --save` holds, rebuilt from the run's settings saved with it ("run.model",
"run.hidden", "run.dropout", "run.seed", "run.sample_shape", "run.classes"; a GPT's "run.layers",
"run.width", "run.heads", "run.context" and its "vocabulary"), its weights and BatchNorm
statistics loaded, then exported (gpuflow.export)."""

from __future__ import annotations

import types
from typing import Any

from ..errors import CheckpointError, ExportError


def rebuild(path: str) -> tuple[Any, Any, tuple[int, ...], str]:
    """(graph, logits, sample shape, description) of the model in the checkpoint `path`, on the
    cpu, in float32 (float64 for a float64 run), its weights and node state loaded. A GPT's
    sample is (context,) integer ids (any length up to it: the exported T is dynamic).
    CheckpointError for a checkpoint that does not say which model it holds."""
    from .. import checkpoint
    from ..models import build_model, saved_settings
    from ..graph import Graph

    info = checkpoint.read_info(path)
    state = info["state"]
    if "run.model" not in state or "run.hidden" not in state:
        raise CheckpointError(f"checkpoint {path!r} does not say which model it holds (no "
                              "run.model / run.hidden settings: written by an older gpuflow or "
                              "by checkpoint.save directly).\nhelp: train it again with this "
                              "gpuflow's 'gpuflow train --save', or export the graph in Python "
                              "with gpuflow.export.to_onnx / to_python.")
    saved = saved_settings(path, info)
    dtype = "float64" if saved.get("dtype") == "float64" else "float32"
    if saved["model"] == "gpt":
        return _rebuild_gpt(path, state, saved, dtype)
    shapes = {p["name"]: tuple(p["shape"]) for p in info["meta"]["parameters"]}
    sample_shape, classes = _model_shape(path, state, saved, shapes)
    opts = types.SimpleNamespace(model=saved["model"], hidden=saved["hidden"],
                                 dropout=saved.get("dropout", 0.0), seed=saved.get("seed", 0))
    X, y, logits, loss, arch = build_model(opts, sample_shape, classes)
    graph = Graph(loss, device="cpu", dtype=dtype, inputs=[X, y], outputs=[logits])
    checkpoint.load(path, graph)
    return graph, logits, sample_shape, arch


def _rebuild_gpt(path: str, state: dict, saved: dict,
                 dtype: str) -> tuple[Any, Any, tuple[int, ...], str]:
    """rebuild() for a checkpoint of `gpuflow train --model gpt`."""
    from .. import checkpoint
    from ..graph import Graph
    from ..models import build_gpt
    names = ("layers", "width", "heads", "context")
    vocabulary = state.get("vocabulary")
    if not isinstance(vocabulary, str) or any(name not in saved for name in names):
        raise CheckpointError(f"checkpoint {path!r} of a GPT run lacks its vocabulary or "
                              "sizes (run.layers, run.width, run.heads, run.context).\nhelp: "
                              "train it again with this gpuflow's 'gpuflow train --model gpt "
                              "--save'.")
    opts = types.SimpleNamespace(dropout=saved.get("dropout", 0.0), seed=saved.get("seed", 0),
                                 **{name: saved[name] for name in names})
    ids, y, logits, loss, arch = build_gpt(opts, len(vocabulary))
    graph = Graph(loss, device="cpu", dtype=dtype, inputs=[ids, y], outputs=[logits])
    checkpoint.load(path, graph)
    return graph, logits, (opts.context,), arch


def _model_shape(path: str, state: dict, saved: dict,
                 shapes: dict) -> tuple[tuple[int, ...], int]:
    """(the shape of one sample, the number of classes): saved since run.sample_shape was
    added; before, from the parameters' shapes (an MLP's first and last W) or, for a CNN, the
    bundled digits' 1x8x8."""
    if "run.sample_shape" in state and "run.classes" in state:
        return tuple(int(s) for s in state["run.sample_shape"]), int(state["run.classes"])
    matrices = [shape for shape in shapes.values() if len(shape) == 2]
    if matrices and saved["model"] == "mlp":
        return (matrices[0][0],), matrices[-1][1]
    if matrices and saved["model"] == "cnn" and saved.get("data") is None:
        return (1, 8, 8), matrices[-1][1]
    raise CheckpointError(f"checkpoint {path!r} does not say the shape of its images (no "
                          "run.sample_shape, written by an older gpuflow).\nhelp: train it "
                          "again with this gpuflow's 'gpuflow train --save'.")


def export_checkpoint(path: str, *, onnx: str | None = None, python: str | None = None,
                      opset: int | None = None) -> int:
    """Write the checkpoint's model as ONNX (`onnx`) and/or a standalone module (`python`);
    prints what it wrote. Returns 0."""
    if onnx is None and python is None:
        raise ExportError("nothing to write: pass --onnx PATH, --python FOLDER, or both.\n"
                          "help: e.g. gpuflow export run.safetensors --onnx model.onnx.")
    if opset is not None and onnx is None:
        raise ExportError("--opset is for --onnx.\nhelp: add --onnx PATH, or drop --opset.")
    from . import to_onnx, to_python
    from .core import check_target
    from .onnx_export import _require_onnx
    if onnx is not None:  # checked before anything is loaded or written
        _require_onnx()
        check_target(onnx, "--onnx")
    if python is not None:
        check_target(python, "--python", folder=True)
    graph, logits, sample_shape, arch = rebuild(path)
    import numpy as np
    gpt = arch.startswith("GPT (")  # character ids (N, T), T <= the context
    example = np.zeros((2, *sample_shape), dtype=np.int64 if gpt else graph.dtype)
    shown = (f"ids (N, T <= {sample_shape[0]}), the characters' indices in the checkpoint's "
             "vocabulary" if gpt else f"X (N, {', '.join(map(str, sample_shape))})")
    if onnx is not None:
        to_onnx(graph, onnx, logits, example=example, opset=opset)
        print(f"wrote {onnx}: the {arch}, ONNX, input {shown}, output the logits")
    if python is not None:
        written = to_python(graph, python, logits, example=example)
        print(f"wrote {written} and {written.parent / 'weights.safetensors'}: the {arch}, "
              "runs without gpuflow (predict(X, load(path, xp)))")
    return 0
