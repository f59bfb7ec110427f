"""QK-norm after the rotary embedding: y = N(RoPE(x)), where N is RMSNorm without a weight, on the
query (or key) heads of an attention layer.

    x: (N, T, heads, hs), the heads as the q/k/v product lays them out  ->  y: (N, heads, T, hs)

It is the composition of rotary.py and rmsnorm.py, and its backward is theirs in reverse order:
dL/dx = RoPEᵀ(N'(dL/dy)), transposed back to the input's layout. N's epsilon is the machine epsilon
of x's dtype (2.2e-16 in float64, 1.19e-7 in float32), as in the official Parcae code, whose QK-norm
calls PyTorch's RMSNorm without an eps; the blocks' RMSNorms use 1e-5. A rotation
keeps each pair's length, so N(RoPE(x)) = RoPE(N(x)): a fused version can take 1/rms before
rotating, in one pass over each row.
"""

from typing import NamedTuple

from . import rmsnorm, rotary


class Cache(NamedTuple):
    norm: rmsnorm.Cache  # x̂ = y, r
    rope: rotary.Cache  # cos, sin


def eps_for(dtype):
    """The epsilon N uses for inputs of `dtype`: that dtype's machine epsilon."""
    import numpy as np
    return float(np.finfo(dtype).eps)


def forward(x, cos, sin, eps=None):
    """x: (N, T, heads, hs), any strides; cos, sin: (T, hs/2). Returns y (N, heads, T, hs).
    eps None: `eps_for(x.dtype)`."""
    eps = eps_for(x.dtype) if eps is None else eps
    rotated, rope_cache = rotary.forward(x.transpose(0, 2, 1, 3), cos, sin)
    y, norm_cache = rmsnorm.forward(rotated, None, eps)
    return y, Cache(norm_cache, rope_cache)


def backward(dy, cache):
    """dL/dx (N, T, heads, hs) from dL/dy (N, heads, T, hs)."""
    d_rotated = rmsnorm.backward(dy, cache.norm)["x"]
    return {"x": rotary.backward(d_rotated, cache.rope)["x"].transpose(0, 2, 1, 3)}
