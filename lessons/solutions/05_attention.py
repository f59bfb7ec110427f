"""Solutions to the exercises of lesson 5. Write yours first: `python lessons/05_attention.py
--exercise N` grades the function in the lesson, `--exercise N --solution` grades the one here."""

import numpy as np


def rotary_backward(dout, cos, sin):
    """Exercise 1: a rotation's inverse is its transpose, the rotation by −pθ_i."""
    g1, g2 = dout[..., 0::2], dout[..., 1::2]
    dx = np.empty_like(dout)
    dx[..., 0::2] = g1 * cos + g2 * sin
    dx[..., 1::2] = -g1 * sin + g2 * cos
    return dx


def softmax_backward(dp, p):
    """Exercise 2: J dp = p ⊙ dp − p (p · dp) for J = diag(p) − p pᵀ."""
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))


def attention_backward(dy, q, k, v, scale):
    """Exercise 3: each line of the forward, backwards."""
    S = q.shape[-2]
    s = np.where(np.tri(S, dtype=bool), q @ k.swapaxes(-1, -2) * scale, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    dp = dy @ v.swapaxes(-1, -2)            # Y = P v
    dv = p.swapaxes(-1, -2) @ dy
    ds = softmax_backward(dp, p) * scale    # masked entries have p = 0: no gradient
    return ds @ k, ds.swapaxes(-1, -2) @ q, dv
