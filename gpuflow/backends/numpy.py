"""NumPy on the CPU: the 'cpu' / 'numpy' device, and the host side of every transfer."""

from __future__ import annotations

from typing import Any, Callable

import threading
import types

import array_api_compat
import array_api_compat.numpy as compat_numpy
import numpy

from ..errors import DeviceError, GraphError
from . import special
from .base import Device, Ops, UfuncOps, missing_library
from .numpy_threads import WORKERS, split_along_first, split_matmul, split_ufunc
from .windows import col2im_in_place

EXAMPLE_SPECS = ("cpu",)
import_problem = missing_library("numpy")


def _fast_namespace() -> types.ModuleType:
    """array-api-compat's NumPy namespace, with the calls a training step makes most often
    going straight to NumPy's C functions (np.sum and np.reshape cost ~1-2 us in Python
    wrappers: a tenth of a small net's step). Same results, same signatures."""
    ns = types.ModuleType("gpuflow.backends.numpy.xp", compat_numpy.__doc__)
    ns.__dict__.update({k: v for k, v in vars(compat_numpy).items() if not k.startswith("__")})
    ns.__array_api_version__ = compat_numpy.__array_api_version__
    add_reduce, maximum_reduce = numpy.add.reduce, numpy.maximum.reduce

    def sum(x, /, *, axis=None, dtype=None, keepdims=False):  # noqa: A001 - the API's name
        if dtype is None and x.dtype.kind in "biu":
            return compat_numpy.sum(x, axis=axis, keepdims=keepdims)  # the API's int promotion
        if dtype is None and x.dtype == HALF:  # added in float32 (see NumpyOps), a float16 result
            return add_reduce(x, axis=axis, dtype=numpy.float32, keepdims=keepdims).astype(HALF)
        return add_reduce(x, axis=axis, dtype=dtype, keepdims=keepdims)

    def max(x, /, *, axis=None, keepdims=False):  # noqa: A001
        return maximum_reduce(x, axis=axis, keepdims=keepdims)

    def reshape(x, /, shape, *, copy=None):
        return x.reshape(shape) if copy is None else compat_numpy.reshape(x, shape, copy=copy)

    ns.sum, ns.max, ns.reshape = sum, max, reshape
    return ns


HALF = numpy.dtype(numpy.float16)
_RESHAPE_COPY = tuple(int(v) for v in numpy.__version__.split(".")[:2]) >= (2, 1)
xp = _fast_namespace()


def _reductions() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """NumpyOps' sum and max: straight to the ufuncs' reduce; float16 added in float32."""
    add_reduce, max_reduce, wide = numpy.add.reduce, numpy.maximum.reduce, numpy.float32

    def sum(x: Any, axis: Any = None, keepdims: bool = False, out: Any = None) -> Any:
        if x.dtype != HALF:
            return add_reduce(x, axis=axis, keepdims=keepdims, out=out)
        total = add_reduce(x, axis=axis, dtype=wide, keepdims=keepdims, out=out)
        return total if out is not None else total.astype(HALF)  # out: rounded there

    def max(x: Any, axis: Any = None, keepdims: bool = False, out: Any = None) -> Any:
        return max_reduce(x, axis=axis, keepdims=keepdims, out=out)

    return sum, max


_sum, _max = _reductions()


# NumpyOps' routes, bound as they are (no Python layer in between: a small net's step makes
# hundreds of these calls). One thread (the default): NumPy's own functions.
ONE_THREAD = {
    "matmul": numpy.matmul, "add": numpy.add, "subtract": numpy.subtract,
    "multiply": numpy.multiply, "divide": numpy.divide, "maximum": numpy.maximum,
    "tanh": numpy.tanh, "exp": numpy.exp, "log": numpy.log, "sqrt": numpy.sqrt,
    "sum": _sum, "max": _max}
# gf.set_num_threads(n > 1): the same functions split over the threads when their result is
# large (numpy_threads; matmul with OpenBLAS held to one thread). Sums and maxima never split.
SPLIT = {name: split_matmul if name == "matmul" else split_ufunc(fn)
         for name, fn in ONE_THREAD.items() if name not in ("sum", "max")}
SPLIT.update(sum=_sum, max=_max)
_COMPARE = {False: (numpy.greater, numpy.equal),
            True: (split_ufunc(numpy.greater), split_ufunc(numpy.equal))}


# -- erf (NumPy has none): special.py's formulas, in blocks, in place --------------------------
# The formulas run block by block over the flattened array, each block's intermediates in five
# arrays of _ERF_BLOCK elements that each thread keeps (0.6 MB in float32): no allocation
# after the first call, and the ~30 passes over a block stay in the CPU's cache instead of
# streaming the whole array through memory ~30 times.
_ERF_BLOCK = 32768
_ERF_SCRATCH = threading.local()


def _horner_into(coefficients: tuple, t: Any, total: Any) -> None:
    """special._horner, written into `total` (the same operations, so the same numbers)."""
    numpy.multiply(t, coefficients[0], out=total)
    numpy.add(total, coefficients[1], out=total)
    for c in coefficients[2:]:
        numpy.multiply(total, t, out=total)
        numpy.add(total, c, out=total)


def _monic_into(coefficients: tuple, t: Any, total: Any) -> None:
    """special._monic, written into `total`."""
    numpy.add(t, coefficients[0], out=total)
    for c in coefficients[1:]:
        numpy.multiply(total, t, out=total)
        numpy.add(total, c, out=total)


def _select(a: Any, split: float, small: Any, large: Any, mask: Any) -> None:
    """small = where(a < split, small, large), in place, by 0/1 masks (np.where and
    np.copyto(where=) branch per element: slower than the whole erf formula): exact, since
    both are finite where a is a number (where it is NaN, small is NaN too and stays)."""
    numpy.greater_equal(a, split, out=mask)
    numpy.multiply(large, mask, out=large)
    numpy.less(a, split, out=mask)
    numpy.multiply(small, mask, out=small)
    numpy.add(small, large, out=small)


def _erf32_block(x: Any, out: Any, c: Any, a: Any, t: Any, num: Any, den: Any) -> None:
    """special._erf_float32 of the float32 block x into out, step for step."""
    numpy.maximum(x, -special.ERF32_ONE, out=c)
    numpy.minimum(c, special.ERF32_ONE, out=c)
    numpy.absolute(c, out=a)
    numpy.multiply(a, a, out=t)
    numerator, denominator = special._ERF32_SMALL
    _horner_into(numerator, t, num)
    _monic_into(denominator, t, den)
    numpy.divide(num, den, out=num)
    numpy.multiply(c, num, out=num)
    numpy.add(c, num, out=out)  # small, |x| < 1
    numpy.negative(t, out=t)
    numpy.exp(t, out=t)
    numerator, denominator = special._ERF32_LARGE
    _horner_into(numerator, a, num)
    _monic_into(denominator, a, den)
    numpy.divide(num, den, out=num)
    numpy.multiply(t, num, out=num)
    numpy.subtract(1.0, num, out=num)
    numpy.copysign(num, c, out=num)  # large, 1 <= |x|
    _select(a, special.ERF32_SPLIT, out, num, den)


def _erf64_block(x: Any, out: Any, a: Any, s: Any, u: Any, v: Any, w: Any) -> None:
    """special.erf's float64 formula of the block x into out, step for step."""
    numpy.absolute(x, out=a)
    numpy.minimum(a, 2.0, out=s)
    numpy.multiply(s, s, out=u)
    numpy.subtract(u, 2.0, out=u)
    _horner_into(special._ERF_SMALL, u, v)
    numpy.multiply(s, v, out=s)  # small, |x| < 2
    numpy.maximum(a, 2.0, out=w)
    numpy.minimum(w, 6.0, out=w)
    numpy.multiply(w, w, out=u)
    numpy.negative(u, out=u)
    numpy.exp(u, out=u)
    numpy.divide(1.0, w, out=v)
    numpy.subtract(v, 1.0 / 3.0, out=v)
    _horner_into(special._ERFCX_LARGE, v, w)
    numpy.multiply(u, w, out=u)
    numpy.subtract(1.0, u, out=u)  # large, 2 <= |x|
    _select(a, 2.0, s, u, v)
    numpy.sign(x, out=a)
    numpy.multiply(a, s, out=out)


_ERF_BLOCKS = {numpy.dtype(numpy.float32): _erf32_block, numpy.dtype(numpy.float64): _erf64_block}


def erf(x: Any, out: Any = None) -> Any:
    """special.erf (the same numbers) for a float32 or float64 array, into `out` when given,
    block by block into kept scratch arrays; other dtypes take special.erf as it is."""
    x = numpy.asarray(x)
    block = _ERF_BLOCKS.get(x.dtype)
    if block is None:
        result = special.erf(numpy, x)
        return result if out is None else numpy.copyto(out, result) or out
    target = numpy.empty(x.shape, x.dtype) if out is None or not out.flags.c_contiguous else out
    scratch = getattr(_ERF_SCRATCH, x.dtype.name, None)
    if scratch is None:
        scratch = [numpy.empty(_ERF_BLOCK, x.dtype) for _ in range(5)]
        setattr(_ERF_SCRATCH, x.dtype.name, scratch)
    flat, flat_out = numpy.ravel(x), target.reshape(-1)
    for start in range(0, flat.size, _ERF_BLOCK):
        stop = min(start + _ERF_BLOCK, flat.size)
        views = scratch if stop - start == _ERF_BLOCK else [b[:stop - start] for b in scratch]
        block(flat[start:stop], flat_out[start:stop], *views)
    if target is not out and out is not None:
        numpy.copyto(out, target)
        return out
    return target


# scatter_add_rows as a one-hot product: tables up to this many (ids x rows) entries (8 MiB
# of float64), the one-hot matrix kept per thread (the last shape met).
_ONEHOT_MAX = 1 << 20
_ONEHOT_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))
_ONEHOT = threading.local()


def _onehot_scratch(shape: tuple[int, int], dtype: Any) -> Any:
    kept = getattr(_ONEHOT, "array", None)
    if kept is None or kept.shape != shape or kept.dtype != dtype:
        kept = _ONEHOT.array = numpy.empty(shape, dtype)
    return kept


class NumpyOps(UfuncOps):
    """NumPy's own functions (see `Ops`); sums and maxima straight to the ufuncs' reduce,
    without np.sum's Python wrapper; elementwise operations, im2col's stack and col2im split
    over the CPU's cores when their result is large (`numpy_threads`).

    NumPy has only the CPU: the process has one NumpyOps, `OPS`, every NumpyDevice's ops. It
    binds `ONE_THREAD`, or `SPLIT` while `gf.set_num_threads(n)` has n > 1 (that call hands
    the count to `OPS._bind_routes`), so a graph bound before the call follows it.

    float16 sums are added in float32 and rounded once, as torch, JAX and CuPy add them:
    NumPy adds float16 along an axis in float16, so 40,000 values of 0.01 summed over the
    batch (a bias gradient) come to 32, not 400, and sums past 65504 overflow on the way."""

    def __init__(self, xp: Any) -> None:
        super().__init__(xp, numpy, routes=ONE_THREAD)
        self._bind_routes(WORKERS.threads)

    def _bind_routes(self, threads: int) -> None:
        """Bind the routes for `threads` (numpy_threads.set_num_threads calls it on `OPS`)."""
        split = threads > 1
        vars(self).update(SPLIT if split else ONE_THREAD)
        self._greater, self._equal = _COMPARE[split]

    def stack(self, arrays: list, axis: int = 0, out: Any = None) -> Any:
        if out is None or axis % (arrays[0].ndim + 1) == 0 or WORKERS.threads < 2:
            return numpy.stack(arrays, axis=axis, out=out)
        return split_along_first(lambda parts, o: numpy.stack(parts, axis=axis, out=o),
                                 arrays, out)

    def col2im(self, parts: list, kh: int, kw: int, sh: int, sw: int, out: Any) -> Any:
        return split_along_first(col2im_in_place, parts, out, kw, sh, sw)

    def erf(self, x: Any, out: Any = None) -> Any:
        return erf(x, out)

    def take_rows(self, table: Any, ids: Any, out: Any = None) -> Any:
        if out is None:
            return numpy.take(table, ids, axis=0)
        # mode="raise" would copy `out` ("always buffered"): the range checked here instead
        if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
            raise IndexError(f"take_rows: ids from {ids.min()} to {ids.max()} index a table "
                             f"of {table.shape[0]} rows")
        return numpy.take(table, ids, axis=0, out=out, mode="clip")

    def copy(self, x: Any, out: Any = None) -> Any:
        if out is None:
            return numpy.array(x, copy=True)
        numpy.copyto(out, x)
        return out

    def reshape_into(self, x: Any, shape: tuple[int, ...], out: Any) -> Any:
        if out is None or x.flags.c_contiguous:
            return x.reshape(shape)
        if _RESHAPE_COPY:  # NumPy >= 2.1: a view where the strides allow one (a head split)
            try:
                return x.reshape(shape, copy=False)
            except ValueError:
                pass
        numpy.copyto(out.reshape(x.shape), x)  # out is C-contiguous: a view of it
        return out

    def flush_subnormals(self, a: Any, largest: float, work: Any = None) -> Any:
        """a's entries with |a| <= largest set to 0 in place, in three passes (|a|, the 0/1
        mask |a| > largest, a times it; NaN * 0 is NaN): the portable route makes |a| in two."""
        work = numpy.empty_like(a) if work is None else work
        numpy.absolute(a, out=work)
        self._greater(work, largest, out=work)
        return self.multiply(a, work, out=a)

    def scatter_add_rows(self, ids: Any, values: Any, rows: int, out: Any = None) -> Any:
        """np.add.at (repeated ids add up); for a small table of float32/float64 rows, the same
        sums as one product onehot(ids)^T @ values (4x faster than add.at: a GPT's token
        embedding), where every value is finite (0 inf would be NaN): its products are exact
        (1 v or 0 v), its sums of a repeated id's rows may be added in another order. Ids are
        in range (Embedding checks them when fed)."""
        out = numpy.zeros((rows, values.shape[1]), values.dtype) if out is None else out
        if (ids.ndim == 1 and values.size and values.dtype in _ONEHOT_DTYPES
                and ids.size * rows <= _ONEHOT_MAX
                and numpy.isfinite(numpy.maximum.reduce(values, axis=None))
                and numpy.isfinite(numpy.minimum.reduce(values, axis=None))):  # NaN: not
            onehot = _onehot_scratch((ids.size, rows), values.dtype)
            numpy.equal(ids[:, None], numpy.arange(rows), out=onehot)  # uint8 ids: no wrap
            return numpy.matmul(onehot.T, values, out=out)
        out.fill(0)
        numpy.add.at(out, ids, values)  # repeated ids add up
        return out


class NumpyDevice(Device):
    """The CPU, through NumPy."""

    backend = "numpy"

    def __init__(self, name: str, xp: Any, native: Any) -> None:
        super().__init__(name, xp, native)
        # numpy.dtype instances, not scalar types: `array.dtype == dtype` is then a cheap test.
        self._dtypes = {k: numpy.dtype(v) for k, v in self._dtypes.items()}

    def _make_ops(self) -> Ops:
        return OPS

    def new_buffer(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return numpy.empty(shape, dtype=dtype)

    def owns(self, value: Any) -> bool:
        # Only plain numeric arrays of rank >= 1 and scalars: an object or string array must
        # go through host_array's check, a subclass (np.matrix, where * is a matrix product; a
        # masked array) is converted or refused there, and a 0-d array becomes an immutable
        # scalar there (see _put).
        return ((isinstance(value, numpy.generic)
                 or (type(value) is numpy.ndarray and value.ndim > 0))
                and value.dtype.kind in "biuf")

    def describe(self) -> str:
        return f"NumPy {numpy.__version__} on the CPU"

    def rng(self, seed: int) -> "HostRng":
        return HostRng(seed)

    def quiet_float_errors(self) -> Any:
        return quiet_float_errors()

    def _put(self, host: Any, dtype: Any) -> Any:
        out = host if dtype is None or host.dtype == dtype else host.astype(dtype)
        # A fed scalar stays an immutable NumPy scalar, as MiniFlow's Python scalars were:
        # a lesson node doing `self.value = bias.value; self.value += x * w` must not change
        # the bias in place.
        return out[()] if out.ndim == 0 else out

    def _to_host(self, value: Any) -> Any:
        return numpy.array(value, copy=True)  # a snapshot, never the live array


OPS = NumpyOps(xp)  # the CPU's one set of ops (see NumpyOps)


def make_device(rest: str, spec: str) -> NumpyDevice:
    """'cpu', 'numpy' or 'numpy:cpu'."""
    if rest and spec.strip().lower().startswith("cpu"):
        raise DeviceError(f"unknown device spec {spec!r}: 'cpu' takes no index.\n"
                          "help: pass 'cpu'.")
    if rest.lower() not in ("", "cpu"):
        raise DeviceError(f"unknown device spec {spec!r}: NumPy has only the CPU.\n"
                          "help: pass 'cpu'.")
    return NumpyDevice("cpu", xp, "cpu")


def candidate_specs() -> list[str]:
    return ["cpu"]


def array_device_name(value: Any) -> str | None:
    """'cpu' for a NumPy array, None for anything else."""
    return "cpu" if array_api_compat.is_numpy_array(value) else None


def is_host_value(value: Any) -> bool:
    """Whether `value` is a host value: a NumPy array or scalar, a Python scalar or list.

    None and strings count too, so that `host_array` reports them as what they are.
    """
    return value is None or isinstance(
        value, (numpy.ndarray, numpy.generic, int, float, bool, list, tuple, str, bytes))


def host_array(value: Any, what: str) -> numpy.ndarray:
    """`value` as a NumPy array; GraphError if it is not numeric data."""
    if value is None:
        raise GraphError(f"{what} is None.\nhelp: feed an array (or set .value) first.")
    if isinstance(value, numpy.ma.MaskedArray):
        raise GraphError(f"{what} is a masked array; gpuflow would ignore its mask.\n"
                         "help: feed value.filled(fill_value) or drop the masked rows.")
    try:
        array = numpy.asarray(value)
    except (ValueError, TypeError) as exc:
        raise GraphError(f"{what} cannot be made into an array: {exc}.\n"
                         "help: feed a rectangular NumPy array or list of numbers.") from None
    if array.dtype.kind not in "biuf":
        raise GraphError(f"{what} has dtype {array.dtype}, not numbers.\n"
                         "help: feed a float (or integer label) NumPy array.")
    return array


def host_range(value: Any) -> tuple[Any, Any]:
    """(min, max) of a non-empty host array."""
    return value.min(), value.max()


def quiet_float_errors() -> Any:
    """NumPy without overflow, invalid and divide-by-zero warnings, in this thread (the
    numpy_threads workers take the caller's setting)."""
    return numpy.errstate(over="ignore", invalid="ignore", divide="ignore")


def host_rng(seed: int | None) -> numpy.random.Generator:
    """The seeded host generator that initial weights are drawn from on every device."""
    return numpy.random.default_rng(seed)


def host_zeros(shape: tuple[int, ...]) -> numpy.ndarray:
    """A float64 host array of zeros."""
    return numpy.zeros(shape)


def host_copy(value: Any) -> Any:
    """A copy of a NumPy array; anything else as it is (lists and scalars are copied anyway)."""
    return value.copy() if isinstance(value, numpy.ndarray) else value


class HostRng:
    """A seeded NumPy generator: `uniform(shape, dtype, out=None)` in [0, 1) (Device.rng)."""

    def __init__(self, seed: int) -> None:
        self._generator = numpy.random.default_rng(seed)

    def uniform(self, shape: tuple[int, ...], dtype: Any, out: Any = None) -> Any:
        """Uniform numbers in [0, 1) of `shape` and `dtype`, into `out` if given. NumPy draws
        only float32 and float64: float16 comes from float32 numbers, rounded and kept below 1."""
        if numpy.dtype(dtype) in (numpy.float32, numpy.float64):
            return self._generator.random(tuple(shape), dtype=dtype, out=out)
        return below_one(numpy, self._generator.random(tuple(shape), dtype=numpy.float32),
                         dtype, out)


def below_one(lib: Any, u: Any, dtype: Any, out: Any = None) -> Any:
    """float32 numbers `u` in [0, 1) rounded to the narrower `dtype` (NumPy or CuPy), into `out`
    if given: those that round up to 1 become the largest number below it."""
    top = lib.nextafter(lib.asarray(1, dtype=dtype), lib.asarray(0, dtype=dtype))
    return lib.minimum(u.astype(dtype), top, out=out)

