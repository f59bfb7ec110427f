"""Solutions to the exercises of lesson 11. Write yours first: `python lessons/11_loop_backward.py
--exercise N` grades the function in the lesson, `--exercise N --solution` grades the one here."""

import numpy as np


def state_path(kind, p, g, h_prev):
    """Exercise 1: add passes the gradient straight back (Ā = I); linear is a linear layer on the
    state, x = h W_h + u (lesson 2): G_{t−1} = G W_hᵀ and ∂ℓ/∂W_h = hᵀ G over every row."""
    if kind == "add":
        return g, None
    d_h = p["inject.W"].shape[1]
    W_h = p["inject.W"][:d_h]
    return g @ W_h.T, h_prev.reshape(-1, d_h).T @ g.reshape(-1, d_h)


def sigmoid(x):
    z = np.exp(-np.abs(x))  # never overflows
    return np.where(x >= 0, 1 / (1 + z), z / (1 + z))


def discretisation_backward(dA_bar, d_delta_B, A_log, dt_bias):
    """Exercise 2: Ā = exp(−Δa): ∂Ā/∂A_log = −Ā Δ a (∂a/∂A_log = a) and ∂Ā/∂Δ = −Ā a; Δ's two
    parts add up before the chain rule through softplus, whose derivative is the sigmoid."""
    a = np.exp(A_log)
    delta = np.maximum(dt_bias, 0) + np.log1p(np.exp(-np.abs(dt_bias)))
    A_bar = np.exp(-delta * a)
    d_delta = dA_bar * (-A_bar * a) + d_delta_B
    return dA_bar * (-A_bar * delta * a), d_delta * sigmoid(dt_bias)
