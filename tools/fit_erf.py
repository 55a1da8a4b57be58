"""Fit the polynomials of gpuflow/backends/special.py's portable erf (needs mpmath).

    python tools/fit_erf.py     # prints _ERF_SMALL, _ERFCX_LARGE and the fits' errors
"""

import mpmath as mp

mp.mp.dps = 50
# erf(x) / x as a polynomial in t = x^2 - 2 over x in [0, 2] (18 coefficients)
small, small_error = mp.chebyfit(
    lambda t: mp.erf(mp.sqrt(t + 2)) / mp.sqrt(t + 2) if t + 2 > 0 else 2 / mp.sqrt(mp.pi),
    [-2, 2], 18, error=True)
# exp(x^2) erfc(x) as a polynomial in s = 1/x - 1/3 over x in [2, 6] (16 coefficients)
third = mp.mpf(1) / 3
large, large_error = mp.chebyfit(lambda s: mp.exp(1 / (s + third) ** 2) * mp.erfc(1 / (s + third)),
                                 [mp.mpf(1) / 6 - third, mp.mpf(1) / 2 - third], 16, error=True)
print("_ERF_SMALL =", tuple(float(c) for c in small), f"# max error {float(small_error):.1e}")
print("_ERFCX_LARGE =", tuple(float(c) for c in large), f"# max error {float(large_error):.1e}")
