"""Rotary position embedding (RoPE), adjacent pairs.

Each head vector x ∈ R^hs is cut into hs/2 adjacent pairs (x_{2i}, x_{2i+1}); at position p the
pair i is rotated by the angle p·θ_i with θ_i = base^(−2i/hs):

    y_{2i}   = x_{2i} cos(pθ_i) − x_{2i+1} sin(pθ_i)
    y_{2i+1} = x_{2i} sin(pθ_i) + x_{2i+1} cos(pθ_i)

A rotation is orthogonal, so the backward is the rotation by −pθ_i:

    dx_{2i}   =  g_{2i} cos + g_{2i+1} sin
    dx_{2i+1} = −g_{2i} sin + g_{2i+1} cos

Because it preserves each pair's length it also preserves ‖x‖, which is why QK-norm commutes
with it.
"""

from typing import NamedTuple

import numpy as np

BASE = 50_000.0


def tables(n_pos, head_size, base=BASE, offset=0, xp=np, dtype=np.float32):
    """cos and sin of p·θ_i for positions offset..offset+n_pos−1: two (n_pos, head_size/2) arrays."""
    if head_size % 2:
        raise ValueError(f"rotary embedding needs an even head size, got {head_size}")
    theta = base ** (-np.arange(0, head_size, 2, dtype=np.float64) / head_size)  # (hs/2,)
    angles = np.arange(offset, offset + n_pos, dtype=np.float64)[:, None] * theta  # (T, hs/2)
    return xp.asarray(np.cos(angles), dtype=dtype), xp.asarray(np.sin(angles), dtype=dtype)


class Cache(NamedTuple):
    cos: object  # (T, hs/2)
    sin: object


def rotate(x, cos, sin):
    """Rotate adjacent pairs of x (..., T, hs) by the angles whose cos/sin are (T, hs/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    y = x.copy()
    y[..., 0::2] = x1 * cos - x2 * sin
    y[..., 1::2] = x1 * sin + x2 * cos
    return y


def forward(x, cos, sin):
    """x: (B, H, T, hs); cos, sin: (T, hs/2)."""
    return rotate(x, cos, sin), Cache(cos, sin)


def backward(dout, cache):
    return {"x": rotate(dout, cache.cos, -cache.sin)}
