"""MPI through mpi4py: the world communicator, local ranks, and gradient sums on host arrays.

Imported only when a launcher started this process with more than one rank, so `import gpuflow`
never loads mpi4py.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy

from ..errors import DistributedError


def import_mpi() -> Any:
    """mpi4py's MPI module; DistributedError with the install hint if it cannot be imported."""
    try:
        from mpi4py import MPI
    except Exception as exc:  # noqa: BLE001 - ImportError, or libmpi missing under mpi4py
        raise DistributedError(
            f"this process was started by an MPI launcher, but mpi4py cannot be imported "
            f"({type(exc).__name__}: {exc}).\nhelp: pip install 'gpuflow[mpi]', or run "
            "without mpiexec for one process.") from exc
    return MPI


def world() -> tuple[Any, int, int, int]:
    """(COMM_WORLD, rank, size, local rank: the rank among the processes on this node)."""
    MPI = import_mpi()
    comm = MPI.COMM_WORLD
    # Ranks that share memory share a node: the standard's portable way to a local rank.
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    local_rank = node.Get_rank()
    node.Free()
    return comm, comm.Get_rank(), comm.Get_size(), local_rank


def abort_on_exception(comm: Any, rank: int, size: int) -> None:
    """Make an uncaught exception on this rank stop every rank (MPI_Abort), not leave the
    others waiting forever in the next collective."""
    previous = sys.excepthook

    def hook(kind: type, exc: BaseException, tb: Any) -> None:
        previous(kind, exc, tb)
        print(f"gpuflow.distributed: rank {rank} of {size} stopped on {kind.__name__}: {exc}\n"
              "gpuflow.distributed: calling MPI_Abort so that the other ranks stop too instead "
              "of waiting for this one.", file=sys.stderr, flush=True)
        comm.Abort(1)

    sys.excepthook = hook


class MpiCommunicator:
    """Sums and broadcasts through MPI on host memory.

    Host arrays are reduced in host memory. Arrays of a device without usable collectives
    (array_api_strict's device1, CuPy when NCCL cannot be used) are staged through the host with `Device.to_host` / `Device.put`,
    so the transfer ledger counts the copies.
    """

    def __init__(self, comm: Any, device: Any) -> None:
        self.comm = comm
        self.device = device
        self.name = "MPI" if device.is_host else f"MPI via the host ({device.name})"

    def allreduce_sum(self, x: Any, *, what: str = "gradients") -> Any:
        """The elementwise sum of `x` over every rank (may reuse `x`'s memory)."""
        host = self._host(x, what)
        self._call("Allreduce", what, self._mpi().IN_PLACE, host, op=self._mpi().SUM)
        return self.device.put(host, x.dtype, what=what)

    def broadcast(self, x: Any, root: int = 0, *, what: str = "parameters") -> Any:
        """Rank `root`'s `x` on every rank."""
        host = self._host(x, what)
        self._call("Bcast", what, host, root=root)
        return self.device.put(host, x.dtype, what=what)

    def _host(self, x: Any, what: str) -> numpy.ndarray:
        # MPI needs a writable, contiguous buffer; a NumPy array usually is one already.
        return numpy.require(self.device.to_host(x, what=what), requirements=("C", "W"))

    def _call(self, name: str, what: str, *args: Any, **kwargs: Any) -> None:
        MPI = self._mpi()
        try:
            getattr(self.comm, name)(*args, **kwargs)
        except MPI.Exception as exc:
            raise DistributedError(
                f"MPI {name} of {what} failed on rank {self.comm.Get_rank()} of "
                f"{self.comm.Get_size()}: {exc}.\nhelp: another rank has probably died; its "
                "output above says why.") from exc

    @staticmethod
    def _mpi() -> Any:
        from mpi4py import MPI
        return MPI
