"""Large NumPy operations split over the CPU's cores.

NumPy runs an elementwise operation (a ufunc, a copy) on one core, releasing the GIL while it
does; OpenBLAS spreads a matrix product over the cores with threads of its own, which keep
spinning for a while after each product. torch runs both kinds of work on one pool of threads.
So on NumPy a step of a convolutional network spent most of its time in single-core copies and
ufuncs, and splitting those alone gained nothing: OpenBLAS's spinning threads held the other
cores. Here gpuflow's NumPy ops run both kinds on one pool, as torch does:

- an elementwise operation whose result has at least `MIN_SPLIT` entries is cut along its first
  axis into one slab per thread, each computed by the same NumPy function (every entry by the
  same loop on the same inputs: bit for bit one call's result; no reductions are split);
- a matrix product runs with OpenBLAS held to one thread (its own count restored after), so
  that no OpenBLAS thread spins on a core the pool needs; one of at least `MIN_SPLIT_PRODUCT`
  multiply-adds is cut along its result's longer axis, a slab per thread. Each entry is the
  same dot product, but OpenBLAS may block a smaller product differently, so bits can differ
  from an unsplit call's in the last place. Products under `BLAS_ALONE` multiply-adds, which
  OpenBLAS runs on one thread anyway, are called as they are.

Operations that cannot be cut that way (operands whose first axis does not line up with the
result's, an elementwise operand overlapping the result other than in place, a product's
operand sharing any memory with the result) run as one call, and so does a split operation
called from inside a slab.

It is opt-in: `gpuflow.set_num_threads(n)` (or `GPUFLOW_NUM_THREADS=n`) splits over n threads;
the default, 1, calls every operation as it is. Measured on 2 cores by
benchmarks/split_threads.py (gpuflow alone, 1 and 2 threads in alternating blocks): the conv
net W6 takes 0.74x the time with 2 threads, but the MLPs W1-W3 and the small conv net W5 take
1.14x-1.29x (their products run better on OpenBLAS's own threads, and their elementwise
operations are too small to gain); so it is for large convolutional networks on the CPU. Where
NumPy's BLAS is not the bundled OpenBLAS, products cannot be held to one thread and that
BLAS's threads compete with the pool. The threads are made on first use, and again in a
child process after a fork. Process-wide state (see gpuflow/runtime/buffers.py).
"""

from __future__ import annotations

import ctypes
import glob
import os
import signal
import threading
from typing import Any, Callable

import numpy

from ..errors import DeviceError

MIN_SPLIT = 1 << 17  # entries: below this, handing work to a thread costs more than it saves
MIN_SPLIT_PRODUCT = 1 << 22  # multiply-adds: below this a product runs on one thread
BLAS_ALONE = 1 << 18  # multiply-adds below which OpenBLAS itself uses one thread


def openblas(verb: str) -> Any:
    """The `openblas_<verb>_num_threads` function of NumPy's bundled OpenBLAS, or None
    (NumPy has no API for its BLAS threads)."""
    libs = glob.glob(os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs",
                                  "*openblas*"))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in (f"scipy_openblas_{verb}_num_threads64_", f"openblas_{verb}_num_threads64_",
                    f"openblas_{verb}_num_threads"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                return fn
    return None


_BLAS: list = []  # [(get, set)] once looked up: (None, None) where NumPy's BLAS is another
_HOLD = threading.Lock()
_HOLDERS = [0, None]  # products now holding OpenBLAS to one thread, and its count before


def _blas() -> tuple[Any, Any]:
    if not _BLAS:
        _BLAS.append((openblas("get"), openblas("set")))
    return _BLAS[0]


def _hold_blas(hold: bool) -> None:
    """Hold OpenBLAS to one thread (`hold`) or let go; the first holder saves its count, the
    last one out restores it (two Python threads may run products at once)."""
    get, put = _blas()
    if get is None or put is None:
        return
    with _HOLD:
        if hold:
            if _HOLDERS[0] == 0:
                _HOLDERS[1] = get()
                put(1)
            _HOLDERS[0] += 1
        else:
            _HOLDERS[0] -= 1
            if _HOLDERS[0] == 0:
                put(_HOLDERS[1])


def _default_threads() -> int:
    """GPUFLOW_NUM_THREADS if set to an int >= 1, else 1 (never split)."""
    try:
        return max(1, int(os.environ.get("GPUFLOW_NUM_THREADS", "1")))
    except ValueError:
        return 1  # a malformed value: the default, as OMP_NUM_THREADS readers do


# The signals Python programs put handlers on (Ctrl-C, timers, job control): held while a split
# runs. Not all valid signals: Python turns the mask it returns into enum members, ~150 us
# for all of them, ~15 us for these.
_SIGNALS = (frozenset(getattr(signal, name) for name in (
    "SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGUSR1",
    "SIGUSR2", "SIGCHLD", "SIGWINCH") if hasattr(signal, name))
    if hasattr(signal, "pthread_sigmask") else None)
_INSIDE = threading.local()  # .on: this thread is running a slab (workers: always)


class _Worker:
    """One thread that runs the slabs handed to it, one at a time (a lock hand-off costs
    ~15 us where a ThreadPoolExecutor's submit and wait cost ~45)."""

    def __init__(self) -> None:
        self._go, self._done = threading.Lock(), threading.Lock()
        self._go.acquire()
        self._done.acquire()
        self._task: Callable[[], Any] | None = None
        self._errstate: dict = {}
        self._error: BaseException | None = None
        threading.Thread(target=self._loop, name="gpuflow-numpy", daemon=True).start()

    def _loop(self) -> None:
        _INSIDE.on = True  # a split operation called from a slab runs as one call
        while True:
            self._go.acquire()
            try:
                with numpy.errstate(**self._errstate):  # the caller's, not this thread's
                    self._task()
            except BaseException as exc:  # handed to the caller by wait()
                self._error = exc
            self._task = None
            self._done.release()

    def start(self, task: Callable[[], Any], errstate: dict) -> None:
        self._task, self._errstate = task, errstate
        self._go.release()

    def wait(self) -> None:
        self._done.acquire()
        error, self._error = self._error, None
        if error is not None:
            raise error


class _Workers:
    """The process's worker threads: `threads - 1` of them, the caller being the first."""

    def __init__(self) -> None:
        self.threads = _default_threads()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def run(self, slabs: list[Callable[[], Any]]) -> None:
        """slabs[1:] on the workers, slabs[0] here; returns when all are done. Signals are held
        meanwhile (a Ctrl-C raises once the slabs are done): a wait cut short would leave a
        worker writing after the call returned, and its lock out of step."""
        if getattr(_INSIDE, "on", False):  # called from a slab: no thread to hand work to
            for slab in slabs:
                slab()
            return
        held = (signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
                if _SIGNALS is not None and threading.current_thread() is threading.main_thread()
                else None)
        try:
            with self._lock:  # one split operation at a time (another thread's waits)
                while len(self._workers) < len(slabs) - 1:
                    self._workers.append(_Worker())
                errstate = numpy.geterr()
                started = []
                _INSIDE.on = True
                try:
                    for worker, slab in zip(self._workers, slabs[1:]):
                        worker.start(slab, errstate)
                        started.append(worker)
                    slabs[0]()
                finally:
                    _INSIDE.on = False
                    errors = []
                    for worker in started:
                        try:
                            worker.wait()
                        except BaseException as exc:
                            errors.append(exc)
                    if errors:
                        raise errors[0]
        finally:
            if held is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def resize(self, n: int) -> None:
        self.threads = n  # idle workers beyond n just stay parked

    def after_fork(self) -> None:
        self._workers, self._lock = [], threading.Lock()  # the parent's threads are not here


WORKERS = _Workers()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=WORKERS.after_fork)


def set_num_threads(n: int) -> None:
    """Split the large NumPy operations of gpuflow's 'cpu' device over n threads (1, the
    default: never split); see gpuflow.backends.numpy_threads for when it pays."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DeviceError(f"set_num_threads: n={n!r} must be an int >= 1.\nhelp: pass e.g. "
                         "gf.set_num_threads(os.cpu_count()), or 1 to stop splitting.")
    if n != WORKERS.threads:
        WORKERS.resize(n)
        from .numpy import OPS  # the cpu device's ops (numpy.py imports this module)
        OPS._bind_routes(n)


def get_num_threads() -> int:
    """The number of threads large NumPy operations are split over."""
    return WORKERS.threads


def _split(length: int, slab: Callable[[int, int], Callable[[], Any]]) -> None:
    """Run slab(lo, hi)'s work for one share of range(length) per thread, all at once."""
    n = min(WORKERS.threads, length)
    WORKERS.run([slab(length * i // n, length * (i + 1) // n) for i in range(n)])


def _cuttable(a: Any, out: numpy.ndarray) -> bool | None:
    """True if operand `a` is cut along with `out`, False if every slab takes it whole
    (a scalar, or an array broadcast along the first axis), None if it cannot be split."""
    if not isinstance(a, numpy.ndarray):
        return False
    if a.ndim < out.ndim or a.shape[0] == 1:
        return False if a.ndim <= out.ndim and not _overlaps(a, out) else None
    if a.ndim != out.ndim or a.shape[0] != out.shape[0]:
        return None
    return None if _overlaps(a, out) else True


def _overlaps(a: numpy.ndarray, out: numpy.ndarray) -> bool:
    """Whether `a` shares memory with `out` other than as the very same view (in place)."""
    if a is out or not numpy.may_share_memory(a, out):
        return False
    return not (a.shape == out.shape and a.strides == out.strides
                and a.__array_interface__["data"][0] == out.__array_interface__["data"][0])


def split_ufunc(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn(*args, out=out)` (a ufunc), split over the threads when `out` is large."""

    def split(*args: Any, out: Any = None) -> Any:
        if out is None or out.size < MIN_SPLIT or WORKERS.threads < 2:
            return fn(*args, out=out)
        cut = [_cuttable(a, out) for a in args]
        if None in cut or out.shape[0] < 2:
            return fn(*args, out=out)
        def slab(lo: int, hi: int) -> Callable[[], Any]:
            parts = [a[lo:hi] if c else a for a, c in zip(args, cut)]
            return lambda: fn(*parts, out=out[lo:hi])

        _split(out.shape[0], slab)
        return out

    split.__name__ = getattr(fn, "__name__", "split")
    return split


def split_matmul(x1: Any, x2: Any, out: Any = None) -> Any:
    """numpy.matmul; a 2-D product into `out` with OpenBLAS held to one thread, split over the
    threads when large (see the module docstring)."""
    if out is None or WORKERS.threads < 2 or x1.ndim != 2 or x2.ndim != 2:
        return numpy.matmul(x1, x2, out=out)
    work = x1.shape[0] * x1.shape[1] * x2.shape[1]
    if work < BLAS_ALONE:  # OpenBLAS runs these on one thread anyway
        return numpy.matmul(x1, x2, out=out)
    _hold_blas(True)
    try:
        rows = out.shape[0] >= out.shape[1]
        length = out.shape[0 if rows else 1]
        # Every slab reads the whole of one operand: none may share memory with out at all.
        if (work < MIN_SPLIT_PRODUCT or length < 2 or numpy.may_share_memory(x1, out)
                or numpy.may_share_memory(x2, out)):
            return numpy.matmul(x1, x2, out=out)
        def slab(lo: int, hi: int) -> Callable[[], Any]:
            if rows:
                return lambda: numpy.matmul(x1[lo:hi], x2, out=out[lo:hi])
            return lambda: numpy.matmul(x1, x2[:, lo:hi], out=out[:, lo:hi])

        _split(length, slab)
        return out
    finally:
        _hold_blas(False)


def split_along_first(fn: Callable[..., Any], arrays: list, out: numpy.ndarray,
                      *extra: Any) -> Any:
    """fn(arrays, *extra, out) for functions whose result's first axis is each array's first
    axis (np.stack along an inner axis, col2im): split over the threads when `out` is large."""
    if (out.size < MIN_SPLIT or WORKERS.threads < 2 or out.shape[0] < 2
            or any(a.shape[0] != out.shape[0] or _overlaps(a, out) for a in arrays)):
        return fn(arrays, *extra, out)
    def slab(lo: int, hi: int) -> Callable[[], Any]:
        return lambda: fn([a[lo:hi] for a in arrays], *extra, out[lo:hi])

    _split(out.shape[0], slab)
    return out
