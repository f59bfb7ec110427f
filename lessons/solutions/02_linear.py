"""Solutions to the exercises of lesson 2. Write yours first: `python lessons/02_linear.py
--exercise N` grades the function in the lesson, `--exercise N --solution` grades the one here."""

import numpy as np


def linear_backward(dout, x, w):
    """Exercise 1: dL/dx = G Wᵀ, dL/dW = xᵀ G, the leading axes flattened into rows."""
    rows_x, rows_g = x.reshape(-1, x.shape[-1]), dout.reshape(-1, dout.shape[-1])
    return dout @ w.T, rows_x.T @ rows_g


def mlp_backward(dout, x, w_fc, w_proj):
    """Exercise 2: the forward again, then each line of it backwards."""
    u = x @ w_fc
    a = np.maximum(u, 0)
    g = 0.5 * a * a
    dg, dw_proj = linear_backward(dout, g, w_proj)
    du = dg * a  # d(½ relu(u)²)/du = relu(u) = a
    dx, dw_fc = linear_backward(du, x, w_fc)
    return dx, dw_fc, dw_proj


def central_differences(f, x, eps=1e-6):
    """Exercise 3: nudge each entry both ways, then restore it."""
    grad = np.zeros_like(x)
    flat, out = x.reshape(-1), grad.reshape(-1)  # views: writing flat[i] changes x
    for i in range(flat.size):
        kept = flat[i]
        flat[i] = kept + eps
        up = f()
        flat[i] = kept - eps
        down = f()
        flat[i] = kept
        out[i] = (up - down) / (2 * eps)
    return grad
