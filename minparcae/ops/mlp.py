"""ReLU² MLP, as the reference has it, no biases.

    u = x W_fc          a = relu(u)          g = ½ a²          y = g W_proj
    x: (..., d)   W_fc: (d, m)   W_proj: (m, d)      (m = 4d in the presets)

Backward, with G = dL/dy. Since d(½ relu(u)²)/du = relu(u) = a:

    dL/dW_proj = gᵀ G      dL/dg = G W_projᵀ      dL/du = dL/dg ⊙ a
    dL/dW_fc   = xᵀ dL/du  dL/dx = dL/du W_fcᵀ
"""

from .. import kernels
from . import linear


def forward(x, w_fc, w_proj):
    u, fc_cache = linear.forward(x, w_fc)  # (..., m)
    kernel = kernels.fast("relu2_forward", u)
    if kernel is not None:
        a, g = kernel(u)
    else:
        a = u * (u > 0)
        g = 0.5 * a * a
    y, proj_cache = linear.forward(g, w_proj)  # (..., d)
    return y, (fc_cache, proj_cache, a)


def backward(dout, cache):
    fc_cache, proj_cache, a = cache
    g_proj = linear.backward(dout, proj_cache)
    kernel = kernels.fast("relu2_backward", a)
    du = kernel(g_proj["x"], a) if kernel is not None else g_proj["x"] * a
    g_fc = linear.backward(du, fc_cache)
    return {"x": g_fc["x"], "w_fc": g_fc["w"], "w_proj": g_proj["w"]}
