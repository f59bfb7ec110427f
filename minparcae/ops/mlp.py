"""ReLU² MLP, as the reference has it, no biases.

    u = x W_fc          a = relu(u)          g = ½ a²          y = g W_proj
    x: (..., d)   W_fc: (d, m)   W_proj: (m, d)      (m = 4d in the presets)

Backward, with G = dL/dy. Since d(½ relu(u)²)/du = relu(u) = a:

    dL/dW_proj = gᵀ G      dL/dg = G W_projᵀ      dL/du = dL/dg ⊙ a
    dL/dW_fc   = xᵀ dL/du  dL/dx = dL/du W_fcᵀ
"""

from typing import NamedTuple

from . import linear


class Cache(NamedTuple):
    fc: linear.Cache  # x, W_fc
    proj: linear.Cache  # g, W_proj
    a: object  # relu(u), (..., m)


def forward(x, w_fc, w_proj):
    u, fc_cache = linear.forward(x, w_fc)  # (..., m)
    a = u * (u > 0)
    g = 0.5 * a * a
    y, proj_cache = linear.forward(g, w_proj)  # (..., d)
    return y, Cache(fc_cache, proj_cache, a)


def backward(dout, cache):
    g_proj = linear.backward(dout, cache.proj)
    du = g_proj["x"] * cache.a
    g_fc = linear.backward(du, cache.fc)
    return {"x": g_fc["x"], "w_fc": g_fc["w"], "w_proj": g_proj["w"]}
