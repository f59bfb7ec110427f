"""Finite-difference gradient checks.

For a scalar function L(θ) and one entry θ_i, the central difference

    g_i ≈ (L(θ + ε e_i) − L(θ − ε e_i)) / (2ε)

has truncation error O(ε²) and rounding error O(u/ε) (u = 2^-53 in float64), so ε ≈ 1e-6 gives
about 10 correct digits on the smooth functions here. That is why every check runs in float64.

To check an op whose output is a tensor y = f(x, w, ...), `check_op` projects it onto a fixed
random tensor R: L = Σ y ⊙ R, so dL/dy = R is exactly the `dout` the backward receives.

The error reported for each tensor is normwise:

    err = max_i |g_i − a_i| / max(max_i |g_i|, max_i |a_i|, tiny)

over the checked entries (a = analytic, g = numeric). It is scale-free, and unlike a per-entry
ratio it does not blow up on entries that are zero up to rounding. A wrong backward gives O(1).
"""

import numpy as np

from .backend import to_host

EPS = 1e-6


def numeric_grad(f, x, eps=EPS, n_samples=None, rng=None):
    """Central differences of the scalar f() with respect to the array `x`, perturbed in place.
    Returns (flat indices checked, numeric gradient at those indices)."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float64 or not x.flags.c_contiguous:
        raise TypeError("finite differences need contiguous float64 NumPy arrays")
    size = x.size
    if n_samples is None or n_samples >= size:
        idx = np.arange(size)
    else:
        rng = rng or np.random.default_rng(0)
        idx = np.sort(rng.choice(size, n_samples, replace=False))
    flat = x.reshape(-1)  # a view of x, since x is contiguous
    g = np.empty(len(idx))
    for j, i in enumerate(idx):
        old = float(flat[i])
        flat[i] = old + eps
        fp = float(f())
        flat[i] = old - eps
        fm = float(f())
        flat[i] = old
        g[j] = (fp - fm) / (2 * eps)
    return idx, g


def rel_error(analytic, numeric):
    """Normwise relative error max|a − n| / max(max|a|, max|n|, 1e-30)."""
    a = np.asarray(analytic, dtype=np.float64).reshape(-1)
    n = np.asarray(numeric, dtype=np.float64).reshape(-1)
    scale = max(np.abs(a).max(initial=0.0), np.abs(n).max(initial=0.0), 1e-30)
    return float(np.abs(a - n).max(initial=0.0) / scale)


def check_grads(loss_fn, inputs, grads, n_samples=None, eps=EPS, seed=0):
    """Compare analytic gradients with central differences of `loss_fn()`.

    inputs: dict name -> float64 array that loss_fn reads (perturbed in place, then restored).
    grads:  dict name -> analytic dL/d(input), same shapes (names missing here are skipped).
    n_samples: check at most this many random entries per tensor (None = all).
    Returns dict name -> normwise relative error (see the module docstring).
    """
    rng = np.random.default_rng(seed)
    errors = {}
    for name, x in inputs.items():
        if name not in grads:
            continue
        if grads[name].shape != x.shape:
            raise ValueError(f"gradient of {name} has shape {grads[name].shape}, input has {x.shape}")
        idx, g = numeric_grad(loss_fn, x, eps=eps, n_samples=n_samples, rng=rng)
        a = to_host(grads[name]).reshape(-1)[idx]
        errors[name] = rel_error(a, g)
    return errors


def check_op(forward, backward, inputs, n_samples=None, eps=EPS, seed=0, **static):
    """Gradient check of an op with the `forward(**inputs, **static) -> (out, cache)` /
    `backward(dout, cache) -> dict of grads` convention, through L = Σ out ⊙ R.

    Returns (max error over all inputs, dict name -> error)."""
    rng = np.random.default_rng(seed)
    out, _ = forward(**inputs, **static)
    R = rng.standard_normal(out.shape)

    def loss():
        return float((forward(**inputs, **static)[0] * R).sum())

    _, cache = forward(**inputs, **static)
    grads = backward(R.copy(), cache)
    errors = check_grads(loss, inputs, grads, n_samples=n_samples, eps=eps, seed=seed)
    return max(errors.values()), errors
