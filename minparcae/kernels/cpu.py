"""CPU fast paths: Numba `njit` loops that replace whole ops (REPLACEMENTS at the end): RMSNorm, QK-norm
with its rotary embedding, the MLP's ReLU², cross-entropy, the embedding's scatter-add, and causal
attention in row blocks. Each loop is compiled single-threaded and without the GIL: the runtime runs
a batch's parts on their own threads at once (minparcae/runtime.py), and inside a part one core is
all there is.

Why the row-wise ones are faster than the reference: NumPy evaluates `x * r * w` as separate passes
over memory, each writing a temporary, and a call on a small array is mostly its fixed cost; a loop
makes one pass per row and keeps the row in cache. Exponentials stay NumPy's: its SIMD exp is
several times faster than the scalar libm call a Numba loop makes, so the cross-entropy's softmax is
a loop (shift by the row max), NumPy's exp in place, a loop (normalise): three passes where the
reference makes six.

Attention: query rows r0..r1−1 attend to keys 0..r1−1 only, so a row block's scores are the
(r1−r0) × r1 product q[r0:r1] k[:r1]ᵀ, and the blocks above the diagonal, which the mask would zero,
are never computed: with T / ATTN_BLOCK blocks the products (BLAS) do (1 + 1/n_blocks)/2 of the full
T × T work (5/8 at T = 256), and so do the softmax passes and the exponentials. Decoding (a KV
cache) runs the reference: one query row at a time has no blocks to skip.

fastmath is limited to reordering sums and fusing multiply-adds ("reassoc", "contract"), so results
differ from the reference only in rounding, and NaN and inf keep their meaning. Row sums accumulate
in the arrays' own dtype: a float64 accumulator would halve the SIMD width of a float32 loop.
"""

import functools
import math
from typing import NamedTuple

import numpy as np
from numba import njit

from ..ops import attention as ops_attention
from ..ops import cross_entropy as ops_cross_entropy
from ..ops import embedding as ops_embedding
from ..ops import linear as ops_linear
from ..ops import mlp as ops_mlp
from ..ops import qk_norm as ops_qk_norm
from ..ops import rmsnorm as ops_rmsnorm
from ..ops import rotary as ops_rotary
from ..ops.linear import rows_matmul
from . import replace

ATTN_BLOCK = 64
_jit = dict(cache=True, nogil=True, fastmath={"reassoc", "contract"})


def _rows(a):
    return np.ascontiguousarray(a).reshape(-1, a.shape[-1])


# ----------------------------------------------------------------------------- RMSNorm

@njit(**_jit)
def _rmsnorm_forward(x, w, has_w, eps, y, xhat, r):  # x: (N, n)
    N, n = x.shape
    for i in range(N):
        ss = x[i, 0] * x[i, 0]
        for j in range(1, n):
            ss += x[i, j] * x[i, j]
        ri = 1.0 / math.sqrt(ss / n + eps)
        r[i] = ri
        for j in range(n):
            xh = x[i, j] * ri
            xhat[i, j] = xh
            if has_w:
                y[i, j] = xh * w[j]


@njit(**_jit)
def _rmsnorm_backward(g, xhat, r, w, has_w, dx, dw):  # dx: (N, n); dw (n,) += Σ_rows g ⊙ x̂
    N, n = g.shape
    for i in range(N):
        dot = 0.0
        for j in range(n):
            gw = g[i, j] * w[j] if has_w else g[i, j]
            dot += gw * xhat[i, j]
            if has_w:
                dw[j] += g[i, j] * xhat[i, j]
        mean = dot / n
        for j in range(n):
            gw = g[i, j] * w[j] if has_w else g[i, j]
            dx[i, j] = r[i] * (gw - xhat[i, j] * mean)


def rmsnorm_forward(x, weight=None, eps=ops_rmsnorm.EPS):
    x2 = _rows(x)
    xhat = np.empty_like(x2)
    y = np.empty_like(x2) if weight is not None else xhat  # without a weight y is x̂: one array
    r = np.empty(x2.shape[0], dtype=x.dtype)
    w = weight if weight is not None else np.empty(0, dtype=x.dtype)
    _rmsnorm_forward(x2, w, weight is not None, eps, y, xhat, r)
    return y.reshape(x.shape), ops_rmsnorm.Cache(xhat.reshape(x.shape), r.reshape(x.shape[:-1] + (1,)),
                                                 weight)


def rmsnorm_add_forward(x, res, weight=None, eps=ops_rmsnorm.EPS):
    s = x + res
    y, cache = rmsnorm_forward(s, weight, eps)
    return s, y, cache


def rmsnorm_backward(dout, cache, dres=None):
    xhat, r, weight = cache
    g = _rows(dout)
    dx = np.empty_like(g)
    dw = np.zeros(g.shape[1], dtype=np.float64)  # Σ over every row: accumulated in float64
    w = weight if weight is not None else np.empty(0, dtype=g.dtype)
    _rmsnorm_backward(g, xhat.reshape(g.shape), r.reshape(-1), w, weight is not None, dx, dw)
    if dres is not None:
        dx += dres.reshape(dx.shape)
    grads = {"x": dx.reshape(dout.shape)}
    if weight is not None:
        grads["weight"] = dw.astype(g.dtype)
    return grads


# ----------------------------------------------------------------------------- QK-norm with rotary
# A rotation keeps each pair's length, so r = 1/rms(x) can be taken before rotating: one pass per
# row reads the heads in place from the q/k/v product's (N, T, heads, hs) layout (any strides), and
# the backward writes its gradient back in that layout.

@njit(**_jit)
def _qk_norm_forward(x, cos, sin, eps, y, r):  # x: (N, T, n, hs); y: (N, n, T, hs); r: (N, n, T)
    N, n, T, hs = y.shape
    for b in range(N):
        for h in range(n):
            for t in range(T):
                ss = x[b, t, h, 0] * x[b, t, h, 0]
                for j in range(1, hs):
                    ss += x[b, t, h, j] * x[b, t, h, j]
                ri = 1.0 / math.sqrt(ss / hs + eps)
                r[b, h, t] = ri
                for i in range(hs // 2):
                    x0, x1 = x[b, t, h, 2 * i], x[b, t, h, 2 * i + 1]
                    c, s = cos[t, i], sin[t, i]
                    y[b, h, t, 2 * i] = (x0 * c - x1 * s) * ri
                    y[b, h, t, 2 * i + 1] = (x0 * s + x1 * c) * ri


@njit(**_jit)
def _qk_norm_backward(g, y, r, cos, sin, dx):  # dx = RoPEᵀ(r (g − y · mean(g ⊙ y))), (N, T, n, hs)
    N, n, T, hs = g.shape
    for b in range(N):
        for h in range(n):
            for t in range(T):
                dot = g[b, h, t, 0] * y[b, h, t, 0]
                for j in range(1, hs):
                    dot += g[b, h, t, j] * y[b, h, t, j]
                mean = dot / hs
                ri = r[b, h, t]
                for i in range(hs // 2):
                    u0 = ri * (g[b, h, t, 2 * i] - y[b, h, t, 2 * i] * mean)
                    u1 = ri * (g[b, h, t, 2 * i + 1] - y[b, h, t, 2 * i + 1] * mean)
                    c, s = cos[t, i], sin[t, i]
                    dx[b, t, h, 2 * i] = u0 * c + u1 * s
                    dx[b, t, h, 2 * i + 1] = u1 * c - u0 * s


def qk_norm_forward(x, cos, sin, eps=None):
    eps = ops_qk_norm.eps_for(x.dtype) if eps is None else eps
    N, T, n, hs = x.shape
    y = np.empty((N, n, T, hs), dtype=x.dtype)
    r = np.empty((N, n, T), dtype=x.dtype)
    cos, sin = np.ascontiguousarray(cos, dtype=x.dtype), np.ascontiguousarray(sin, dtype=x.dtype)
    _qk_norm_forward(x, cos, sin, eps, y, r)
    return y, ops_qk_norm.Cache(ops_rmsnorm.Cache(y, r[..., None], None), ops_rotary.Cache(cos, sin))


def qk_norm_backward(dy, cache):
    y, r, _ = cache.norm
    N, n, T, hs = y.shape
    dx = np.empty((N, T, n, hs), dtype=dy.dtype)
    _qk_norm_backward(np.ascontiguousarray(dy), y, r[..., 0], cache.rope.cos, cache.rope.sin, dx)
    return {"x": dx}


# ----------------------------------------------------------------------------- the MLP's ReLU²

@njit(**_jit)
def _relu2(u, a, g):  # flat arrays: a = relu(u), g = ½ a²
    for i in range(u.size):
        v = u[i] if u[i] > 0 else 0.0
        a[i] = v
        g[i] = 0.5 * v * v


def mlp_forward(x, w_fc, w_proj):
    u = np.ascontiguousarray(rows_matmul(x, w_fc))
    a, g = np.empty_like(u), np.empty_like(u)
    _relu2(u.reshape(-1), a.reshape(-1), g.reshape(-1))
    return rows_matmul(g, w_proj), ops_mlp.Cache(ops_linear.Cache(x, w_fc), ops_linear.Cache(g, w_proj), a)


# ----------------------------------------------------------------------------- cross-entropy

@njit(**_jit)
def _shift_rows(z, targets, out, z_target):  # out = z − rowmax;  z_target = z[y] − rowmax
    N, V = z.shape
    for i in range(N):
        m = z[i, 0]
        for j in range(1, V):
            m = max(m, z[i, j])
        for j in range(V):
            out[i, j] = z[i, j] - m
        z_target[i] = out[i, targets[i]]


@njit(**_jit)
def _xent_normalise(e, targets, valid, inv_n, z_target, loss_rows):  # e = exp(z − max), in place
    N, V = e.shape
    for i in range(N):
        if not valid[i]:
            loss_rows[i] = 0.0
            for j in range(V):
                e[i, j] = 0.0
            continue
        total = e[i, 0]
        for j in range(1, V):
            total += e[i, j]
        loss_rows[i] = math.log(total) - z_target[i]
        scale = inv_n / total
        for j in range(V):
            e[i, j] *= scale
        e[i, targets[i]] -= inv_n


def softmax_xent(z, targets, valid, n_valid):
    """ops/cross_entropy.softmax_xent in three passes."""
    grad = np.empty_like(z)
    z_target = np.empty(z.shape[0], dtype=z.dtype)
    loss_rows = np.empty(z.shape[0], dtype=z.dtype)
    _shift_rows(z, targets, grad, z_target)
    np.exp(grad, out=grad)
    _xent_normalise(grad, targets, valid, z.dtype.type(1.0 / n_valid), z_target, loss_rows)
    return loss_rows, grad


def cross_entropy_forward(logits, targets, ignore_index=ops_cross_entropy.IGNORE_INDEX, scale=1.0,
                          softcap=None):
    z, y, valid, n_valid = ops_cross_entropy.prepare(logits, targets, ignore_index, scale, softcap)
    loss_rows, grad = softmax_xent(z, y, valid, n_valid)
    return ops_cross_entropy.finish(loss_rows, grad, z, n_valid, logits.shape, scale, softcap)


# ----------------------------------------------------------------------------- embedding backward

@njit(**_jit)
def _scatter_add(table, rows, values):  # table[rows[i]] += values[i]
    for i in range(rows.size):
        r = rows[i]
        for j in range(values.shape[1]):
            table[r, j] += values[i, j]


def embedding_backward(dout, cache):
    dtable = np.zeros(cache.shape, dtype=dout.dtype)
    _scatter_add(dtable, np.ascontiguousarray(cache.ids).reshape(-1), _rows(dout))
    return {"table": dtable}


# ----------------------------------------------------------------------------- attention

class AttentionCache(NamedTuple):
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


def attention_forward(q, k, v, scale, kv=None):
    """ops/attention.forward. The scale goes into q before the product ((q·scale) kᵀ: a pass over
    q instead of over the scores); a row block's keys after its queries are all in its last
    r1 − r0 columns, which get −inf; then NumPy's row max, shift and exp, and `_normalise`."""
    if kv is not None:
        return ops_attention.forward(q, k, v, scale, kv)
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
    return y.reshape(q.shape), AttentionCache(qs, k3, v3, p_blocks, scale, group, q.shape)


def attention_backward(dy, cache):
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


REPLACEMENTS = {
    "rmsnorm": replace(ops_rmsnorm, forward=rmsnorm_forward, add_forward=rmsnorm_add_forward,
                       backward=rmsnorm_backward),
    "qk_norm": replace(ops_qk_norm, forward=qk_norm_forward, backward=qk_norm_backward),
    "mlp": replace(ops_mlp, forward=mlp_forward),
    "cross_entropy": replace(ops_cross_entropy, forward=cross_entropy_forward),
    "embedding": replace(ops_embedding, backward=embedding_backward),
    "attention": replace(ops_attention, forward=attention_forward, backward=attention_backward),
}
