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

# float32 (about 30 float32 operations, not the ~40 of the float64 formula run in float32):
# erf(x) = x + x N(t) / D(t), t = x^2, for |x| < 1 and 1 - exp(-x^2) N(|x|) / D(|x|) for
# 1 <= |x| <= 4 (float32's erf rounds to 1 from 3.92): minimax rationals, to 2e-9 and 1e-9
# of erf, made by tools/fit_erf.py; (numerator, monic denominator without its leading 1),
# highest power first, each coefficient a float32 number. Either form adds a small correction
# to x or subtracts one from 1, so float32's rounding inside the rationals hardly shows: the
# result is within 1.4 ulp of erf (every 7th float32 in [0, 4] checked against the float64
# formula; tests/test_sequence.py checks a grid against mpmath).
_ERF32_SMALL = ((-0.035628143697977066, -0.3875041604042053, -8.786158561706543,
                 3.4079365730285645), (9.33514404296875, 26.545869827270508))
_ERF32_LARGE = ((-0.0013879090547561646, 0.016941560432314873, 0.4720669388771057,
                 1.505090594291687), (2.151380777359009, 1.5090209245681763))
ERF32_SPLIT, ERF32_ONE = 1.0, 4.0


def _horner(coefficients: tuple, t: Any) -> Any:
    total = coefficients[0] * t + coefficients[1]
    for c in coefficients[2:]:
        total = total * t + c
    return total


def _monic(coefficients: tuple, t: Any) -> Any:
    total = t + coefficients[0]
    for c in coefficients[1:]:
        total = total * t + c
    return total


def erf(xp: Any, x: Any) -> Any:
    """The error function of a real floating array, in its dtype (see the fits above): the
    float32 formula for float32, the float64 one for the other dtypes."""
    if x.dtype == xp.float32:
        return _erf_float32(xp, x)
    a = xp.abs(x)
    # Each branch sees only its own range: no overflow, no 1/0.
    small = xp.minimum(a, 2.0)
    small = small * _horner(_ERF_SMALL, small * small - 2.0)
    large = xp.minimum(xp.maximum(a, 2.0), 6.0)
    large = 1.0 - xp.exp(-(large * large)) * _horner(_ERFCX_LARGE, 1.0 / large - 1.0 / 3.0)
    return xp.sign(x) * xp.where(a < 2.0, small, large)


def _erf_float32(xp: Any, x: Any) -> Any:
    clipped = xp.minimum(xp.maximum(x, -ERF32_ONE), ERF32_ONE)  # NaN stays NaN
    a = xp.abs(clipped)
    t = a * a
    numerator, denominator = _ERF32_SMALL
    small = clipped + clipped * (_horner(numerator, t) / _monic(denominator, t))
    numerator, denominator = _ERF32_LARGE
    large = 1.0 - xp.exp(-t) * (_horner(numerator, a) / _monic(denominator, a))
    return xp.where(a < ERF32_SPLIT, small, xp.copysign(large, clipped))


def scatter_add_rows(xp: Any, ids: Any, values: Any, rows: int) -> Any:
    """A (rows, dim) array whose row r is the sum of the rows values[i] with ids[i] == r (ids
    (M,) integers in [0, rows), values (M, dim)): one matmul with the one-hot (M, rows) matrix
    of the ids, exact since its products are 1 * v or 0."""
    labels = xp.arange(rows, device=getattr(ids, "device", None))  # not ids' dtype: uint8 wraps
    onehot = xp.astype(xp.reshape(ids, (-1, 1)) == labels, values.dtype)
    return xp.matrix_transpose(onehot) @ values
