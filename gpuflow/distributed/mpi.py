"""MPI through mpi4py: the world communicator, local ranks, and gradient sums on host arrays.

Imported only when a launcher started this process with more than one rank, so `import gpuflow`
never loads mpi4py.
"""

from __future__ import annotations

import os
import stat
import struct
import sys
import time
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
        wait_for_launcher_to_read_output()
        comm.Abort(1)

    sys.excepthook = hook


def wait_for_launcher_to_read_output(timeout_s: float = 5.0, pause_s: float = 0.1) -> None:
    """Flush stdout and stderr, then wait (at most `timeout_s`) until the launcher has read them.

    At MPI_Abort, mpiexec kills every rank and its proxies at once: what this rank wrote that
    the proxy had not yet read from the pipe is lost, so under load the traceback and the
    message above came out cut short or not at all. On Linux, FIONREAD on the pipe says how
    many bytes are still unread; elsewhere (or if stdout/stderr are not pipes) this sleeps
    `pause_s`. The short pause after the pipes are empty lets the proxy pass on what it read.
    """
    fds = []
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
            fds.append(stream.fileno())
        except Exception:  # noqa: BLE001 - closed or replaced stream: nothing to wait for
            pass
    deadline = time.monotonic() + timeout_s
    try:
        import fcntl
        import termios
        pipes = [fd for fd in fds if stat.S_ISFIFO(os.fstat(fd).st_mode)]
        while time.monotonic() < deadline and any(
                struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, bytes(4)))[0]
                for fd in pipes):
            time.sleep(0.01)
    except (ImportError, OSError):
        pass  # no FIONREAD here: the pause alone has to do
    time.sleep(pause_s)


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
