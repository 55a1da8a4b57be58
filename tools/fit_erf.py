"""Fit the polynomials of gpuflow/backends/special.py's portable erf (needs mpmath and NumPy).

    python tools/fit_erf.py     # prints the coefficient tuples and the fits' errors
"""

import math

import mpmath as mp
import numpy as np

mp.mp.dps = 50
# float64: erf(x) / x as a polynomial in t = x^2 - 2 over x in [0, 2] (18 coefficients)
small, small_error = mp.chebyfit(
    lambda t: mp.erf(mp.sqrt(t + 2)) / mp.sqrt(t + 2) if t + 2 > 0 else 2 / mp.sqrt(mp.pi),
    [-2, 2], 18, error=True)
# exp(x^2) erfc(x) as a polynomial in s = 1/x - 1/3 over x in [2, 6] (16 coefficients)
third = mp.mpf(1) / 3
large, large_error = mp.chebyfit(lambda s: mp.exp(1 / (s + third) ** 2) * mp.erfc(1 / (s + third)),
                                 [mp.mpf(1) / 6 - third, mp.mpf(1) / 2 - third], 16, error=True)
print("_ERF_SMALL =", tuple(float(c) for c in small), f"# max error {float(small_error):.1e}")
print("_ERFCX_LARGE =", tuple(float(c) for c in large), f"# max error {float(large_error):.1e}")


# float32: two rationals, each a minimax fit (Lawson's iteratively reweighted least squares
# on the linearised problem N - F D = 0, D(0) = 1) of the error that lands in erf itself,
# relative to erf; then made monic in D and rounded to float32 (the coefficients a float32
# array is multiplied by). Fitted in float64 against mpmath's values: the errors wanted
# (1e-9) are far above float64's rounding.
def rational_fit(v, target, weight, n, m, rounds=400):
    """N / D (degrees n, m, coefficients lowest first) minimising max |weight (N/D - target)|
    over the points v; returns (max error, N, D)."""
    vn = v[:, None] ** np.arange(n + 1)
    vd = v[:, None] ** np.arange(1, m + 1)
    system = np.hstack([vn, -target[:, None] * vd])
    scale = np.abs(system).max(axis=0)
    w, d_last, best = np.full(len(v), 1.0 / len(v)), np.ones_like(v), None
    for _ in range(rounds):
        row = np.sqrt(w) * weight / np.abs(d_last)
        c = np.linalg.lstsq(system / scale * row[:, None], target * row, rcond=None)[0] / scale
        num, den = c[:n + 1], np.concatenate([[1.0], c[n + 1:]])
        d_last = 1.0 + vd @ den[1:]
        error = weight * (vn @ num / d_last - target)
        if best is None or np.abs(error).max() < best[0]:
            best = (np.abs(error).max(), num, den)
        w = np.maximum(w * np.abs(error) / (w * np.abs(error)).sum(), 1e-300)
    return best


def chebyshev_points(lo, hi, count=4000):
    k = np.arange(count)
    return np.concatenate([lo + (hi - lo) * (0.5 - 0.5 * np.cos(np.pi * (k + 0.5) / count)),
                           [lo, hi]])


def as_float32(num, den):
    """Monic in D (its leading 1 left out), each coefficient rounded to float32, highest
    first (Horner's order)."""
    lead = den[-1]
    return (tuple(float(np.float32(c / lead)) for c in num[::-1]),
            tuple(float(np.float32(c / lead)) for c in den[-2::-1]))


SPLIT, ONE = 1.0, 4.0  # float32's erf rounds to 1 from x = 3.92 (erfc(4) = 1.5e-8 < 2^-25)
# |x| < 1: erf(x) = x + x N(t) / D(t), t = x^2: N/D fits erf(x)/x - 1, degrees 3 and 2
x = chebyshev_points(0.0, SPLIT)
ratio = np.array([float(mp.erf(v) / v) if v else 2 / math.sqrt(math.pi) for v in x])
error32, num, den = rational_fit(x * x, ratio - 1.0, 1.0 / ratio, 3, 2)
print("_ERF32_SMALL =", as_float32(num, den), f"# max error {error32:.1e} (relative to erf)")
# 1 <= |x| <= 4: erf(x) = 1 - exp(-x^2) N(x) / D(x): N/D fits exp(x^2) erfc(x), degrees 3, 2
x = chebyshev_points(SPLIT, ONE)
erfcx = np.array([float(mp.exp(v * v) * mp.erfc(v)) for v in x])
error32, num, den = rational_fit(x, erfcx, np.exp(-x * x) / np.array([math.erf(v) for v in x]),
                                 3, 2)
print("_ERF32_LARGE =", as_float32(num, den), f"# max error {error32:.1e} (relative to erf)")
