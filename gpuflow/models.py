"""The models `gpuflow train` builds, and the run settings its checkpoints carry: the one place
an MLP, a LeNet-style CNN or a character-level GPT is built from a run's settings. Below both
the command line (gpuflow/cli/, which trains them) and gpuflow.export (which rebuilds the model
a checkpoint holds from the settings saved with it), so neither reaches into the other."""

from __future__ import annotations

from typing import Any

from .errors import CheckpointError
from .layers import gpt, lenet, mlp
from .nodes import Input
from .nodes.losses import SoftmaxCrossEntropy

# The settings of a run that gpuflow train saves with its checkpoints (state "run.<name>"), with
# their types; --resume takes them back (gpuflow/cli/runs.py), gpuflow export rebuilds from them.
RUN_SETTINGS = {"model": str, "hidden": list, "dropout": float, "optimizer": str, "lr": float,
                "schedule": str, "clip": float, "epochs": int, "batch_size": int, "seed": int,
                "test_size": float, "dtype": str, "data": str, "accumulate": int,
                # --model gpt's (gpuflow/cli/textrun.py), saved by its runs only
                "steps": int, "eval_every": int, "layers": int, "width": int, "heads": int,
                "context": int}
_SCHEDULE_NAMES = {"StepLR": "step", "CosineAnnealingLR": "cosine", "ExponentialLR": "exponential",
                   "WarmupCosineLR": "warmup-cosine"}


def saved_settings(path: str, info: dict[str, Any]) -> dict[str, Any]:
    """The settings of the run that wrote the checkpoint: its "run.*" state (checked for type),
    and its schedule's kind (also in checkpoints of gpuflow before 0.4, which had no "run.*").
    info: checkpoint.read_info(path)."""
    state, saved = info["state"], {}
    for name, kind in RUN_SETTINGS.items():
        if f"run.{name}" not in state:
            continue
        value = state[f"run.{name}"]
        ok = isinstance(value, kind) and not isinstance(value, bool) or (
            kind is float and isinstance(value, int) and not isinstance(value, bool))
        if ok and kind is list:
            ok = all(isinstance(n, int) and not isinstance(n, bool) for n in value)
        if not ok:
            raise CheckpointError(f"checkpoint {path!r} has damaged run settings: run.{name} is "
                                  f"{value!r:.40}, expected {kind.__name__}.\nhelp: pass "
                                  f"--{name.replace('_', '-')} yourself, or resume from an "
                                  "earlier checkpoint.")
        saved[name] = tuple(value) if kind is list else value
    for name in ("schedule", "data"):
        if saved.get(name) == "":
            saved[name] = None
    if saved.get("clip") == 0.0:
        saved["clip"] = None
    schedule = info["meta"]["schedule"]
    saved["schedule"] = (None if schedule is None
                         else _SCHEDULE_NAMES.get(schedule["class"], schedule["class"]))
    return saved


def build_model(opts: Any, sample_shape: tuple[int, ...], n_classes: int
                ) -> tuple[Input, Input, Any, Any, str]:
    """The one place the classifier is built: (X, y, logits, loss, description).

    opts: the run's settings `model` ('mlp' or 'cnn'), `hidden`, `dropout` and `seed` (and
    optionally `recompute`) as attributes (a cli.TrainOptions, or the settings a checkpoint
    saved: gpuflow.export rebuilds from those).

    sample_shape: the shape of one sample, (n_features,) for the MLP, (1, H, W) for the CNN;
    n_classes: the logits' width.
    """
    X_in, y_in = Input(name="X"), Input(name="y")
    if opts.model == "cnn":
        logits, _ = lenet(X_in, sample_shape, n_classes, hidden=opts.hidden[0],
                          dropout=opts.dropout, batch_norm=True, seed=opts.seed,
                          recompute=getattr(opts, "recompute", False))
        arch = (f"LeNet-style CNN (conv 16-32 with BatchNorm, dense {opts.hidden[0]}, dropout "
                f"{opts.dropout:g}; {'x'.join(str(s) for s in sample_shape)} images)")
    else:
        sizes = [int(sample_shape[0]), *opts.hidden, n_classes]
        logits, _ = mlp(X_in, sizes, seed=opts.seed, dropout=opts.dropout,
                        recompute=getattr(opts, "recompute", False))
        arch = "-".join(str(s) for s in sizes) + " MLP"
    # --recompute: each block is built inside gf.recompute (gpuflow/runtime/recomputation.py), by
    # lenet's and mlp's recompute=True, as build_gpt's transformer blocks. It changes no number,
    # so it is not a run setting (--resume may change it).
    if getattr(opts, "recompute", False):
        arch += ", each block recomputed in the backward pass"
    loss = SoftmaxCrossEntropy(y_in, logits, name="loss")
    return X_in, y_in, logits, loss, arch


def build_gpt(opts: Any, vocab: int) -> tuple[Input, Input, Any, Any, str]:
    """(ids, y, logits, loss, description) of the run's character-level GPT over `vocab`
    characters. opts: the settings `context`, `width`, `layers`, `heads`, `dropout`, `seed`
    (and optionally `recompute`) as attributes."""
    ids, y = Input(name="ids"), Input(name="y")
    recompute = bool(getattr(opts, "recompute", False))
    logits, _ = gpt(ids, vocab, opts.context, opts.width, opts.layers, opts.heads,
                    dropout=opts.dropout, rng=opts.seed, recompute=recompute)
    arch = (f"GPT ({opts.layers} blocks, width {opts.width}, {opts.heads} heads, context "
            f"{opts.context}, {vocab} characters"
            + (f", dropout {opts.dropout:g}" if opts.dropout else "")
            + (", each block recomputed in the backward pass" if recompute else "") + ")")
    return ids, y, logits, SoftmaxCrossEntropy(y, logits, name="loss"), arch
