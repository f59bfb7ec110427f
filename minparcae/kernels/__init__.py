"""Fast paths that replace the reference code of an op, per device, without changing its results.

An op asks `fast(name, x)` for a replacement on the device of its input `x`; it gets a function, or
None and runs its readable `xp` code. `kernels/cpu.py` registers Numba `njit` versions for NumPy
arrays, `kernels/cuda.py` Numba CUDA versions for CuPy arrays; each is imported the first time it
is asked for. Tests compare every registered kernel with the reference.

Switch them off with `use_kernels(False)` or MINPARCAE_KERNELS=0 (the reference alone, to compare).

The contracts (array arguments are C-contiguous unless a line says otherwise; `fast` returns None
for dtypes a device's kernels do not cover):
    rmsnorm_forward(x, weight | None, eps)          -> (y, xhat, r)
    add_rmsnorm_forward(x, res, weight | None, eps) -> (x + res, y, xhat, r)
    rmsnorm_backward(dout, xhat, r, weight | None, dres | None) -> (dx (+ dres), dweight | None)
    rotary(x, cos, sin)                             -> y          (the backward passes −sin)
    rope_rmsnorm_forward(x, first, n, cos, sin, eps) -> (y, r)    QK-norm after rotary, no weight:
        y = RMSNorm(rotary(heads first..first+n−1 of x)), (B, n, T, hs); x: (B, T, heads, hs);
        r: (B, n, T, 1), as rmsnorm's
    rope_rmsnorm_backward(dy, y, r, cos, sin, out, first) -> None  dL/dx into those heads of out
    relu2_forward(u)                                -> (a, g)     a = relu(u), g = ½ a²
    relu2_backward(dg, a)                           -> dg ⊙ a
    injection_forward(h, u, A_bar)                  -> Ā ⊙ h + u
    injection_backward(dx, h, A_bar)                -> (dx ⊙ Ā, Σ_rows dx ⊙ h)
    adamw_step(p, g, m, v, lr, β1, β2, eps, wd, 1 − β1^t, 1 − β2^t) -> None   (in place, as optim.AdamW)
    softmax_xent(z, targets, valid, n_valid)        -> (loss_rows, grad)
        loss_rows[i] = valid_i (logsumexp z_i − z_i[y_i]);  grad = valid (softmax z − onehot y) / n_valid
    scatter_add(table, rows, values)                -> None       table[rows[i]] += values[i]
    matmul(a, b)                                    -> a @ b      a, b: matrices, any strides
    split_batch(job, B)                             -> [job(lo, hi), ...] for slices of range(B) that
        together cover it, in order, run at once (the reference: [job(0, B)])
    attention_forward(q, k, v, scale)               -> (y, cache)   causal; q, k, v: (B, H, T, hs)
    attention_backward(dy, cache)                   -> (dq, dk, dv)  (the op keeps the pair together)
"""

import os

import numpy as np

from ..backend import array_module

KERNELS_ENV = "MINPARCAE_KERNELS"
_registry = {"cpu": None, "gpu": None}
_state = {"enabled": os.environ.get(KERNELS_ENV, "1") != "0"}


def use_kernels(flag):
    """Turn the fast paths on or off (the reference code runs when they are off)."""
    _state["enabled"] = bool(flag)


def kernels_enabled():
    return _state["enabled"]


def reference(fn, *args, **kw):
    """fn(*args, **kw) with every fast path off: the ops' own `xp` code, to compare kernels with."""
    saved = _state["enabled"]
    _state["enabled"] = False
    try:
        return fn(*args, **kw)
    finally:
        _state["enabled"] = saved


def _load(device):
    if _registry[device] is None:
        if device == "cpu":
            from . import cpu as module
        else:
            from . import cuda as module
        _registry[device] = module.KERNELS
    return _registry[device]


def fast(name, x):
    """The registered replacement for op `name` on the device of array `x`, or None."""
    if not _state["enabled"]:
        return None
    device = "cpu" if array_module(x) is np else "gpu"
    entry = _load(device).get(name)
    if entry is None:
        return None
    func, dtypes = entry
    return func if np.dtype(x.dtype) in dtypes else None
