"""`gpuflow train --model mlp | cnn`: a classifier trained for --epochs and measured on held-out
data after every epoch (cli/textrun.py is the GPT run). `train_classifier` reads top to bottom:

    run = _set_up(opts, _load_data(opts))   # host data; device, model, graph, optimizer, batches
    _resume(run)                            # --resume: weights, optimizer, schedule, batch order
    _put_held_out(run)                      # the held-out set goes to the device once
    _announce(run)                          # what trains where, said once
    for each epoch: _train_epoch, _accuracy, one line, _save   # the loop
    return _finish(run, started)            # final accuracy, --plot, the summary, result

`run` (a _Run) carries what the steps share; the per-batch loop in _train_epoch reads it into
locals first, so the steps add no work per batch. Under `mpiexec -n N` every rank runs every
step (gpuflow.distributed); only rank 0 prints, saves and plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from typing import Any

from .. import checkpoint, distributed
from ..accumulate import split_batch
from ..backends import get_device
from ..commandline import CommandError
from ..data import Batches, load_digits, load_mnist, train_test_split
from ..errors import CheckpointError, GpuflowError
from ..graph import Graph
from ..models import build_model
from ..optim import clip_grad_norm, make_optimizer
from ..runtime import placement
from .plot import plot_curves
from .runs import another_model, checkpoint_state, follow_epochs, make_schedule, model_state

EVAL_CHUNK = 1024   # rows per forward pass when measuring accuracy


@dataclasses.dataclass
class _Data:
    """The run's host arrays (float32 in [0, 1], int64 labels) and where they came from."""

    X_train: Any
    y_train: Any
    X_test: Any
    y_test: Any
    n_classes: int
    source: str


@dataclasses.dataclass
class _Run:
    """What the steps of one classifier run share (`opts` is a cli.TrainOptions)."""

    opts: Any
    data: _Data
    ctx: Any                    # gpuflow.distributed's context (one rank: a no-op)
    say: bool                   # print progress: not --quiet, and rank 0
    device: Any
    graph: Graph
    logits: Any
    arch: str                   # the model, in words
    optimizer: Any
    schedule: Any               # None: a constant rate
    batches: Any
    per_step: int               # samples per optimizer step (--batch-size x --accumulate)
    carried: str = ""           # --resume: the settings taken from the checkpoint, in words
    start_epoch: int = 0
    step: int = 0               # optimizer steps done
    losses: list[float] = dataclasses.field(default_factory=list)
    accuracies: list[float] = dataclasses.field(default_factory=list)
    X_test: Any = None          # the held-out set on the device
    y_test: Any = None
    devices: list[str] = dataclasses.field(default_factory=list)  # every rank's device name


def train_classifier(opts: Any, started: float, carried: str = "") -> dict[str, Any]:
    """`gpuflow train` for --model mlp or cnn after its options are checked (cli.train; with
    --resume completed from the checkpoint: `carried` says what was taken). Returns cli.train's
    result dict."""
    run = _set_up(opts, _load_data(opts))
    run.carried = carried
    if opts.resume is not None:
        _resume(run)
    _put_held_out(run)
    _announce(run)
    run.step = run.optimizer.t
    with _numpy_warnings_off(opts.check_finite):
        for epoch in range(run.start_epoch, opts.epochs):
            epoch_start = time.perf_counter()
            run.losses.append(_train_epoch(run, epoch))
            run.accuracies.append(_accuracy(run))
            if run.say:
                seconds = time.perf_counter() - epoch_start
                print(f"epoch {epoch + 1:3d}/{opts.epochs}  train loss {run.losses[-1]:.4f}  "
                      f"test accuracy {run.accuracies[-1]:.4f}  ({seconds:.2f} s)")
            _save(run, epoch + 1)
    return _finish(run, started)


def _load_data(opts: Any) -> _Data:
    """The bundled digits split by --test-size and --seed, or an MNIST folder's train and test
    sets; for --model cnn as one-channel square images (1x8x8, 1x28x28)."""
    if opts.data is None:
        X, y = load_digits()
        X_train, X_test, y_train, y_test = train_test_split(
            X, y, test_size=opts.test_size, seed=opts.seed)
        source = "bundled digits"
    else:
        X_train, y_train = load_mnist(opts.data, "train")
        X_test, y_test = load_mnist(opts.data, "test")
        source = str(opts.data)
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    if opts.model == "cnn":
        X_train, X_test = _as_images(X_train), _as_images(X_test)
    return _Data(X_train, y_train, X_test, y_test, n_classes, source)


def _set_up(opts: Any, data: _Data) -> _Run:
    """The device (under mpiexec one per rank; --device fastest: timed on the first batch), the
    model and its graph, the optimizer and --schedule, and the batches (each rank a slice of
    every global batch under mpiexec)."""
    ctx = distributed.init()
    fastest = placement.is_fastest(opts.device)
    if fastest and ctx.size > 1:
        raise CommandError(f"--device {opts.device} under mpiexec: every rank needs its own "
                           "device.\nhelp: pass --device cuda (each rank takes its GPU) or "
                           "--device cpu.")
    candidates = placement.fastest_candidates(opts.device) if fastest else []
    device = get_device(candidates[0] if fastest else ctx.device_spec(opts.device))
    X_in, y_in, logits, loss, arch = build_model(opts, data.X_train.shape[1:], data.n_classes)
    graph = Graph(loss, device=device, dtype=opts.dtype, inputs=[X_in, y_in], outputs=[logits],
                  check_finite=opts.check_finite)
    if fastest:  # as Graph(device='fastest') does at its first step, but before the optimizer
        # and a checkpoint put their state on a device: time the first batch on each one
        placement.choose_fastest(graph, (data.X_train[:opts.batch_size],
                                         data.y_train[:opts.batch_size]), candidates)
        device = graph.device
    optimizer = make_optimizer(opts.optimizer, graph, opts.lr)
    schedule = make_schedule(opts.schedule, optimizer, opts.epochs)
    ctx.broadcast_parameters(graph)  # every rank starts from rank 0's weights
    per_step = opts.batch_size * opts.accumulate  # --accumulate K: K micro-batches per step
    batches = (ctx.batches(data.X_train, data.y_train, per_step, seed=opts.seed) if ctx.size > 1
               else Batches(data.X_train, data.y_train, per_step, seed=opts.seed))
    return _Run(opts, data, ctx, not opts.quiet and ctx.is_root, device, graph, logits, arch,
                optimizer, schedule, batches, per_step)


def _resume(run: _Run) -> None:
    """--resume: the checkpoint's weights, optimizer and schedule (which follows a new --epochs
    total), its epoch, batch order and history. Another model's checkpoint is refused with a
    summary of both models; a file without gpuflow train's state with one error naming it."""
    opts = run.opts
    try:
        restored = checkpoint.load(opts.resume, run.graph, run.optimizer, schedule=run.schedule)
    except CheckpointError as exc:
        raise another_model(opts, run.graph, run.arch, exc) or exc from None
    if run.schedule is not None:
        run.schedule, rebuilt = follow_epochs(opts.schedule, run.schedule, run.optimizer,
                                              opts.epochs)
        run.carried = "\n".join(filter(None, [run.carried, rebuilt]))
    run.start_epoch, state = int(restored["epoch"]), restored["state"] or {}
    try:  # a checkpoint saved by another program may hold other state: one error, the file
        run.batches.load_state_dict({"epoch": state.get("batches_epoch", run.start_epoch),
                                     "seed": state.get("batches_seed", opts.seed)})
        run.losses = [float(v) for v in state.get("losses", [])][:run.start_epoch]
        run.accuracies = [float(v) for v in state.get("accuracies", [])][:run.start_epoch]
    except (GpuflowError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {opts.resume!r} holds no state of gpuflow train "
                              f"({str(exc).splitlines()[0]}).\nhelp: resume from a file "
                              "written by gpuflow train --save.") from None


def _put_held_out(run: _Run) -> None:
    """The held-out set goes to the device once; accuracy is counted there (_accuracy)."""
    run.X_test = run.device.put(run.data.X_test, run.graph.dtype, what="test images")
    run.y_test = run.device.put(run.data.y_test, what="test labels")


def _announce(run: _Run) -> None:
    """The lines said before training: the model, data, device and settings, the ranks, what
    --resume took, and why nothing is trained or the first step waits."""
    opts, ctx, device, data = run.opts, run.ctx, run.device, run.data
    run.devices = ctx.allgather(device.name)  # every rank takes part
    if run.say:
        # 'auto' without a GPU: said once, here, not as CuPy's import error on every run.
        why = (" ('auto': no CUDA GPU found; 'gpuflow devices' says why)"
               if opts.device.strip().lower() == "auto" and not device.is_gpu else "")
        print(f"training a {run.arch} on {data.source} ({len(data.X_train)} train, "
              f"{len(data.X_test)} test) on {device.name}{why}, {opts.dtype}, {opts.optimizer} "
              f"lr {opts.lr:g}, batch {opts.batch_size}"
              + (f", {opts.accumulate} accumulated per step" if opts.accumulate > 1 else ""))
        if ctx.size > 1:
            print(f"data-parallel over {ctx.size} MPI ranks, devices {', '.join(run.devices)}; "
                  f"each rank takes a slice of every batch of {run.per_step}")
        if opts.resume is not None:
            print(f"resumed from {opts.resume} at epoch {run.start_epoch}")
        if run.carried:
            print(run.carried)
        if run.schedule is not None or opts.clip is not None:
            print(f"schedule: {run.schedule!r}" if run.schedule is not None else "schedule: none",
                  f"clip: global gradient norm <= {opts.clip:g}" if opts.clip else "clip: off",
                  sep="; ")
    if run.start_epoch >= opts.epochs and run.say:
        print(f"the checkpoint is already at epoch {run.start_epoch} >= --epochs {opts.epochs}; "
              f"nothing to train (pass --epochs {run.start_epoch + 1} or more to train on)")
    if run.say and device.compiles_first_step and run.start_epoch < opts.epochs:
        print(f"compiling the step for {device.name} (first step only)...", flush=True)


def _train_epoch(run: _Run, epoch: int) -> float:
    """One pass over the batches, one optimizer step per batch (--accumulate: per K
    micro-batches), then one --schedule step; returns the epoch's mean training loss."""
    opts, graph, optimizer, ctx = run.opts, run.graph, run.optimizer, run.ctx
    step = run.step
    total = None  # sum of batch losses weighted by batch size, kept on the device
    bar = _progress(run.batches, f"epoch {epoch + 1}/{opts.epochs}", not run.say)
    refresh = max(1, len(run.batches) // 10)
    for i, (Xb, yb) in enumerate(bar):
        value = (graph.step(Xb, yb) if opts.accumulate == 1 else  # the mean loss
                 graph.accumulate_step(split_batch(opts.accumulate, Xb, yb)))
        ctx.allreduce_gradients(graph)  # the whole batch's mean gradient, on every rank
        if opts.clip is not None:  # the global norm of the whole batch's gradient
            clip_grad_norm(graph, opts.clip)
        optimizer.step()
        step += 1
        weighted = value * len(yb)
        total = weighted if total is None else total + weighted
        if not bar.disable and i % refresh == 0:  # one sync now and then, for the bar
            bar.set_postfix(loss=f"{graph.item(value):.4f}", refresh=False)
    bar.close()
    run.step = step
    if run.schedule is not None:  # once per epoch, as PyTorch's schedulers
        run.schedule.step()
    return ctx.sum_scalar(graph.item(total)) / run.batches.num_samples


def _accuracy(run: _Run) -> float:
    return held_out_accuracy(run.graph, run.logits, run.X_test, run.y_test)


def _save(run: _Run, epoch: int) -> None:
    """--save after `epoch` epochs: weights, optimizer, schedule, batch order, history and the
    run's settings (for --resume and gpuflow export); by rank 0, as every rank holds the same."""
    opts = run.opts
    if opts.save is not None and run.ctx.is_root:
        checkpoint.save(opts.save, run.graph, run.optimizer, schedule=run.schedule,
                        step=run.step, epoch=epoch,
                        state={**checkpoint_state(run.batches, run.losses, run.accuracies, opts),
                               **model_state(run.data.X_train.shape[1:], run.data.n_classes)})


def _finish(run: _Run, started: float) -> dict[str, Any]:
    """The final held-out accuracy, --plot, the summary lines, and cli.train's result dict."""
    opts, ctx, device = run.opts, run.ctx, run.device
    final = (run.accuracies[-1] if run.accuracies and run.start_epoch < opts.epochs
             else _accuracy(run))
    seconds = time.perf_counter() - started
    if opts.plot is not None and ctx.is_root:
        plot_curves(opts.plot, run.losses, run.accuracies)
    ctx.print(f"final test accuracy: {final:.4f}")
    ctx.print(f"device: {device.name} ({device.describe()})"
              + (f"; {ctx.size} ranks on {', '.join(run.devices)}" if ctx.size > 1 else ""))
    ctx.print(f"time: {seconds:.2f} s for {max(0, opts.epochs - run.start_epoch)} epoch(s)"
              + (f"; curves saved to {opts.plot}" if opts.plot else ""))
    return {
        "accuracy": final, "losses": run.losses, "accuracies": run.accuracies,
        "device": device.name, "device_description": device.describe(),
        "seconds": seconds, "epoch": max(run.start_epoch, opts.epochs),
        "start_epoch": run.start_epoch, "lr": float(run.optimizer.lr),
        "parameters": {name: device.to_host(p.value, what=name)
                       for name, p in run.graph.named_parameters().items()},
    }


def _as_images(X: Any) -> Any:
    """(n, side * side) pixels as (n, 1, side, side) images; ValueError unless square."""
    side = math.isqrt(X.shape[1])
    if side * side != X.shape[1]:
        raise ValueError(f"--model cnn needs square one-channel images; the data has "
                         f"{X.shape[1]} pixels per example, not a square number.\n"
                         "help: use --model mlp for this data.")
    return X.reshape(-1, 1, side, side)


def _numpy_warnings_off(off: bool) -> Any:
    """With --check-finite the check reports the first NaN/Inf itself, naming the node: NumPy's
    overflow warnings before it would only bury that one line."""
    if not off:
        return contextlib.nullcontext()
    import numpy as np
    return np.errstate(over="ignore", invalid="ignore", divide="ignore")


def held_out_accuracy(graph: Any, logits: Any, X: Any, y: Any, chunk: int = EVAL_CHUNK) -> float:
    """Fraction of rows of X (on the graph's device) whose argmax logit equals y.

    Forward only, in chunks; argmax and the comparison run on the device, and the count is
    read once as a single scalar.
    """
    xp = graph.device.xp
    n = int(X.shape[0])
    correct = None
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)  # array_api_strict refuses out-of-range slice stops
        scores = graph.run(logits, X[start:stop, ...])
        hits = xp.sum(xp.astype(xp.argmax(scores, axis=1) == y[start:stop], xp.int64))
        correct = hits if correct is None else correct + hits
    return graph.item(correct) / n


def _progress(batches: Any, desc: str, quiet: bool) -> Any:
    """A tqdm bar over `batches` on stderr; off with --quiet or when stderr is not a terminal."""
    from tqdm.auto import tqdm
    return tqdm(batches, desc=desc, unit="batch", leave=False, file=sys.stderr,
                disable=True if quiet else None, dynamic_ncols=True)
