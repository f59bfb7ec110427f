"""CPU fast paths: causal attention in row blocks (replaces ops/attention.py's forward and
backward), and the AdamW update in one pass (replaces optim.adamw_update).

Query rows r0..r1−1 attend to keys 0..r1−1 only, so a row block's scores are the (r1−r0) × r1
product q[r0:r1] k[:r1]ᵀ, and the blocks above the diagonal, which the mask would zero, are never
computed: with T / ATTN_BLOCK blocks the products do (1 + 1/n_blocks)/2 of the full T × T work
(5/8 at T = 256), and so do the softmax passes and the exponentials. The products go to BLAS; the
softmax passes that NumPy cannot do in place are two Numba loops (`nogil`, single-threaded: the
runtime runs a batch's parts on their own threads at once). Exponentials are NumPy's: its SIMD exp
is several times faster than the scalar libm call a Numba loop makes.

fastmath is limited to reordering sums and fusing multiply-adds ("reassoc", "contract"), so results
differ from the reference only in rounding, and NaN and inf keep their meaning. Row sums accumulate
in the arrays' own dtype: a float64 accumulator would halve the SIMD width of a float32 loop.
Decoding (a KV cache) runs the reference: one query row at a time has no blocks to skip.

AdamW: NumPy's update makes about ten passes over each parameter's arrays (one per operator, each
writing a temporary); the kernel makes one, reading p, g, m, v once and writing p, m, v once.
"""

import functools
import math
from typing import NamedTuple

import numpy as np
from numba import njit

from ..ops import attention as reference
from . import replace

ATTN_BLOCK = 64
_jit = dict(cache=True, nogil=True, fastmath={"reassoc", "contract"})


class Cache(NamedTuple):
    q: object  # (N·H, T, hs), q · scale
    k: object  # (N·H, T, hs), the key/value heads repeated for the query heads that read them
    v: object
    p: list  # P of each row block, (N·H, r1 − r0, r1)
    scale: float
    group: int  # query heads per key/value head
    shape: tuple  # q's (N, H, T, hs)


def _row_blocks(T):
    return [(r0, min(T, r0 + ATTN_BLOCK)) for r0 in range(0, T, ATTN_BLOCK)]


@functools.cache
def _future(n):
    """(n, n) mask of the keys after each query in a diagonal block: True above the diagonal."""
    return np.triu(np.ones((n, n), dtype=bool), 1)


@njit(**_jit)
def _normalise(e, r0):  # e = exp(shifted scores), 0 after the last key; in place: rows sum to 1
    M, rows, _ = e.shape
    for m in range(M):
        for i in range(rows):
            n = r0 + i + 1
            total = e[m, i, 0]
            for j in range(1, n):
                total += e[m, i, j]
            inv = 1.0 / total
            for j in range(n):
                e[m, i, j] *= inv


@njit(**_jit)
def _softmax_backward(p, dp, r0):  # in place on dp: dS = P ⊙ (dP − rowsum(dP ⊙ P))
    M, rows, L = p.shape
    for m in range(M):
        for i in range(rows):
            n = r0 + i + 1
            dot = dp[m, i, 0] * p[m, i, 0]
            for j in range(1, n):
                dot += dp[m, i, j] * p[m, i, j]
            for j in range(n):
                dp[m, i, j] = p[m, i, j] * (dp[m, i, j] - dot)
            for j in range(n, L):
                dp[m, i, j] = 0.0


def _heads3(a):  # (N, H, T, hs) -> (N·H, T, hs)
    return np.ascontiguousarray(a).reshape(-1, a.shape[-2], a.shape[-1])


def forward(q, k, v, scale, kv=None):
    """ops/attention.forward. The scale goes into q before the product ((q·scale) kᵀ: a pass over
    q instead of over the scores); a row block's keys after its queries are all in its last
    r1 − r0 columns, which get −inf; then NumPy's row max, shift and exp, and `_normalise`."""
    if kv is not None:
        return reference.forward(q, k, v, scale, kv)
    group = q.shape[1] // k.shape[1]
    if group > 1:  # each query head reads its key/value head
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    q3, k3, v3 = _heads3(q), _heads3(k), _heads3(v)
    scale = q.dtype.type(scale)
    qs = q3 * scale
    y = np.empty(q3.shape, dtype=q.dtype)
    p_blocks = []
    for r0, r1 in _row_blocks(q3.shape[1]):
        p = qs[:, r0:r1] @ k3[:, :r1].transpose(0, 2, 1)  # (N·H, r1 − r0, r1)
        np.copyto(p[:, :, r0:], -np.inf, where=_future(r1 - r0))
        p -= p.max(axis=-1, keepdims=True)
        np.exp(p, out=p)
        _normalise(p, r0)
        np.matmul(p, v3[:, :r1], out=y[:, r0:r1])
        p_blocks.append(p)
    return y.reshape(q.shape), Cache(qs, k3, v3, p_blocks, scale, group, q.shape)


def backward(dy, cache):
    """ops/attention.backward, block by block: a row block's dS reaches dq of its own rows and dk,
    dv of the keys it attended to (0..r1−1)."""
    qs, k3, v3, p_blocks, scale, group, shape = cache
    dy3 = _heads3(dy)
    dq, dk, dv = np.empty_like(qs), np.zeros_like(k3), np.zeros_like(v3)
    for (r0, r1), p in zip(_row_blocks(qs.shape[1]), p_blocks):
        dy_b = dy3[:, r0:r1]
        dv[:, :r1] += p.transpose(0, 2, 1) @ dy_b
        ds = dy_b @ v3[:, :r1].transpose(0, 2, 1)  # dP, then dS in place
        _softmax_backward(p, ds, r0)
        np.matmul(ds, k3[:, :r1], out=dq[:, r0:r1])
        dk[:, :r1] += ds.transpose(0, 2, 1) @ qs[:, r0:r1]
    N, H, T, hs = shape
    dq *= scale  # dq = dS k · scale;  dk = dSᵀ (q · scale)
    dk, dv = dk.reshape(N, H // group, group, T, hs), dv.reshape(N, H // group, group, T, hs)
    return {"q": dq.reshape(shape), "k": dk.sum(axis=2), "v": dv.sum(axis=2)}


@njit(**_jit)
def _adamw(p, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step, sqrt_bc2, eps):
    for e in range(p.size):  # flat arrays; optim.adamw_update's arithmetic, in its order
        ge = g[e]
        me = beta1 * m[e] + one_minus_beta1 * ge
        ve = beta2 * v[e] + one_minus_beta2 * ge * ge
        m[e], v[e] = me, ve
        p[e] = p[e] * decay - step * me / (math.sqrt(ve) / sqrt_bc2 + eps)


def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2):
    """optim.adamw_update of p, m, v in place. The scalars are cast to the arrays' dtype, so a
    float32 parameter is updated in float32 arithmetic, as NumPy does it."""
    if not (p.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
        raise ValueError("adamw_update updates p, m and v in place: they must be C-contiguous")
    f = p.dtype.type
    _adamw(p.reshape(-1), np.ascontiguousarray(g).reshape(-1), m.reshape(-1), v.reshape(-1),
           f(1 - lr * weight_decay), f(beta1), f(1 - beta1), f(beta2), f(1 - beta2),
           f(lr / bias_correction1), f(math.sqrt(bias_correction2)), f(eps))


REPLACEMENTS = {"attention": replace(reference, forward=forward, backward=backward)}
