"""`gpuflow train --model gpt`: a character-level GPT (gf.layers.gpt) on a text, measured in
optimizer steps, not epochs.

    gpuflow train --model gpt                       # the bundled corpus (pydoc_data.topics)
    gpuflow train --model gpt --data book.txt --steps 2000 --save run.safetensors
    gpuflow train --resume run.safetensors --steps 3000   # continue to 3000 steps in total

The defaults (2 blocks, width 128, 4 heads, context 64, AdamW lr 3e-3 with a linear warm-up
over the first tenth of the steps then a cosine to 0, stepped once per optimizer step, the
global gradient norm clipped at 1.0, batch 32, no dropout, 1000 steps) are nanoGPT's
character-level recipe at a size a 2-core CPU trains in minutes. The last tenth of the text is
held out (gpuflow.data.SequenceBatches' tail): every --eval-every steps and at the end the run
prints the mean training loss since the last report and the held-out loss over the whole tail,
both in nats per character, then a sampled paragraph (gf.generate, seeded by --seed).
Checkpoints (--save, written at every report) hold the run's settings, the vocabulary and
the batch order, so --resume continues bit for bit and `gpuflow export` rebuilds the model.
"""

from __future__ import annotations

import math
import time
from typing import Any

from .. import checkpoint
from ..accumulate import split_batch
from ..commandline import CommandError
from ..data import SequenceBatches, load_text
from ..errors import CheckpointError, DataError, GpuflowError, check_int
from ..generate import generate
from ..graph import Graph
from ..models import build_gpt
from ..optim import clip_grad_norm, make_optimizer
from ..runtime.placement import is_fastest
from .runs import follow_epochs, make_schedule, run_state

# The GPT run's defaults where they differ from the classifier's (taken when not given).
DEFAULTS = {"lr": 3e-3, "batch_size": 32, "optimizer": "adamw", "clip": 1.0,
            "schedule": "warmup-cosine"}
SIZES = ("steps", "eval_every", "layers", "width", "heads", "context")  # --model gpt only
NOT_FOR_GPT = ("epochs", "hidden", "plot", "test_size")
HELD_OUT = 0.1          # the last tenth of the text
SAMPLE = 400            # characters sampled at the end
TEMPERATURE = 0.8


def add_arguments(parser: Any) -> None:
    """The options of `gpuflow train` that only --model gpt takes."""
    group = parser.add_argument_group(
        "--model gpt (a character-level GPT; defaults there: --lr 3e-3 --batch-size 32 "
        "--optimizer adamw --clip 1.0 --schedule warmup-cosine, stepped per step)")
    group.add_argument("--steps", type=int, metavar="N",
                       help="total optimizer steps: a GPT run is measured in steps, not "
                            "--epochs (with --resume: the new total; default 1000)")
    group.add_argument("--eval-every", type=int, metavar="N",
                       help="print the held-out loss (nats/char) and write --save every N "
                            "steps, and at the end (default 100)")
    group.add_argument("--layers", type=int, metavar="N", help="transformer blocks (default 2)")
    group.add_argument("--width", type=int, metavar="N", help="embedding width (default 128)")
    group.add_argument("--heads", type=int, metavar="N",
                       help="attention heads, dividing --width (default 4)")
    group.add_argument("--context", type=int, metavar="T",
                       help="characters per training window (default 64)")


def take_defaults(opts: Any) -> None:
    """The GPT run's DEFAULTS for the options not given (before --resume takes the run's)."""
    for name, value in DEFAULTS.items():
        if name not in opts.given:
            setattr(opts, name, value)


def check(opts: Any) -> None:
    """The GPT options: sizes >= 1, heads dividing the width; the classifier's options that a
    GPT run does not take, and the GPT's options on another model, refused with the fix."""
    given = opts.explicit()
    if opts.model != "gpt":
        wrong = [name for name in SIZES if name in given]
        if wrong:
            raise CommandError(f"--{wrong[0].replace('_', '-')} is an option of --model gpt, "
                               f"not of --model {opts.model}.\nhelp: add --model gpt, or drop "
                               f"it (a {opts.model} run is measured in --epochs).")
        return
    for name in SIZES:
        check_int(getattr(opts, name), f"--{name.replace('_', '-')}", 1)
    if opts.width % opts.heads:
        raise CommandError(f"--heads {opts.heads} does not divide --width {opts.width} (each "
                           "head takes width / heads features).\nhelp: e.g. --width "
                           f"{opts.width - opts.width % opts.heads or opts.heads} --heads "
                           f"{opts.heads}.")
    wrong = [name for name in NOT_FOR_GPT if name in given]
    if wrong:
        fix = "--steps N" if wrong[0] == "epochs" else "nothing"
        raise CommandError(f"--{wrong[0].replace('_', '-')} is not an option of --model gpt."
                           f"\nhelp: pass {fix} instead (see 'gpuflow train --help').")
    if is_fastest(opts.device):
        raise CommandError("--device fastest is not available for --model gpt.\nhelp: name "
                           "the device, e.g. --device cpu.")


def held_out_loss(graph: Any, loss: Any, batches: SequenceBatches) -> float:
    """The mean loss over every position of the held-out tail, in nats per character."""
    total, count = 0.0, 0
    for x, y in batches.held_out_batches():
        total += graph.item(graph.run(loss, x, y)) * x.size
        count += x.size
    return total / count


def train_gpt(opts: Any, started: float, carried: str = "") -> dict[str, Any]:
    """`gpuflow train --model gpt` after its options are checked (cli.train). Returns
    {"held_out": the last held-out loss (nats/char), "history": [(step, train loss, held-out
    loss), ...], "sample": the text sampled at the end, "device", "device_description",
    "seconds", "step", "start_step", "lr", "parameters": {name: NumPy array}}."""
    from ..backends import get_device
    say = not opts.quiet
    vocabulary = None
    if opts.resume is not None:  # the ids of the run: its own vocabulary
        vocabulary = checkpoint.read_info(opts.resume)["state"].get("vocabulary")
        if not isinstance(vocabulary, str):
            raise CheckpointError(f"checkpoint {opts.resume!r} holds no vocabulary of a GPT "
                                  "run.\nhelp: resume from a file written by gpuflow train "
                                  "--model gpt --save.")
    source = opts.data if opts.data is not None else "python-docs"
    text_ids, vocabulary = load_text(source, vocabulary=vocabulary)
    per_step = opts.batch_size * opts.accumulate
    windows = (len(text_ids) - math.ceil(HELD_OUT * len(text_ids)) - 1) // opts.context
    if windows < per_step:  # as SequenceBatches cuts the text
        raise DataError(f"{source}: the training part holds {max(0, windows)} windows of "
                        f"{opts.context} characters, fewer than one batch of {per_step}.\n"
                        "help: pass a longer text, or a smaller --batch-size or --context.")
    batches = SequenceBatches(text_ids, opts.context, per_step, seed=opts.seed,
                              held_out=HELD_OUT, drop_last=True)
    device = get_device(opts.device)
    ids, y, logits, loss, arch = build_gpt(opts, len(vocabulary))
    graph = Graph(loss, device=device, dtype=opts.dtype, inputs=[ids, y], outputs=[logits],
                  check_finite=opts.check_finite)
    optimizer = make_optimizer(opts.optimizer, graph, opts.lr)
    schedule = make_schedule(opts.schedule, optimizer, opts.steps)
    history: list[list[float]] = []   # [step, train loss, held-out loss] at each report
    start = 0
    if opts.resume is not None:
        restored = checkpoint.load(opts.resume, graph, optimizer, schedule=schedule)
        start, state = int(restored["step"]), restored["state"]
        if schedule is not None:
            schedule, rebuilt = follow_epochs(opts.schedule, schedule, optimizer, opts.steps,
                                              unit="steps")
            carried = "\n".join(filter(None, [carried, rebuilt]))
        try:
            rows = [float(v) for v in state.get("history", [])]
            history = [rows[i:i + 3] for i in range(0, len(rows) - 2, 3)]
            batches.load_state_dict({"epoch": start // len(batches),
                                     "seed": state.get("batches_seed", opts.seed)})
        except (GpuflowError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {opts.resume!r} holds no state of gpuflow train "
                                  f"({str(exc).splitlines()[0]}).\nhelp: resume from a file "
                                  "written by gpuflow train --model gpt --save.") from None
    if say:
        print(f"training a {arch} on {source} ({batches.n_train} characters, the last "
              f"{len(text_ids) - batches.n_train} held out) on {device.name}, {opts.dtype}, "
              f"{opts.optimizer} lr {opts.lr:g}, batch {opts.batch_size}"
              + (f" x {opts.accumulate} accumulated" if opts.accumulate > 1 else "")
              + f", {opts.steps} steps")
        for line in ([f"resumed from {opts.resume} at step {start}"] if opts.resume else []) + (
                [carried] if carried else []):
            print(line)
        print(f"schedule: {schedule!r}" if schedule is not None else "schedule: none",
              f"clip: global gradient norm <= {opts.clip:g}" if opts.clip else "clip: off",
              sep="; ")
        if start >= opts.steps:
            print(f"the checkpoint is already at step {start} >= --steps {opts.steps}; nothing "
                  f"to train (pass --steps {start + opts.eval_every} or more to train on)")

    def stream() -> Any:  # the batches from step `start` on, epoch after epoch
        skip = start % len(batches)
        while True:
            for i, batch in enumerate(batches):
                if i >= skip:
                    yield batch
            skip = 0

    step, total, since, clock = start, None, 0, time.perf_counter()
    for x, t in stream() if start < opts.steps else ():
        value = (graph.step(x, t) if opts.accumulate == 1 else
                 graph.accumulate_step(split_batch(opts.accumulate, x, t)))
        if opts.clip is not None:
            clip_grad_norm(graph, opts.clip)
        optimizer.step()
        if schedule is not None:  # once per optimizer step
            schedule.step()
        step, since = step + 1, since + 1
        total = value if total is None else total + value
        if step % opts.eval_every and step < opts.steps:
            continue
        history.append([float(step), graph.item(total) / since,
                        held_out_loss(graph, loss, batches)])
        if say:
            print(f"step {step:5d}/{opts.steps}  train loss {history[-1][1]:.4f}  held-out "
                  f"{history[-1][2]:.4f} nats/char  ({time.perf_counter() - clock:.1f} s)",
                  flush=True)
        if opts.save is not None:
            checkpoint.save(opts.save, graph, optimizer, schedule=schedule, step=step,
                            epoch=batches.epoch, state={
                                **run_state(opts), "vocabulary": vocabulary,
                                "batches_seed": batches.seed,
                                "history": [v for row in history for v in row]})
        total, since = None, 0
        if step >= opts.steps:
            break

    prompt = "The " if all(c in vocabulary for c in "The ") else vocabulary[text_ids[0]]
    sample = "".join(vocabulary[i] for i in generate(
        graph, logits, [vocabulary.index(c) for c in prompt], SAMPLE, seed=opts.seed,
        temperature=TEMPERATURE, context=opts.context))
    seconds = time.perf_counter() - started
    held_out = history[-1][2] if history else held_out_loss(graph, loss, batches)
    print(f"sample (temperature {TEMPERATURE:g}, seed {opts.seed}):\n{sample}")
    print(f"held-out loss: {held_out:.4f} nats/char")
    print(f"device: {device.name} ({device.describe()})")
    print(f"time: {seconds:.2f} s for {max(0, opts.steps - start)} step(s)")
    return {"held_out": held_out, "history": history, "sample": sample, "device": device.name,
            "device_description": device.describe(), "seconds": seconds,
            "step": max(start, step), "start_step": start, "lr": float(optimizer.lr),
            "parameters": {name: device.to_host(p.value, what=name)
                           for name, p in graph.named_parameters().items()}}
