"""onnxruntime vs gpuflow: inference time of the digits CNN exported with gpuflow.export.to_onnx.

    python benchmarks/export_onnx.py                 # batch 1 and 256, 1 thread each
    python benchmarks/export_onnx.py --threads 2 --ndonnx

The CNN is `gpuflow train --model cnn`'s (conv 16-32 with BatchNorm, 2x2 max pooling, dense
64, Dropout 0.25), trained a few steps. Each round times one forward pass of each, side by side
(gpuflow's `Graph.run` in evaluation mode on --device, onnxruntime's CPU session); the medians
over the rounds are printed, with the largest difference seen between the two over the whole
held-out set. --ndonnx also traces the standalone module's `predict` through ndonnx (the other
way to build the ONNX graph; see gpuflow/export/__init__.py) and times that graph too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpuflow as gf  # noqa: E402
from gpuflow.cli import TrainOptions, build_model  # noqa: E402
from gpuflow.data import load_digits  # noqa: E402
from gpuflow.export import to_onnx, to_python  # noqa: E402
from gpuflow.timing import Steps, time_block  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="gpuflow's device (default cpu)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for both: gf.set_num_threads and onnxruntime's "
                             "intra_op_num_threads (default 1)")
    parser.add_argument("--rounds", type=int, default=50, help="timed rounds per batch size")
    parser.add_argument("--ndonnx", action="store_true", help="also time an ndonnx trace")
    args = parser.parse_args()
    import onnxruntime as ort

    X, y = load_digits()
    images = X.reshape(-1, 1, 8, 8).astype(np.float32)
    opts = TrainOptions(model="cnn")
    opts.check()
    X_in, y_in, logits, loss, arch = build_model(opts, (1, 8, 8), 10)
    graph = gf.Graph(loss, device=args.device, inputs=[X_in, y_in], outputs=[logits])
    gf.set_num_threads(args.threads)
    opt = gf.optim.Adam(graph.parameters, lr=1e-3)
    for i in range(10):
        graph.step(images[64 * i:64 * (i + 1)], y[64 * i:64 * (i + 1)])
        opt.step()
    folder = Path(tempfile.mkdtemp())
    to_onnx(graph, folder / "cnn.onnx", logits, example=images[:1])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = args.threads
    session = ort.InferenceSession(str(folder / "cnn.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    print(f"{arch}; gpuflow {gf.__version__} on {graph.device.name}, onnxruntime "
          f"{ort.__version__} (CPU), {args.threads} thread(s), float32")

    worst_abs = worst_rel = 0.0
    for start in range(0, len(images), 256):  # every image, at the largest batch
        x = images[start:start + 256]
        ours = gf.to_numpy(graph.run(logits, x))
        theirs = session.run(None, {"X": x})[0]
        worst_abs = max(worst_abs, float(np.max(np.abs(ours - theirs))))
        worst_rel = max(worst_rel, float(np.max(np.abs(ours - theirs)) / np.max(np.abs(ours))))

    sessions = {"onnxruntime": session}
    if args.ndonnx:
        sessions.update(_ndonnx_sessions(graph, logits, images, folder, options, ort))
    print(f"{'batch':>5}  {'gpuflow ms':>10}  " + "  ".join(f"{k + ' ms':>14}" for k in sessions))
    for batch in (1, 256):
        x = images[:batch]
        times: dict[str, list[float]] = {"gpuflow": [], **{k: [] for k in sessions}}
        runs = {"gpuflow": Steps(lambda: graph.item(graph.run(logits, x)[0, 0]))}  # waits
        runs.update({name: Steps(lambda s=s: s.run(None, {s.get_inputs()[0].name: x}))
                     for name, s in sessions.items()
                     if name != "ndonnx" or batch == 256})  # traced with a fixed batch of 256
        for _ in range(3 + args.rounds):  # 3 rounds of warm-up
            for name, v in runs.items():
                times[name].append(time_block(v, 1)[0])
        times = {k: t[3:] for k, t in times.items()}
        row = [f"{1e3 * statistics.median(t):10.3f}" if t else f"{'-':>10}"
               for t in times.values()]
        print(f"{batch:5d}  {row[0]}  " + "  ".join(f"{r:>14}" for r in row[1:]))
    print(f"largest difference over the {len(images)} digits: {worst_abs:.2e} absolute, "
          f"{worst_rel:.2e} relative to the largest logit")


def _ndonnx_sessions(graph, logits, images, folder, options, ort) -> dict:
    """The standalone module's predict traced by ndonnx (batch fixed at 256: a dynamic one
    fails, the forward code makes arrays of the input's shape)."""
    import ndonnx as ndx
    import importlib.util
    to_python(graph, folder / "py", logits, example=images[:1])
    spec = importlib.util.spec_from_file_location("exported", folder / "py" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    weights = {k: ndx.asarray(v) for k, v in
               module.load(str(folder / "py" / "weights.safetensors"), np).items()}
    try:
        module.predict(ndx.argument(shape=("N", 1, 8, 8), dtype=ndx.float32), weights)
        print("ndonnx: traced with a dynamic batch")
    except Exception as exc:
        print(f"ndonnx: a dynamic batch fails ({type(exc).__name__}: {str(exc)[:70]}); "
              "traced at batch 256")
    x = ndx.argument(shape=(256, 1, 8, 8), dtype=ndx.float32)
    proto = ndx.build({"X": x}, {"logits": module.predict(x, weights)})
    ops = [n.op_type for n in proto.graph.node]
    import onnx
    print(f"ndonnx graph: {len(ops)} operators ({ops.count('Constant')} Constants); "
          f"onnx.helper mapping: {len(onnx.load(str(folder / 'cnn.onnx')).graph.node)}")
    (folder / "nd.onnx").write_bytes(proto.SerializeToString())
    return {"ndonnx": ort.InferenceSession(str(folder / "nd.onnx"), options,
                                           providers=["CPUExecutionProvider"])}


if __name__ == "__main__":
    main()
