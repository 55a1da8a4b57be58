"""The `gpuflow` command: `train` a classifier, `export` it, list `devices`, run `bench`.

    gpuflow train                      # 64-128-10 MLP on the bundled digits, device 'auto'
    gpuflow train --device cpu --epochs 5 --hidden 256 128 --optimizer sgd --lr 0.1
    gpuflow train --data ~/mnist --save run.safetensors   # MNIST IDX folder or mnist.npz
    gpuflow train --resume run.safetensors --epochs 40    # continue to 40 epochs in total,
                                       # with the run's settings (model, --clip, --schedule...)
    gpuflow train --check-finite --lr 10             # stop at the first NaN/Inf, naming the node
    gpuflow train --model cnn --dropout 0.25         # a LeNet-style CNN on 1x8x8 (1x28x28) images
    gpuflow train --schedule cosine --clip 1.0       # anneal the rate per epoch, clip the norm
    gpuflow train --batch-size 32 --accumulate 4     # one optimizer step per 4 batches of 32
    gpuflow export run.safetensors --onnx model.onnx    # or --python FOLDER (gpuflow.export)
    gpuflow train --model cnn --recompute            # recompute each block's values in backward
    gpuflow train --model gpt --steps 1000           # a character-level GPT (cli/textrun.py)
    gpuflow devices                    # every backend and device, available or not, and why
    gpuflow bench ...                  # gpuflow.bench.main(...)

The training loop is `train(options)`, which tests call directly and which trains
data-parallel when started under `mpiexec -n N` (gpuflow.distributed); `main` only parses argv
and turns user mistakes into one line on stderr (exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import textrun
from .. import checkpoint
from ..backends import backend_report, get_device
from ..backends.numpy_threads import get_num_threads, set_num_threads
from ..commandline import CommandError, CommandParser, HelpFormatter, report_error
from ..errors import CheckpointError, DeviceError, GpuflowError, check_int
from ..models import build_model  # noqa: F401 (gpuflow.cli.build_model, as tests import it)
from ..optim import OPTIMIZERS, check_learning_rate
from .classifier import held_out_accuracy, train_classifier  # noqa: F401 (held_out_accuracy)
from .plot import require_matplotlib
from .runs import SCHEDULES, resume_settings, resumed_model

PROG = "gpuflow"
OPTIMIZER_NAMES = tuple(OPTIMIZERS)   # the names make_optimizer takes
MODELS = ("mlp", "cnn", "gpt")
DTYPES = ("float32", "float64", "float16", "bfloat16")  # 16-bit: mixed precision (amp.py)


@dataclasses.dataclass
class TrainOptions:
    """Everything `train` needs; the defaults are `gpuflow train` with no arguments.

    The defaults (Adam 1e-3, batch 64, 25 epochs, one hidden layer of 128) reach >= 0.95
    held-out accuracy on the bundled digits in a few seconds on a 2-core CPU.
    `epochs` is the total: with `resume`, training continues from the checkpoint's epoch.
    """

    device: str = "auto"
    dtype: str = "float32"
    epochs: int = 25
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    hidden: tuple[int, ...] = (128,)
    seed: int = 0
    test_size: float = 0.2       # held-out share of the bundled digits (train_test_split)
    data: str | None = None      # MNIST-style IDX folder or .npz; None: the bundled digits
    save: str | None = None      # checkpoint written at the end of every epoch
    resume: str | None = None    # checkpoint to continue from
    plot: str | None = None      # PNG of the loss and accuracy curves (needs matplotlib)
    quiet: bool = False          # no progress bar, no per-epoch lines: the summary only
    check_finite: bool = False   # stop at the first NaN/Inf, naming the node and the step
    model: str = "mlp"           # 'mlp', or 'cnn': a LeNet-style CNN (layers.lenet)
    dropout: float | None = None  # after the hidden dense layer(s); None: 0.25 cnn, 0 mlp
    schedule: str | None = None  # 'step', 'cosine', 'exponential' per epoch; None: constant lr
    clip: float | None = None    # clip_grad_norm's max_norm before every opt.step; None: off
    accumulate: int = 1          # batches of batch_size per optimizer step (Graph.accumulate_step)
    threads: int | None = None   # gf.set_num_threads for the run; None: as it is (default 1)
    recompute: bool = False      # each block (hidden layer) recomputed in the backward pass
    # --model gpt only (gpuflow/cli/textrun.py, which also has its other defaults): a run of steps
    steps: int = 1000
    eval_every: int = 100        # steps between held-out reports (and --save)
    layers: int = 2
    width: int = 128
    heads: int = 4
    context: int = 64
    # The options the user gave (argv's flags, a dict's keys); None: those that differ from the
    # defaults. With --resume, the run's settings not given are taken from the checkpoint.
    given: "frozenset[str] | None" = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def from_any(cls, options: "TrainOptions | Mapping[str, Any] | argparse.Namespace | None"
                 ) -> "TrainOptions":
        """TrainOptions from itself, a dict or an argparse Namespace.

        A dict key that is not a field is a ValueError (a typo must not be ignored); a
        Namespace's other attributes (the command's name) are ignored."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        names = {f.name for f in dataclasses.fields(cls)}
        if isinstance(options, Mapping):
            values = dict(options)
            unknown = sorted(set(values) - names)
            if unknown:
                raise ValueError(f"train: unknown option(s) {unknown}.\nhelp: pass fields of "
                                 f"gpuflow.cli.TrainOptions: {', '.join(sorted(names))}.")
            values.setdefault("given", frozenset(k for k, v in values.items() if v is not None))
        else:
            values = vars(options)
        return cls(**{k: v for k, v in values.items() if k in names and v is not None})

    def explicit(self) -> frozenset[str]:
        """The options given: `given`, else those that differ from the defaults."""
        if self.given is not None:
            return frozenset(self.given)
        default = type(self)()
        return frozenset(f.name for f in dataclasses.fields(self)
                         if f.name != "given" and getattr(self, f.name) != getattr(default, f.name))

    def check(self) -> None:
        """The one check of every option: ValueError naming the option for a value out of
        range, before anything is loaded, built or written."""
        _check_choice("--dtype", self.dtype, DTYPES)
        _check_choice("--optimizer", self.optimizer.lower(), OPTIMIZER_NAMES)
        _check_choice("--model", self.model, MODELS)
        textrun.check(self)
        if self.dropout is None:
            self.dropout = 0.25 if self.model == "cnn" else 0.0
        if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
                or not 0.0 <= self.dropout < 1.0):
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout!r}.\n"
                             "help: pass e.g. --dropout 0.25.")
        if self.schedule is not None:
            _check_choice("--schedule", self.schedule, SCHEDULES)
        if self.clip is not None and (
                isinstance(self.clip, bool) or not isinstance(self.clip, (int, float))
                or not math.isfinite(self.clip) or self.clip <= 0):
            raise ValueError(f"--clip must be a finite number > 0, got {self.clip!r}.\n"
                             "help: pass e.g. --clip 1.0 (the largest global gradient norm).")
        check_int(self.epochs, "--epochs", 1)
        check_int(self.batch_size, "--batch-size", 1)
        check_int(self.accumulate, "--accumulate", 1)
        check_int(self.seed, "--seed", 0)
        if self.threads is not None:
            check_int(self.threads, "--threads", 1)
        self.hidden = tuple(check_int(size, "--hidden", 1) for size in self.hidden)
        if not self.hidden:
            raise ValueError("--hidden needs at least one size.\nhelp: pass e.g. --hidden 128.")
        self.lr = check_learning_rate(self.lr, "--lr")
        if self.save is not None:
            checkpoint.check_save_path(self.save)  # safetensors: a .npz name is refused
            _check_writable("--save", self.save)
        if self.plot is not None:
            require_matplotlib()
            _check_writable("--plot", self.plot)
        if self.resume is not None and not Path(self.resume).is_file():
            raise CheckpointError(f"--resume {self.resume}: no such file.\n"
                                  "help: pass a checkpoint written by --save.")


def _check_choice(option: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(choices)}, got {value!r}.\n"
                         f"help: pass e.g. {option} {choices[0]}.")


def _check_writable(option: str, path: str) -> None:
    """CommandError unless `path` can be written now: its folder exists and takes a new file,
    and the path is not a folder. Checked before training, which would otherwise fail only
    after the first epoch (--save) or at the very end (--plot). A real probe file, not
    os.access: root ignores permission bits, not read-only mounts or immutable folders."""
    target = Path(path).expanduser()
    folder = target.resolve().parent
    if not folder.is_dir():
        raise CommandError(f"{option} {path}: the folder {folder} does not exist.\n"
                           "help: create it first or pick another path.")
    if target.is_dir():
        example = target / ("run.safetensors" if option == "--save" else "curves.png")
        raise CommandError(f"{option} {path}: is a folder.\n"
                           f"help: pass a file name inside it, e.g. {option} {example}.")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".gpuflow-write-check-"):
            pass
        if target.exists():
            with open(target, "ab"):  # opening to append changes nothing in the file
                pass
    except OSError as exc:
        raise CommandError(f"{option} {path}: cannot write there ({exc.strerror or exc}).\n"
                           "help: pick a path in a folder you can write to.") from None


# -- training ------------------------------------------------------------------------------------
def train(options: "TrainOptions | Mapping[str, Any] | argparse.Namespace | None" = None
          ) -> dict[str, Any]:
    """Train a classifier (an MLP, or a CNN) and evaluate it on held-out data after every epoch.

    options: TrainOptions, or a dict / Namespace of its fields (missing ones take defaults).
    Returns {"accuracy": final held-out accuracy, "losses": mean train loss per epoch,
    "accuracies": held-out accuracy per epoch, "device": device name, "device_description",
    "seconds": wall time of the whole call, "epoch": epochs done, "start_epoch": where this
    call began (> 0 after --resume), "lr": the optimizer's rate at the end (--schedule),
    "parameters": {name: NumPy array}}.
    Raises ValueError, DeviceError, DataError or CheckpointError for user mistakes.
    """
    opts = TrainOptions.from_any(options)
    opts.given = opts.explicit()  # before check() fills in defaults (--dropout)
    resumed_model(opts)
    if opts.model == "gpt":
        textrun.take_defaults(opts)
    opts.check()
    started = time.perf_counter()
    carried = resume_settings(opts) if opts.resume is not None else ""
    threads = get_num_threads()
    if opts.threads is not None:
        set_num_threads(opts.threads)
    try:
        return (textrun.train_gpt if opts.model == "gpt" else train_classifier)(
            opts, started, carried)
    finally:
        set_num_threads(threads)


# -- devices -------------------------------------------------------------------------------------
def devices() -> int:
    """Print every backend and device spec, available or not, with the reason or description."""
    rows = backend_report()
    width = max(len(r["spec"]) for r in rows)
    print(f"{'backend':<17} {'device':<{width}}  {'available':<9}  details")
    for r in rows:
        mark = "yes" if r["available"] else "no"
        print(f"{r['backend']:<17} {r['spec']:<{width}}  {mark:<9}  {r['detail']}")
    auto = get_device("auto")
    print(f"'auto' chooses: {auto.name}")
    return 0


# -- bench ---------------------------------------------------------------------------------------
def bench(argv: list[str]) -> int:
    """Hand `gpuflow bench ...` to gpuflow.bench.main (a large module: imported only now)."""
    return int(importlib.import_module("..bench", __package__).main(argv) or 0)


# -- argv ----------------------------------------------------------------------------------------
def build_parser() -> CommandParser:
    """The `gpuflow` argument parser with its train, devices and bench commands."""
    parser = CommandParser(prog=PROG, description="gpuflow: MiniFlow's graph on any array-API "
                           "backend (NumPy, CuPy, PyTorch).")
    commands = parser.add_subparsers(dest="command", metavar="{train,export,devices,bench}",
                                     parser_class=CommandParser)
    commands.required = True
    d = TrainOptions()
    t = parser.add_command(
        commands, "train", help="train a classifier, an MLP or a CNN (bundled digits, or "
        "--data MNIST)",
        description="Train a classifier (an MLP, or with --model cnn a LeNet-style CNN) and "
        "report held-out accuracy after each epoch. With --resume, the settings the run was "
        "saved with (model, optimizer, rate, schedule, clipping, epochs, ...) are taken from "
        "the checkpoint where not given; --epochs is the new total, which a schedule follows.",
        formatter_class=HelpFormatter)
    t.add_argument("--device", default=d.device,
                   help="'auto', 'cpu', 'cuda', 'cuda:N', 'torch:cpu', 'array_api_strict:device1', "
                   "... (see 'gpuflow devices'), or 'fastest' ('fastest:cpu,torch:cpu'): time "
                   "the first batch's step on each device and train on the fastest")
    t.add_argument("--dtype", default=d.dtype, choices=DTYPES,
                   help="floating dtype of the model (float16/bfloat16: mixed precision, "
                        "float32 master weights, dynamic loss scaling; bfloat16 on torch)")
    t.add_argument("--epochs", type=int, default=d.epochs,
                   help="total epochs (with --resume: including those already done; a "
                        "--schedule is stretched to the new total at its position; default "
                        "with --resume: the run's)")
    t.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="samples per forward and backward pass (per step without --accumulate)")
    t.add_argument("--accumulate", type=int, default=d.accumulate, metavar="K",
                   help="gradient accumulation: one optimizer step per K batches of "
                        "--batch-size, equal to one step on a batch of K x --batch-size "
                        "(BatchNorm still sees each batch on its own; default 1)")
    t.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    t.add_argument("--model", default=d.model, choices=MODELS,
                   help="mlp, or cnn: a LeNet-style CNN on the images, or gpt: a character-"
                   "level GPT on a text, its options below (default %(default)s)")
    t.add_argument("--dropout", type=float, default=d.dropout, metavar="P",
                   help="dropout probability after the hidden dense layer(s) "
                        "(default 0.25 for cnn, 0 for mlp)")
    t.add_argument("--schedule", choices=SCHEDULES,
                   help="learning-rate schedule, stepped once per epoch: step (x0.1 every "
                        "max(1, epochs // 3) epochs), cosine (to 0 over --epochs), exponential "
                        "(x0.9 per epoch), warmup-cosine (linear over the first tenth, then "
                        "cosine to 0; per step with --model gpt, its default); --resume "
                        "continues the checkpoint's (default: none, a constant rate)")
    t.add_argument("--clip", type=float, metavar="MAX_NORM",
                   help="scale the gradients to a global L2 norm of at most MAX_NORM before "
                        "every optimizer step (default: off)")
    t.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZER_NAMES,
                   help="momentum and nesterov are SGD with momentum 0.9")
    t.add_argument("--hidden", type=int, nargs="+", default=list(d.hidden), metavar="N",
                   help="hidden layer sizes, e.g. --hidden 128 64")
    t.add_argument("--threads", type=int, metavar="N",
                   help="on the cpu device, split large NumPy operations over N threads "
                        "(gf.set_num_threads: pays for CNNs, not MLPs; default: "
                        "GPUFLOW_NUM_THREADS, else 1)")
    t.add_argument("--seed", type=int, default=d.seed,
                   help="seeds the split, the initial weights and the batch order")
    t.add_argument("--data", metavar="PATH",
                   help="MNIST-style IDX folder or .npz, or with --model gpt a UTF-8 text "
                   "file (default: the bundled 8x8 digits; for gpt Python's pydoc topics)")
    t.add_argument("--save", metavar="PATH", help="write a checkpoint after every epoch")
    t.add_argument("--resume", metavar="PATH",
                   help="continue from a checkpoint's epoch, with the settings of its run for "
                        "the options not given (said in one line); a contradicting --model, "
                        "--hidden, --dropout, --optimizer, --schedule, --seed is refused")
    t.add_argument("--plot", metavar="PATH",
                   help="write a PNG of loss and accuracy curves (needs matplotlib)")
    t.add_argument("--quiet", action="store_true",
                   help="no progress bar and no per-epoch lines: the summary only")
    t.add_argument("--recompute", action="store_true",
                   help="keep only each block's output (a GPT's transformer block) after the "
                   "forward pass and recompute its other values in the backward pass: less "
                   "memory, the same numbers")
    t.add_argument("--check-finite", action="store_true",
                   help="after every step, check every value and gradient for NaN/Inf and stop "
                   "at the first, naming the node and the step (one extra read per step)")
    textrun.add_arguments(t)
    e = parser.add_command(
        commands, "export", help="export a checkpoint of gpuflow train as ONNX or as a "
        "standalone Python module", formatter_class=HelpFormatter,
        description="Rebuild the model a checkpoint of 'gpuflow train --save' holds (from the "
        "run's settings saved with it) and write its evaluation pass (Dropout off, BatchNorm's "
        "running statistics): --onnx as an ONNX file with a dynamic batch dimension (needs "
        "the onnx package: pip install 'gpuflow[onnx]'), --python as FOLDER/model.py and "
        "FOLDER/weights.safetensors, which run without gpuflow on NumPy, CuPy, PyTorch or JAX.")
    e.add_argument("checkpoint", metavar="CHECKPOINT", help="a file written by gpuflow train "
                   "--save")
    e.add_argument("--onnx", metavar="PATH", help="write the ONNX model here")
    e.add_argument("--python", metavar="FOLDER", help="write model.py and weights.safetensors "
                   "into this folder (made if missing)")
    e.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default: 17)")
    parser.add_command(commands, "devices",
                       help="list every backend and device, available or not")
    parser.add_command(commands, "bench", help="run benchmarks (gpuflow.bench); "
                       "'gpuflow bench --help' for its options", add_help=False)
    return parser


def given_options(parser: argparse.ArgumentParser, args: Sequence[str]) -> frozenset[str]:
    """The dests of the options that `args` gives (abbreviations are refused, so each flag is
    spelled in full: '--clip 1' or '--clip=1')."""
    dests = {flag: action.dest for action in parser._actions for flag in action.option_strings}
    return frozenset(dests[arg.split("=", 1)[0]] for arg in args
                     if arg.split("=", 1)[0] in dests)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gpuflow` command; returns the exit status (2 for user mistakes,
    each reported as one line: 'gpuflow <command>: error: ...')."""
    args = list(sys.argv[1:] if argv is None else argv)
    prog = PROG
    try:
        if args and args[0] == "bench":  # everything after 'bench' belongs to gpuflow.bench
            prog = f"{PROG} bench"
            return bench(args[1:])
        parser = build_parser()
        ns = parser.parse_args(args)
        prog = f"{PROG} {ns.command}"
        if ns.command == "devices":
            return devices()
        if ns.command == "export":
            from ..export.checkpoints import export_checkpoint
            return export_checkpoint(ns.checkpoint, onnx=ns.onnx, python=ns.python,
                                     opset=ns.opset)
        ns.given = given_options(parser.commands["train"], args[1:])
        train(ns)
        return 0
    except SystemExit as exc:  # --help (0) or a usage error already reported (2)
        return exc.code if isinstance(exc.code, int) else 2
    except DeviceError as exc:  # the library's words (device='cpu') as the command's flags
        return report_error(prog, re.sub(r"\bdevice='([^']*)'", r"--device \1", str(exc)))
    except (GpuflowError, ValueError, OSError) as exc:
        return report_error(prog, exc)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
