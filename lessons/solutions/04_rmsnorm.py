"""Solutions to the exercises of lesson 4. Write yours first: `python lessons/04_rmsnorm.py
--exercise N` grades the function in the lesson, `--exercise N --solution` grades the one here."""

import numpy as np


def rmsnorm_backward(dout, x, w, eps=1e-5):
    """Exercise 1: recompute r and x̂; dL/dw sums G ⊙ x̂ over the rows, dL/dx = J ĝ."""
    r = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    xhat = x * r
    dw = (dout * xhat).reshape(-1, x.shape[-1]).sum(axis=0)
    g = dout * w
    return r * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True)), dw


def layernorm_backward(dout, x, eps=1e-5):
    """Exercise 2: with x̂ = (x − μ) r, the Jacobian is r (I − 11ᵀ/n − x̂x̂ᵀ/n): it removes the
    direction of the constant vector (the mean) as well as that of x̂ (the scale), so
    dL/dx = r (G − mean_j G_j − x̂ · mean_j(G_j x̂_j))."""
    xc = x - x.mean(axis=-1, keepdims=True)
    r = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    xhat = xc * r
    return r * (dout - dout.mean(axis=-1, keepdims=True)
                - xhat * (dout * xhat).mean(axis=-1, keepdims=True))
