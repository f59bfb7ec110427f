"""The test-time looping law, L(T) = L∞ + Z·e^(−zT), fitted by least squares.

Only z enters non-linearly: for a fixed z the model is linear in (L∞, Z), and the best pair is an
ordinary least-squares solve with the design matrix [1, e^(−zT)]. So the fit is a one-dimensional
search over z of the residual that remains after that solve ("variable projection"): a coarse
scan of z on a log grid finds the basin, then golden-section search narrows it to machine
precision. (lessons/10_test_time_looping.py derives the same idea with the grid alone.)
"""

import math

import numpy as np

Z_MIN, Z_MAX = 1e-3, 20.0


def law(T, L_inf, Z, z):
    return L_inf + Z * np.exp(-z * np.asarray(T, dtype=np.float64))


def _solve(T, L, z):
    """Best (L∞, Z) for this z, and the sum of squared residuals."""
    X = np.stack([np.ones_like(T), np.exp(-z * T)], axis=1)
    coef, *_ = np.linalg.lstsq(X, L, rcond=None)
    r = X @ coef - L
    return coef, float(r @ r)


def fit_law(T, L, z_min=Z_MIN, z_max=Z_MAX, grid=400, tol=1e-12):
    """Least-squares (L∞, Z, z) for the points (T, L), with z searched in [z_min, z_max].

    Returns a dict with L_inf, Z, z, the fit's mean error in nats over the points (mean |fit − L|),
    that error as a fraction of the whole effect of looping (`effect_error`: mean |fit − L| over
    |L(T_min) − L∞|, the gap between the fewest loops measured and the limit; a fit error quoted
    against L itself would look small for any curve, a flat line's included) and `at_bound` (True when the best z is an end of the range, i.e. the data
    did not pin it down: a straight line, or a drop finished within the first point)."""
    T, L = np.asarray(T, dtype=np.float64), np.asarray(L, dtype=np.float64)
    if T.shape != L.shape or T.ndim != 1 or len(T) < 3:
        raise ValueError("fit_law needs matching 1-D arrays of at least 3 points.")
    if not (np.all(np.isfinite(T)) and np.all(np.isfinite(L))):
        raise ValueError("fit_law needs finite values.")
    zs = np.geomspace(z_min, z_max, grid)
    sse = np.array([_solve(T, L, z)[1] for z in zs])
    i = int(np.argmin(sse))
    lo, hi = math.log(zs[max(i - 1, 0)]), math.log(zs[min(i + 1, grid - 1)])
    g = (math.sqrt(5) - 1) / 2  # golden-section search on log z within the bracketing grid cells
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = _solve(T, L, math.exp(a))[1], _solve(T, L, math.exp(b))[1]
    while hi - lo > tol:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = _solve(T, L, math.exp(a))[1]
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = _solve(T, L, math.exp(b))[1]
    z = math.exp((lo + hi) / 2)
    (L_inf, Z), _ = _solve(T, L, z)
    fit = law(T, L_inf, Z, z)
    mean_error = float(np.mean(np.abs(fit - L)))
    effect = abs(float(L[np.argmin(T)]) - float(L_inf))
    return {"L_inf": float(L_inf), "Z": float(Z), "z": z, "mean_error": mean_error,
            "effect_error": mean_error / effect if effect > 0 else math.inf,
            "at_bound": i in (0, grid - 1)}


def loops_to_plateau(Z, z, tol=1e-3):
    """The loop count after which the fitted law stays within `tol` nats of its limit L∞:
    |Z|·e^(−zT) ≤ tol, so T = ln(|Z|/tol)/z (0 when the whole gain is below tol)."""
    return max(0.0, math.log(abs(Z) / tol) / z) if Z else 0.0
