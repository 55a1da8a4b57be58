"""NCCL through CuPy (`cupy.cuda.nccl`): gradient sums between GPUs without a host copy.

Part of the CuPy backend (`CupyDevice.communicator`): imported only for a CuPy graph under a
launcher with more than one rank. Not run in CI (no GPU there); the names follow
cupy_backends/cuda/libs/nccl.pyx: get_unique_id(),
NcclCommunicator(ndev, commId, rank), allReduce(sendbuf, recvbuf, count, datatype, op, stream),
bcast(buff, count, datatype, root, stream), NCCL_FLOAT32 / NCCL_FLOAT64 / NCCL_SUM.
"""

from __future__ import annotations

from typing import Any

from ..errors import DistributedError


def nccl_problem() -> str | None:
    """None if CuPy's NCCL bindings load, else why not."""
    try:
        from cupy.cuda import nccl
    except Exception as exc:  # noqa: BLE001 - ImportError, or the NCCL library missing
        return f"cupy.cuda.nccl cannot be imported ({type(exc).__name__}: {exc})"
    if not getattr(nccl, "available", True):
        return "CuPy was built without NCCL (cupy.cuda.nccl.available is False)"
    return None


class NcclCommunicator:
    """Sums and broadcasts of CuPy arrays with NCCL, one GPU per rank; MPI only sets it up."""

    def __init__(self, mpi_comm: Any, device: Any) -> None:
        from cupy.cuda import nccl
        self._nccl = nccl
        self.device = device
        rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        uid = nccl.get_unique_id() if rank == 0 else None
        uid = mpi_comm.bcast(uid, root=0)
        with device.scope():
            self.comm = nccl.NcclCommunicator(size, uid, rank)
        self.name = f"NCCL {nccl.get_version()} ({device.name})"
        self._types = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}

    def allreduce_sum(self, x: Any, *, what: str = "gradients") -> Any:
        """The elementwise sum of `x` over every rank, in place on the GPU."""
        with self.device.scope():
            x = self._contiguous(x)
            self.comm.allReduce(x.data.ptr, x.data.ptr, x.size, self._type(x, what),
                                self._nccl.NCCL_SUM, _stream().ptr)
        return x

    def broadcast(self, x: Any, root: int = 0, *, what: str = "parameters") -> Any:
        """Rank `root`'s `x` on every rank, in place on the GPU."""
        with self.device.scope():
            x = self._contiguous(x)
            self.comm.bcast(x.data.ptr, x.size, self._type(x, what), root, _stream().ptr)
        return x

    def _type(self, x: Any, what: str) -> int:
        kind = self._types.get(x.dtype.name)
        if kind is None:
            raise DistributedError(f"NCCL sum of {what}: dtype {x.dtype} is not supported here; "
                                   f"expected one of {sorted(self._types)}.\nhelp: build the "
                                   "graph with dtype='float32' or 'float64'.")
        return kind

    @staticmethod
    def _contiguous(x: Any) -> Any:
        import cupy
        return cupy.ascontiguousarray(x)


def _stream() -> Any:
    """The current CUDA stream, on which CuPy queued the backward pass."""
    import cupy
    return cupy.cuda.get_current_stream()
