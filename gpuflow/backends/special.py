"""Functions the array API standard lacks, written on any array namespace: the portable
routes behind `Ops.erf` and `Ops.scatter_add_rows` (a backend whose library has its own
overrides the op)."""

from __future__ import annotations

from typing import Any

# erf(x) = x P(x^2 - 2) for |x| < 2 and 1 - exp(-x^2) Q(1/|x| - 1/3) for 2 <= |x| < 6 (erf
# rounds to 1 beyond): P and Q are Chebyshev fits, to 2e-18 and 6e-17, of erf(x)/x on
# [0, 4] in x^2 and of exp(x^2) erfc(x) on [1/6, 1/2] in 1/x, made with mpmath by
# tools/fit_erf.py. In float64 the result is within 2 ulp of erf at every x (1 ulp for the
# C library's): tests/test_sequence.py checks it against mpmath.
_ERF_SMALL = (
    -1.4399844165014253e-17, 2.62738924491641e-16, -4.277203562413309e-15,
    6.916266960425581e-14, -1.0519610771735585e-12, 1.494076148784729e-11,
    -1.975144017269353e-10, 2.417774471448454e-09, -2.723881587421338e-08,
    2.8047269055247723e-07, -2.6183088556977705e-06, 2.1954553493521303e-05,
    -0.00016358986987993835, 0.0010705215357389465, -0.0060828471811443866,
    0.029869784652462907, -0.1305559304656227, 0.674933236039655)
_ERFCX_LARGE = (
    3.586406604048527, -1.3271449305035954, -0.6686072573809234, 0.9989363349361461,
    -0.6508548181638285, 0.16324701037124956, 0.17991584144147027, -0.27846985499680166,
    0.18107643257615744, -0.004657735518726179, -0.134841286913459, 0.1614728561865362,
    -0.05014611072271878, -0.18141695624433918, 0.4893503400645558, 0.17900115118139)


def _horner(coefficients: tuple, t: Any) -> Any:
    total = coefficients[0] * t + coefficients[1]
    for c in coefficients[2:]:
        total = total * t + c
    return total


def erf(xp: Any, x: Any) -> Any:
    """The error function of a real floating array, in its dtype (see the fits above)."""
    a = xp.abs(x)
    # Each branch sees only its own range: no overflow, no 1/0.
    small = xp.minimum(a, 2.0)
    small = small * _horner(_ERF_SMALL, small * small - 2.0)
    large = xp.minimum(xp.maximum(a, 2.0), 6.0)
    large = 1.0 - xp.exp(-(large * large)) * _horner(_ERFCX_LARGE, 1.0 / large - 1.0 / 3.0)
    return xp.sign(x) * xp.where(a < 2.0, small, large)


def _horner_into(lib: Any, coefficients: tuple, t: Any, out: Any) -> Any:
    """`_horner` written into `out` (the same operations in the same order)."""
    total = lib.multiply(t, coefficients[0], out=out)
    total = lib.add(total, coefficients[1], out=total)
    for c in coefficients[2:]:
        total = lib.multiply(total, t, out=total)
        total = lib.add(total, c, out=total)
    return total


def erf_into(lib: Any, x: Any, out: Any, work: Any) -> Any:
    """`erf(x)` written into `out` (which must not be x) for a library whose functions take
    `out=` (NumPy, CuPy): the same operations in the same order, so the same numbers, with no
    temporary array. `work` ((4,) + x.shape, x's dtype) is overwritten."""
    a, t, h, m = (work[i] for i in range(4))
    a = lib.abs(x, out=a)
    small = lib.minimum(a, 2.0, out=out)
    t = lib.multiply(small, small, out=t)
    t = lib.subtract(t, 2.0, out=t)
    small = lib.multiply(small, _horner_into(lib, _ERF_SMALL, t, h), out=small)
    large = lib.maximum(a, 2.0, out=t)
    large = lib.minimum(large, 6.0, out=large)
    e = lib.multiply(large, large, out=h)
    e = lib.exp(lib.negative(e, out=e), out=e)
    u = lib.divide(1.0, large, out=large)
    u = lib.subtract(u, 1.0 / 3.0, out=u)
    large = lib.multiply(e, _horner_into(lib, _ERFCX_LARGE, u, m), out=e)
    large = lib.subtract(1.0, large, out=large)
    # where(a < 2, small, large): large copied where not a < 2, the mask in m's memory
    outside = m.reshape(-1).view(lib.bool_)[:a.size].reshape(a.shape)
    outside = lib.logical_not(lib.less(a, 2.0, out=outside), out=outside)
    lib.copyto(out, large, where=outside)
    return lib.multiply(lib.sign(x, out=a), out, out=out)


def scatter_add_rows(xp: Any, ids: Any, values: Any, rows: int) -> Any:
    """A (rows, dim) array whose row r is the sum of the rows values[i] with ids[i] == r (ids
    (M,) integers in [0, rows), values (M, dim)): one matmul with the one-hot (M, rows) matrix
    of the ids, exact since its products are 1 * v or 0."""
    labels = xp.arange(rows, dtype=ids.dtype, device=getattr(ids, "device", None))
    onehot = xp.astype(xp.reshape(ids, (-1, 1)) == labels, values.dtype)
    return xp.matrix_transpose(onehot) @ values
