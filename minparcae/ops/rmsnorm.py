"""RMSNorm over the last axis, with an optional learnable weight.

    r = 1 / sqrt(mean_j x_j² + eps)          x̂ = x r          y = x̂ ⊙ w   (or y = x̂ without w)

Blocks use it with a weight; QK-norm uses it without one. Backward, with G = dL/dy and
ĝ = G ⊙ w (or G), over n = x.shape[-1]:

    dL/dw = Σ_rows G ⊙ x̂
    dL/dx = r (ĝ − x̂ · mean_j(ĝ_j x̂_j))

`add_forward` is the pre-norm block's "x ← x + res, then normalise" as one op (one pass on a GPU);
its backward takes `dres`, the gradient that reaches the sum through the residual path, and returns
dL/dx + dres.

The second line: x̂ = x r(x) and ∂r/∂x_j = −r³ x_j / n, so the Jacobian of x̂ is
r (I − x̂ x̂ᵀ / n), which is symmetric.
"""

from typing import NamedTuple

from ..backend import array_module

EPS = 1e-5


class Cache(NamedTuple):
    xhat: object  # x̂ (..., n)
    r: object  # 1 / rms, (..., 1)
    weight: object  # w (n,), or None


def forward(x, weight=None, eps=EPS):
    xp = array_module(x)
    r = 1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
    xhat = x * r
    y = xhat if weight is None else xhat * weight
    return y, Cache(xhat, r, weight)


def add_forward(x, res, weight=None, eps=EPS):
    """s = x + res and y = RMSNorm(s): returns (s, y, cache)."""
    s = x + res
    y, cache = forward(s, weight, eps)
    return s, y, cache


def backward(dout, cache, dres=None):
    xhat, r, weight = cache
    grads = {}
    if weight is not None:
        grads["weight"] = (dout * xhat).reshape(-1, xhat.shape[-1]).sum(axis=0)
        dout = dout * weight
    grads["x"] = r * (dout - xhat * (dout * xhat).mean(axis=-1, keepdims=True))
    if dres is not None:
        grads["x"] += dres
    return grads
