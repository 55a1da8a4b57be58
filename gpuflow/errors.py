"""The exceptions gpuflow raises for user mistakes (each names where, what, and the fix), and
`check_int`, the integer check that several modules share."""

import numbers


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


class TransferError(GpuflowError, RuntimeError):
    """A host/device transfer or synchronisation that strict mode forbids."""


class DistributedError(GpuflowError, RuntimeError):
    """A multi-process run that cannot go on: a failed collective, a rank that died, a bad shard."""


class ExportError(GpuflowError, ValueError):
    """A graph that cannot be exported (gpuflow.export): a node without an exporter, an output
    not in the graph, a path that cannot be written."""


def check_int(value: object, name: str, low: int = 0, *, where: str = "",
              error: type[Exception] = ValueError) -> int:
    """`value` as an int >= `low`, else `error` naming `name` (and `where`, e.g. the function);
    bools and floats are refused. The one check of integer arguments and options."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}{name} must be an integer >= {low}, got {value!r}.\n"
                    f"help: pass e.g. {name}={max(low, 1)}.")
    return int(value)

