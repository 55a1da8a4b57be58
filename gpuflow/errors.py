"""The exceptions gpuflow raises for user mistakes: each names where, what, and the fix."""


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
