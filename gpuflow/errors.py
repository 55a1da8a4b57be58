"""The exceptions gpuflow raises for user mistakes (each names where, what, and the fix),
`CheckpointProblem` (a checkpoint check's error that `checkpoint_path` names the file in), and
`check_int` / `check_hyperparameter`, the argument checks that several modules share."""

import math
import numbers
from contextlib import contextmanager
from typing import Any, Iterator


class GpuflowError(Exception):
    """Base class of every error gpuflow raises on purpose."""


class DeviceError(GpuflowError, RuntimeError):
    """A device spec this machine cannot provide, or an array on the wrong device."""


class GraphError(GpuflowError, ValueError):
    """A graph that cannot run: a missing feed, a cycle, mismatched shapes or dtypes."""


class DataError(GpuflowError, ValueError):
    """A data file that is missing, truncated or malformed."""


class CheckpointError(GpuflowError, ValueError):
    """A checkpoint that cannot be written or loaded into this model."""


class CheckpointProblem(CheckpointError):
    """A checkpoint check's error, raised where the file's path is not known: the message is
    `before` + the path + `after`. `checkpoint_path(path)` around a save, a load or a read
    turns it into the CheckpointError users see, the path put in once."""

    def __init__(self, after: str, before: str = "checkpoint ") -> None:
        super().__init__(f"{before}<file>{after}")
        self.before, self.after = before, after

    def at(self, path: str) -> CheckpointError:
        return CheckpointError(f"{self.before}{path!r}{self.after}")


@contextmanager
def checkpoint_path(path: str) -> Iterator[None]:
    """Re-raise a CheckpointProblem from the block as a CheckpointError naming `path`."""
    try:
        yield
    except CheckpointProblem as exc:
        raise exc.at(path) from exc.__cause__


class TransferError(GpuflowError, RuntimeError):
    """A host/device transfer or synchronisation that strict mode forbids."""


class DistributedError(GpuflowError, RuntimeError):
    """A multi-process run that cannot go on: a failed collective, a rank that died, a bad shard."""


class ExportError(GpuflowError, ValueError):
    """A graph that cannot be exported (gpuflow.export): a node without an exporter, an output
    not in the graph, a path that cannot be written."""


def check_int(value: object, name: str, low: int = 0, *, where: str = "",
              error: type[Exception] = ValueError, example: object = None) -> int:
    """`value` as an int >= `low`, else `error` naming `name` (and `where`, e.g. the function)
    with `example` (default max(low, 1)) in its help; bools and floats are refused. The one
    check of integer arguments and options."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}{name} must be an integer >= {low}, got {value!r}.\n"
                    f"help: pass e.g. {name}={max(low, 1) if example is None else example}.")
    return int(value)


def check_hyperparameter(value: Any, name: str, owner: str | None, *, low: float = 0.0,
                         low_open: bool = False, high: float | None = None,
                         high_open: bool = True, example: str = "0.9") -> float:
    """`value` as a float; ValueError naming `owner` (the optimizer, schedule or function, if
    any) and the argument `name` unless it is a finite number >= `low` (> `low` with
    `low_open`), < `high` if given (<= `high` with high_open=False). The one check of every
    real-valued argument: optimizer hyperparameters, the learning rate, schedules, clipping."""
    what = f"{owner}: {name}" if owner else name
    # float() would also take "0.9" (an argparse option without type=float) and True.
    number = None if isinstance(value, (str, bytes, bool)) else value
    try:
        number = float(number)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = None
    if number is None:
        raise ValueError(f"{what} must be a number, got {value!r}.\n"
                         f"help: pass e.g. {name}={example} (a float).")
    rule = f"> {low:g}" if low_open else f">= {low:g}"
    rule += f" and {'<' if high_open else '<='} {high:g}" if high is not None else ""
    if not math.isfinite(number) or number < low or (low_open and number == low) or (
            high is not None and (number >= high if high_open else number > high)):
        raise ValueError(f"{what} must be a finite number {rule}, got {value!r}.\n"
                         f"help: pass e.g. {name}={example}.")
    return number
