"""Data-parallel training over MPI ranks: one process per device, gradients averaged each step.

    ctx = gpuflow.distributed.init()             # rank, size, local_rank; size 1 without mpiexec
    graph = Graph(loss, device=ctx.device_spec("cuda"))   # cuda -> cuda:<local rank>
    ctx.broadcast_parameters(graph)              # every rank starts from rank 0's weights
    for xb, yb in ctx.batches(X, y, batch_size=512, seed=0):   # this rank's slice of each batch
        loss = graph.step(xb, yb)
        ctx.allreduce_gradients(graph)           # the single-process mean-loss gradient
        optimizer.step()
        ctx.print(ctx.allreduce_scalar(graph.item(loss)))   # the global mean loss, on rank 0

Not launched under MPI (or launched with one rank), every call here is a no-op and mpi4py is
never imported. The MPI specifics live in `mpi.py`; device-side collectives (NCCL for CuPy)
live behind the device (`Device.collectives`, `Device.communicator`), in its backend.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from typing import Any, Iterator

from ..backends import rank_spec
from ..data.batches import Batches
from ..errors import DataError, DistributedError
from ..graph import Graph

# Set by MPICH/Intel MPI (PMI_*), Open MPI (OMPI_*), MPICH's hydra (MPI_LOCALRANKID), PMIx.
LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID",
                      "PMIX_RANK")


def launched() -> bool:
    """Whether an MPI launcher (mpiexec, mpirun, srun) started this process."""
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


def init() -> "Context":
    """The Context of this process: MPI's world when launched under MPI, else one rank.

    Under a launcher with several ranks, an uncaught exception on any rank aborts them all
    (MPI_Abort) rather than leaving the others blocked in a collective.
    """
    if not launched():
        return Context()
    from . import mpi
    comm, rank, size, local_rank = mpi.world()
    if size == 1:
        return Context()
    mpi.abort_on_exception(comm, rank, size)
    return Context(rank, size, local_rank, comm)


class Context:
    """This process's place in the run: `rank` of `size`, `local_rank` on its node, `comm`
    (mpi4py's world communicator, None for a single process)."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0,
                 comm: Any = None) -> None:
        self.rank, self.size, self.local_rank, self.comm = rank, size, local_rank, comm
        self.flatten = True   # one collective per step over all gradients (benchmarks/scaling.py)
        self._counts: tuple[int, int] | None = None  # (samples here, samples in all) last shard
        self._communicators: dict[str, Any] = {}
        self._said: set[str] = set()

    def __repr__(self) -> str:
        return f"gpuflow.distributed.Context(rank={self.rank}, size={self.size}, " \
               f"local_rank={self.local_rank})"

    @property
    def is_root(self) -> bool:
        """Whether this is rank 0, the one that prints and writes checkpoints."""
        return self.rank == 0

    def print(self, *args: Any, **kwargs: Any) -> None:
        """`print` on rank 0 only."""
        if self.is_root:
            print(*args, **kwargs)

    def log(self, message: str) -> None:
        """Say `message` once per run, on rank 0, on stderr."""
        if message not in self._said:
            self._said.add(message)
            self.print(f"gpuflow.distributed: {message}", file=sys.stderr, flush=True)

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.comm is not None:
            self.comm.Barrier()

    # -- devices -------------------------------------------------------------------------------
    def device_spec(self, spec: str) -> str:
        """This rank's device spec: 'cuda' (or 'gpu', 'cupy') -> 'cuda:<local rank>',
        'torch:cuda' -> 'torch:cuda:<local rank>'; a spec with an index, or a CPU, stays."""
        s = spec.strip()
        if self.size == 1:
            return s
        return rank_spec(s, self.local_rank)

    def communicator(self, device: Any) -> Any:
        """The communicator for arrays of `device` (one per device, made on first use).

        The device's own collectives (`device.collectives`: NCCL for CuPy) when every rank can
        use them and has its own GPU, else MPI through the host (said once).
        """
        if device.name in self._communicators:
            return self._communicators[device.name]
        from .mpi import MpiCommunicator
        comm: Any = None
        if device.collectives is not None:
            why = self._collectives_problem(device)
            if why is None:
                comm = device.communicator(self.comm)
            else:
                self.log(f"gradients of {device.name} are summed through the host with MPI "
                         f"(two copies per step, counted in gpuflow.LEDGER): {why}.")
        if comm is None:
            comm = MpiCommunicator(self.comm, device)
            if device.is_gpu and device.collectives is None:
                self.log(f"gradients of {device.name} are summed through the host with MPI "
                         "(two copies per step, counted in gpuflow.LEDGER).")
        self._communicators[device.name] = comm
        return comm

    def _collectives_problem(self, device: Any) -> str | None:
        """None if the device's collectives can be used on every rank, else why not (the same
        answer everywhere)."""
        mine = (device.collectives_problem(), socket.gethostname(), device.identity())
        everyone = self.comm.allgather(mine)
        problems = [f"rank {r}: {p}" for r, (p, _, _) in enumerate(everyone) if p]
        if problems:
            return "; ".join(problems)
        gpus = [(host, name) for _, host, name in everyone]
        if len(set(gpus)) < len(gpus):
            return (f"{device.collectives} needs one GPU per rank, but ranks share one "
                    f"({', '.join(f'rank {r}: {h} {n}' for r, (h, n) in enumerate(gpus))})")
        return None

    # -- parameters and gradients --------------------------------------------------------------
    def broadcast_parameters(self, graph: Graph) -> None:
        """Give every rank rank 0's parameter values (one broadcast)."""
        if self.size == 1:
            return
        comm = self.communicator(graph.device)
        values = [p.value for p in graph.parameters]
        flat = comm.broadcast(_flatten(graph.device.xp, values), 0, what="parameters")
        for p, value in zip(graph.parameters, _unflatten(graph.device.xp, flat, values)):
            p.value = value

    def allreduce_gradients(self, graph: Graph, *, flatten: bool | None = None) -> None:
        """Replace each `p.gradients[p]` by the gradient of the global mean loss.

        Rank r's gradient is the mean over its n_r samples; the global one is
        sum_r n_r * g_r / N, with n_r from the last `shard` (equal weights if none).
        flatten: one collective over a buffer of all gradients (default `self.flatten`), or one
        per parameter.
        """
        if self.size == 1:
            return
        comm = self.communicator(graph.device)
        xp = graph.device.xp
        scale = self._counts[0] / self._counts[1] if self._counts else 1.0 / self.size
        grads = []
        for p in graph.parameters:
            grad = p.gradients.get(p)
            if grad is None:
                raise DistributedError(f"allreduce_gradients: {p.label} has no gradient yet.\n"
                                       "help: call graph.step(...) first.")
            grads.append(grad)
        if self.flatten if flatten is None else flatten:
            flat = _flatten(xp, grads)
            flat *= scale
            summed = _unflatten(xp, comm.allreduce_sum(flat), grads)
        else:
            summed = [comm.allreduce_sum(g * scale, what=f"{p.label} gradient")
                      for p, g in zip(graph.parameters, grads)]
        for p, g in zip(graph.parameters, summed):
            p.gradients[p] = g

    def allreduce_scalar(self, x: float) -> float:
        """The global mean of a per-rank mean (e.g. the loss), weighted like the gradients."""
        x = float(x)
        if self.size == 1:
            return x
        n, total = self._counts if self._counts else (1, self.size)
        return self.comm.allreduce(x * n) / total

    def sum_scalar(self, x: float) -> float:
        """The sum of `x` over every rank (e.g. summed batch losses)."""
        return float(x) if self.size == 1 else self.comm.allreduce(float(x))

    def allgather(self, obj: Any) -> list[Any]:
        """`obj` from every rank, in rank order (e.g. device names, for the log)."""
        return [obj] if self.size == 1 else self.comm.allgather(obj)

    # -- data ----------------------------------------------------------------------------------
    def shard(self, xb: Any, yb: Any) -> tuple[Any, Any]:
        """This rank's contiguous slice of a global batch (sizes differ by at most one).

        Remembers the sizes so `allreduce_gradients` weights this rank's gradient by them.
        """
        total = len(xb)
        if len(yb) != total:
            raise DataError(f"shard: xb holds {total} samples but yb holds {len(yb)}; "
                            "expected equal counts.")
        if total < self.size:
            raise DataError(f"shard: a batch of {total} samples cannot give each of {self.size} "
                            "ranks at least one.\nhelp: use a batch size >= the number of ranks "
                            "(and drop_last=True if the last batch is smaller).")
        start, stop = shard_bounds(total, self.rank, self.size)
        self._counts = (stop - start, total)
        return xb[start:stop], yb[start:stop]

    def batches(self, X: Any, y: Any, batch_size: int, **options: Any) -> "ShardedBatches":
        """This rank's share of `Batches(X, y, batch_size, **options)`: the same seeded global
        batches as one process, each cut by `shard`."""
        return ShardedBatches(self, X, y, batch_size, **options)


def shard_bounds(total: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of rank's slice of `total` samples: the first total % size ranks get one
    more."""
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class ShardedBatches:
    """`Batches` over the whole data set on every rank, each global batch cut by `ctx.shard`.

    Every rank shuffles with the same (seed, epoch), so the union of the slices is exactly the
    batch one process would see. `state_dict` / `load_state_dict` are those of `Batches`.
    """

    def __init__(self, ctx: Context, X: Any, y: Any, batch_size: int, *,
                 device: Any = None, dtype: Any = None, **options: Any) -> None:
        self.ctx = ctx
        self.global_batches = Batches(X, y, batch_size, **options)
        self.device, self.dtype = device, dtype
        last = self.global_batches.num_samples % batch_size
        if 0 < last < ctx.size and not self.global_batches.drop_last:
            raise DataError(f"ShardedBatches: the last batch of each epoch holds {last} "
                            f"samples ({self.global_batches.num_samples} % {batch_size}), fewer "
                            f"than the {ctx.size} ranks.\nhelp: pass drop_last=True or another "
                            "batch_size.")

    def __len__(self) -> int:
        return len(self.global_batches)

    @property
    def epoch(self) -> int:
        return self.global_batches.epoch

    @property
    def num_samples(self) -> int:
        """Samples per epoch over all ranks."""
        return self.global_batches.num_samples

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for xb, yb in self.global_batches:
            xb, yb = self.ctx.shard(xb, yb)
            if self.device is not None:
                yield self.device.put(xb, self.dtype), self.device.put(yb)
            elif self.dtype is not None:
                yield xb.astype(self.dtype, copy=False), yb
            else:
                yield xb, yb

    def state_dict(self) -> dict[str, int]:
        return self.global_batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_batches.load_state_dict(state)


def _flatten(xp: Any, arrays: list[Any]) -> Any:
    """One new 1-D array holding every array's elements in turn."""
    return xp.concat([xp.reshape(a, (-1,)) for a in arrays])


def _unflatten(xp: Any, flat: Any, like: list[Any]) -> list[Any]:
    """Views of `flat` shaped like each array of `like`."""
    out, offset = [], 0
    for a in like:
        size = math.prod(a.shape)
        out.append(xp.reshape(flat[offset:offset + size], tuple(a.shape)))
        offset += size
    return out
