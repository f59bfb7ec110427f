"""CPU kernels: Numba `njit` versions of the row-wise and elementwise hot paths, including the
masked softmax inside attention (its matrix products stay on BLAS). Each computes what its reference in minparcae/ops
computes (the contracts are in kernels/__init__.py); tests/test_kernels_cpu.py holds them to it.

Why they are faster than the NumPy reference: NumPy evaluates `x * r * w` as separate passes over
memory, each writing a temporary; a kernel makes one pass per row and keeps the row in cache. The
rows are independent, so `prange` spreads them over the cores. fastmath stays off: results may
differ from NumPy's only by summation order.
"""

import math

import numba
import numpy as np
from numba import njit, prange

# "reassoc" lets reductions (sums of squares, dot products) use SIMD lanes, which only reorders
# the additions; NaN and inf keep their meaning (no "nnan"/"ninf"), so the trainer's guard works.
_jit = dict(parallel=True, cache=True, fastmath={"reassoc", "contract"})

# Numba's OpenMP threads spin while they wait, and so do OpenBLAS's: on a 2-core machine the two
# pools took turns stealing the cores and a tiny-preset step went from ~190 ms to ~820 ms. The
# workqueue layer sleeps instead. An explicit NUMBA_THREADING_LAYER still wins.
if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "workqueue"

# Below this many elements a kernel runs on one thread: waking the others costs more than they
# save, and far more when another process holds a core (milliseconds instead of microseconds).
PARALLEL_MIN = 1 << 18


def _run(kernel, work, *args):
    """kernel(*args), single-threaded when `work` (elements touched) is small."""
    threads = numba.get_num_threads()
    if work >= PARALLEL_MIN or threads == 1:
        return kernel(*args)
    numba.set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(threads)


@njit(**_jit)
def _rmsnorm_forward(x, w, has_w, eps, y, xhat, r):  # x: (N, n)
    N, n = x.shape
    for i in prange(N):
        ss = 0.0
        for j in range(n):
            ss += x[i, j] * x[i, j]
        ri = 1.0 / math.sqrt(ss / n + eps)
        r[i] = ri
        for j in range(n):
            xh = x[i, j] * ri
            xhat[i, j] = xh
            y[i, j] = xh * w[j] if has_w else xh


def rmsnorm_forward(x, weight, eps):
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    y, xhat = np.empty_like(x2), np.empty_like(x2)
    r = np.empty(x2.shape[0], dtype=x.dtype)
    w = weight if weight is not None else np.empty(0, dtype=x.dtype)
    _run(_rmsnorm_forward, x2.size, x2, w, weight is not None, eps, y, xhat, r)
    return y.reshape(x.shape), xhat.reshape(x.shape), r.reshape(x.shape[:-1] + (1,))


@njit(**_jit)
def _rmsnorm_backward(g, xhat, r, w, has_w, dx):  # returns nothing; dx: (N, n)
    N, n = g.shape
    for i in prange(N):
        dot = 0.0
        for j in range(n):
            gw = g[i, j] * w[j] if has_w else g[i, j]
            dot += gw * xhat[i, j]
        mean = dot / n
        for j in range(n):
            gw = g[i, j] * w[j] if has_w else g[i, j]
            dx[i, j] = r[i] * (gw - xhat[i, j] * mean)


@njit(cache=True)
def _column_sums(g, xhat, out):  # dweight = Σ_rows g ⊙ x̂, in row blocks for the cache
    N, n = g.shape
    for i in range(N):
        for j in range(n):
            out[j] += g[i, j] * xhat[i, j]


def rmsnorm_backward(dout, xhat, r, weight, dres=None):
    g = np.ascontiguousarray(dout).reshape(-1, dout.shape[-1])
    xh = xhat.reshape(g.shape)
    dx = np.empty_like(g)
    w = weight if weight is not None else np.empty(0, dtype=g.dtype)
    _run(_rmsnorm_backward, g.size, g, xh, r.reshape(-1), w, weight is not None, dx)
    dweight = None
    if weight is not None:
        dweight = np.zeros(g.shape[1])  # accumulated in float64
        _column_sums(g, xh, dweight)
        dweight = dweight.astype(g.dtype)
    if dres is not None:
        dx += dres.reshape(dx.shape)
    return dx.reshape(dout.shape), dweight


@njit(**_jit)
def _rotary(x, cos, sin, y):  # x, y: (M, T, hs); cos, sin: (T, hs/2)
    M, T, hs = x.shape
    for m in prange(M):
        for t in range(T):
            for i in range(hs // 2):
                a, b = x[m, t, 2 * i], x[m, t, 2 * i + 1]
                c, s = cos[t, i], sin[t, i]
                y[m, t, 2 * i] = a * c - b * s
                y[m, t, 2 * i + 1] = a * s + b * c


def rotary(x, cos, sin):
    x3 = np.ascontiguousarray(x).reshape(-1, x.shape[-2], x.shape[-1])
    y = np.empty_like(x3)
    _run(_rotary, x3.size, x3, np.ascontiguousarray(cos, dtype=x.dtype),
         np.ascontiguousarray(sin, dtype=x.dtype), y)
    return y.reshape(x.shape)


@njit(**_jit)
def _relu2(u, a, g):  # flat arrays
    for i in prange(u.size):
        v = u[i] if u[i] > 0 else 0.0
        a[i] = v
        g[i] = 0.5 * v * v


def relu2_forward(u):
    u = np.ascontiguousarray(u)
    a, g = np.empty_like(u), np.empty_like(u)
    _run(_relu2, u.size, u.reshape(-1), a.reshape(-1), g.reshape(-1))
    return a, g


# Exponentials are left to NumPy: its SIMD exp is several times faster than the scalar libm call
# a Numba loop makes. So each softmax is: one kernel pass (shift by the row max), NumPy's exp in
# place, one kernel pass (normalise) -- three passes where the reference makes six or more.

@njit(**_jit)
def _shift_rows(z, targets, out, z_target):  # out = z − rowmax;  z_target = z[y] − rowmax
    N, V = z.shape
    for i in prange(N):
        m = z[i, 0]
        for j in range(1, V):
            m = max(m, z[i, j])
        for j in range(V):
            out[i, j] = z[i, j] - m
        z_target[i] = out[i, targets[i]]


@njit(**_jit)
def _xent_normalise(e, targets, valid, inv_n, z_target, loss_rows):  # e = exp(z − max), in place
    N, V = e.shape
    for i in prange(N):
        if not valid[i]:
            loss_rows[i] = 0.0
            for j in range(V):
                e[i, j] = 0.0
            continue
        total = 0.0
        for j in range(V):
            total += e[i, j]
        loss_rows[i] = math.log(total) - z_target[i]
        scale = inv_n / total
        for j in range(V):
            e[i, j] *= scale
        e[i, targets[i]] -= inv_n


def softmax_xent(z, targets, valid, n_valid):
    grad = np.empty_like(z)
    z_target = np.empty(z.shape[0], dtype=z.dtype)
    loss_rows = np.empty(z.shape[0], dtype=z.dtype)
    _run(_shift_rows, z.size, z, targets, grad, z_target)
    np.exp(grad, out=grad)
    _run(_xent_normalise, z.size, grad, targets, valid, 1.0 / n_valid, z_target, loss_rows)
    return loss_rows, grad


@njit(parallel=True, cache=True)
def _scatter_add(table, rows, values):  # each thread owns a slice of columns: no two write one cell
    n = table.shape[1]
    n_chunks = min(n, 8)
    for c in prange(n_chunks):
        lo, hi = c * n // n_chunks, (c + 1) * n // n_chunks
        for i in range(rows.size):
            r = rows[i]
            for j in range(lo, hi):
                table[r, j] += values[i, j]


def scatter_add(table, rows, values):
    _run(_scatter_add, values.size, table, rows, np.ascontiguousarray(values))


@njit(**_jit)
def _causal_shift(s, scale):  # in place on (M, T, T): scale·(S − rowmax) on and below the diagonal, −inf above
    M, T, _ = s.shape
    for m in prange(M):
        for i in range(T):
            top = -np.inf
            for j in range(i + 1):
                top = max(top, s[m, i, j])
            for j in range(i + 1):
                s[m, i, j] = (s[m, i, j] - top) * scale
            for j in range(i + 1, T):
                s[m, i, j] = -np.inf


@njit(**_jit)
def _causal_normalise(e):  # e = exp(shifted scores) (0 above the diagonal); rows sum to 1
    M, T, _ = e.shape
    for m in prange(M):
        for i in range(T):
            total = 0.0
            for j in range(i + 1):
                total += e[m, i, j]
            inv = 1.0 / total
            for j in range(i + 1):
                e[m, i, j] *= inv


def _causal_softmax(s, scale):
    _run(_causal_shift, s.size, s, scale)
    np.exp(s, out=s)
    _run(_causal_normalise, s.size, s)


@njit(**_jit)
def _softmax_backward(p, dp, scale):  # in place on dp: dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale
    M, T, _ = p.shape
    for m in prange(M):
        for i in range(T):
            dot = 0.0
            for j in range(i + 1):
                dot += dp[m, i, j] * p[m, i, j]
            for j in range(i + 1):
                dp[m, i, j] = p[m, i, j] * (dp[m, i, j] - dot) * scale
            for j in range(i + 1, T):
                dp[m, i, j] = 0.0


def attention_forward(q, k, v, scale):
    """The reference's matrix products (BLAS), with mask, scale and softmax fused into one pass
    over the scores. Since softmax(scale·S) = softmax of the scaled scores, scaling inside the
    exponential is the same function; the cache is the reference's (q, k, v, P, scale)."""
    s = q @ k.transpose(0, 1, 3, 2)  # (B, H, T, T)
    _causal_softmax(s.reshape(-1, s.shape[-2], s.shape[-1]), s.dtype.type(scale))
    return s @ v, (q, k, v, s, scale)


def attention_backward(dy, cache):
    q, k, v, p, scale = cache
    ds = dy @ v.transpose(0, 1, 3, 2)  # dP, then dS in place
    T = p.shape[-1]
    _run(_softmax_backward, p.size, p.reshape(-1, T, T), ds.reshape(-1, T, T), p.dtype.type(scale))
    return ds @ k, ds.transpose(0, 1, 3, 2) @ q, p.transpose(0, 1, 3, 2) @ dy


_FLOATS = {np.dtype(np.float32), np.dtype(np.float64)}
KERNELS = {name: (func, _FLOATS) for name, func in {
    "rmsnorm_forward": rmsnorm_forward, "rmsnorm_backward": rmsnorm_backward, "rotary": rotary,
    "relu2_forward": relu2_forward, "softmax_xent": softmax_xent, "scatter_add": scatter_add,
    "attention_forward": attention_forward, "attention_backward": attention_backward}.items()}
