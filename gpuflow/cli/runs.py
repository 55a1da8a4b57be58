"""A `gpuflow train` run's settings: the schedules its --schedule names, and what its
checkpoints carry for --resume (the settings the command line leaves out are taken back from
the checkpoint; a contradiction is refused with the fix). `opts` is a `cli.TrainOptions`."""

from __future__ import annotations

import os
from typing import Any

from .. import checkpoint
from ..commandline import CommandError
from ..errors import CheckpointError
from ..models import RUN_SETTINGS, saved_settings
from ..optim import CosineAnnealingLR, ExponentialLR, StepLR, WarmupCosineLR

# --schedule; make_schedule gives the settings
SCHEDULES = ("step", "cosine", "exponential", "warmup-cosine")


def make_schedule(name: str | None, optimizer: Any, epochs: int) -> Any:
    """The --schedule: None (a constant rate), or a gpuflow.optim schedule stepped once per
    epoch (per optimizer step in a GPT run, `epochs` then its --steps): 'step' (x0.1 every
    max(1, epochs // 3) epochs), 'cosine' (to 0 over `epochs`), 'exponential' (x0.9 every
    epoch), 'warmup-cosine' (WarmupCosineLR: a linear warm-up over the first max(1, epochs //
    10), then a cosine to 0 at `epochs`). --resume restores the checkpoint's own settings."""
    if name is None:
        return None
    kind = {"step": StepLR, "cosine": CosineAnnealingLR, "exponential": ExponentialLR,
            "warmup-cosine": WarmupCosineLR}[name]
    return kind(optimizer, **_schedule_settings(name, epochs))


# the settings that follow --epochs / --steps (follow_epochs)
_FOLLOWS_EPOCHS = ("step_size", "T_max", "warmup")


def _schedule_settings(name: str, epochs: int) -> dict[str, Any]:
    """The constructor's settings of --schedule `name` for `epochs` in total."""
    return {"step": {"step_size": max(1, epochs // 3), "gamma": 0.1},
            "cosine": {"T_max": epochs, "eta_min": 0.0},
            "exponential": {"gamma": 0.9},
            "warmup-cosine": {"warmup": max(1, epochs // 10),
                              "T_max": max(epochs, max(1, epochs // 10) + 1), "eta_min": 0.0},
            }[name]



# -- --resume: the run's settings from its checkpoint -------------------------------------------
# The settings of a run that gpuflow train saves with its checkpoints (state "run.<name>",
# gpuflow/models.py's RUN_SETTINGS) and takes back on --resume where the command line does not
# give them. RUN_FIXED cannot change within a run (the model, its optimizer and schedule, the
# held-out split): giving another value is refused. The others may change on resume (a new
# total of --epochs, another --lr without a schedule, --clip, --batch-size, --accumulate,
# --dtype, a --data folder that moved).
RUN_FIXED = ("model", "hidden", "dropout", "optimizer", "schedule", "seed", "test_size",
             "layers", "width", "heads", "context")
_GPT_ONLY = ("steps", "eval_every", "layers", "width", "heads", "context")


def run_state(opts: Any) -> dict[str, Any]:
    """The run's settings as checkpoint state ("run.<name>"; None as "" or 0.0: off)."""
    values = {name: getattr(opts, name) for name in RUN_SETTINGS
              if opts.model == "gpt" or name not in _GPT_ONLY}
    values.update(hidden=[int(n) for n in opts.hidden], schedule=opts.schedule or "",
                  clip=float(opts.clip or 0.0), data=opts.data or "",
                  dropout=float(opts.dropout), lr=float(opts.lr), test_size=float(opts.test_size))
    return {f"run.{name}": value for name, value in values.items()}


def _flag(name: str, value: Any) -> str:
    """A setting as the command line gives it: '--hidden 32 16', '--clip 1'."""
    if isinstance(value, (tuple, list)):
        shown = " ".join(str(v) for v in value)
    else:
        shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"--{name.replace('_', '-')} {shown}"


def resumed_model(opts: Any) -> None:
    """--resume without --model: the checkpoint's run's model, before the options are checked
    (a GPT run's --steps is an option of --model gpt only)."""
    if (opts.resume is not None and "model" not in opts.given
            and os.path.isfile(opts.resume)):  # a missing file: check() says so
        opts.model = saved_settings(opts.resume, checkpoint.read_info(opts.resume)).get(
            "model", opts.model)


def resume_settings(opts: Any) -> str:
    """Take the settings of the run that wrote `opts.resume` for those the user did not give;
    returns the line that says which ('' if none). CheckpointError for a given setting that
    contradicts the run (another model, optimizer, schedule or split; --lr under a schedule,
    which sets the rate), naming each with the fix."""
    path = opts.resume
    info = checkpoint.read_info(path)
    saved = saved_settings(path, info)
    given = opts.explicit()
    clashes, taken = [], []
    for name, value in saved.items():
        mine = getattr(opts, name)
        if name in given:
            if name in RUN_FIXED and mine != value:
                clashes.append(f"{_flag(name, mine) if mine is not None else 'no --' + name} "
                               f"(the checkpoint's run: "
                               f"{_flag(name, value) if value is not None else 'none'})")
            elif name == "lr" and saved.get("schedule") and mine != value:
                clashes.append(f"{_flag(name, mine)} (the checkpoint's run: {_flag(name, value)}"
                               f", under its --schedule {saved['schedule']}, which sets the rate)")
            continue
        setattr(opts, name, value)
        if value is not None:
            taken.append(_flag(name, value))
    if clashes:
        raise CheckpointError(
            f"--resume {path}: the checkpoint's run cannot continue with "
            f"{'; '.join(clashes)}.\nhelp: drop those options to continue the run as it was "
            "saved, or start a new run without --resume.")
    try:
        opts.check()  # the settings taken from the file, checked as the user's would be
    except (ValueError, CommandError) as exc:
        raise CheckpointError(f"checkpoint {path!r} has damaged run settings: "
                              f"{str(exc).splitlines()[0]}\nhelp: pass that option yourself, "
                              "or resume from an earlier checkpoint.") from None
    return f"from the checkpoint: {' '.join(taken)}" if taken else ""


def another_model(opts: Any, graph: Any, arch: str,
                   error: CheckpointError) -> "CheckpointError | None":
    """For a checkpoint of another model (its parameters' names or shapes differ from the
    graph's): a short summary, which model wrote it (as options, where the checkpoint says or
    its shapes tell) and this run's, then load's list of differences (at most 8), each on its
    own indented line. None for any other error."""
    try:
        info = checkpoint.read_info(opts.resume)
    except CheckpointError:
        return None
    saved = {p["name"]: tuple(p["shape"]) for p in info["meta"]["parameters"]}
    mine = {name: tuple(p.value.shape) for name, p in graph.named_parameters().items()}
    if saved == mine:
        return None
    state = info["state"]
    if "run.model" in state and "run.hidden" in state:
        wrote = f"--model {state['run.model']} --hidden {' '.join(map(str, state['run.hidden']))}"
    else:  # a checkpoint without the run's settings: what its shapes tell
        matrices = [shape for shape in saved.values() if len(shape) == 2]
        if any(len(shape) == 4 for shape in saved.values()):
            wrote = "--model cnn" + (f" --hidden {matrices[0][1]}" if matrices else "")
        else:
            wrote = "--model mlp" + (" --hidden " + " ".join(str(m[1]) for m in matrices[:-1])
                                     if len(matrices) > 1 else "")
    first = next(iter(saved.items()), None)
    sizes = f"{len(saved)} parameters" + (f", the first {first[0]} {first[1]}" if first else "")
    items = [line for line in str(error).splitlines() if line.startswith("  ")]
    if len(items) > 8:
        items = items[:8] + [f"  ... and {len(items) - 8} more"]
    this = f"--model {opts.model} --hidden {' '.join(map(str, opts.hidden))}"
    return CheckpointError(
        f"--resume {opts.resume}: the checkpoint is of another model, written by {wrote} "
        f"({sizes}); this run builds a {arch} ({this}).\n" + "\n".join(items) +
        f"\nhelp: pass {wrote} to resume it, or start a new run without --resume.")


def follow_epochs(name: str, schedule: Any, optimizer: Any, epochs: int,
                  unit: str = "epochs") -> tuple[Any, str]:
    """The resumed `schedule` for `epochs` in total: on resume, --epochs is the new total and
    the schedule follows it, as a PyTorch user extending a cosine run expects (T_max = the new
    total; StepLR's step_size too). A schedule saved for another total is rebuilt for the new
    one and brought to its saved position (last_epoch), stepping as an uninterrupted run of
    the new total would, so its rate is that run's rate there. Returns (schedule, what changed
    or ''). unit: "steps" for a GPT run, whose schedule steps per optimizer step."""
    wanted = {k: v for k, v in _schedule_settings(name, epochs).items() if k in _FOLLOWS_EPOCHS}
    changed = {k: v for k, v in wanted.items() if getattr(schedule, k) != v}
    if not changed:
        return schedule, ""
    settings = {k: getattr(schedule, k) for k in type(schedule)._hyper}
    before = ", ".join(f"{k} {settings[k]}" for k in changed)
    if "warmup" in changed and settings.get("start_factor") == 1.0 / (schedule.warmup + 1):
        settings["start_factor"] = None  # the default, 1 / (warmup + 1), of the new warm-up
    settings.update(changed)
    position = schedule.last_epoch
    optimizer.lr = schedule.base_lr
    rebuilt = type(schedule)(optimizer, **settings)
    for _ in range(position):
        rebuilt.step()
    after = ", ".join(str(v) for v in changed.values())
    return rebuilt, (f"--{unit} {epochs}: the {name} schedule now spans {epochs} {unit} "
                     f"({before} -> {after}), at {unit[:-1]} {position} with lr "
                     f"{rebuilt.last_lr:.4g}")


def model_state(sample_shape: tuple[int, ...], n_classes: int) -> dict[str, Any]:
    """What models.build_model needs besides the run's settings, saved with them for `gpuflow
    export`: {"run.sample_shape": [...], "run.classes": n}."""
    return {"run.sample_shape": [int(s) for s in sample_shape], "run.classes": int(n_classes)}


def checkpoint_state(batches: Any, losses: list[float], accuracies: list[float],
                      opts: Any) -> dict:
    """What a resumed run needs besides parameters and optimizer: the batch order, history and
    the run's settings (RUN_SETTINGS, which --resume takes back)."""
    import numpy as np
    order = batches.state_dict()
    return {"batches_epoch": order["epoch"], "batches_seed": order["seed"],
            "losses": np.asarray(losses, dtype=np.float64),
            "accuracies": np.asarray(accuracies, dtype=np.float64), **run_state(opts)}
