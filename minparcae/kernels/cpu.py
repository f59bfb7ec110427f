"""CPU kernels: Numba `njit` versions of the row-wise and elementwise hot paths (norms, rotary,
ReLU², cross-entropy, AdamW, the masked softmax inside attention), and the threads that run
minparcae's CPU work: matrix products split by rows, attention heads, and a training batch's
parts (model.loss_and_grads). Each computes what its reference in minparcae/ops computes (the
contracts are in kernels/__init__.py); tests/test_kernels_cpu.py holds them to it.

Why they are faster than the NumPy reference: NumPy evaluates `x * r * w` as separate passes over
memory, each writing a temporary; a kernel makes one pass per row and keeps the row in cache. The
rows are independent, so `prange` spreads them over the cores. fastmath is limited to reordering
sums and fusing multiply-adds: results may differ from NumPy's only in rounding.
"""

import ctypes
import functools
import math
import os
import threading
import types
from concurrent.futures import ThreadPoolExecutor, wait

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

# Every row-wise kernel is compiled twice: with prange spread over Numba's threads, and serially
# without the GIL (prange then runs as range). The serial one serves small inputs, and every call
# made while minparcae runs jobs on its own threads (see _parallel: the batch split of
# model.loss_and_grads, the attention jobs), where each job has a core to itself. It must: Numba's
# workqueue pool aborts the process when two threads launch parallel kernels at once.
_serial = dict(cache=True, nogil=True, fastmath={"reassoc", "contract"})
_state = {"jobs_running": False}  # set by _parallel while its jobs run


def _kernel(fn):
    """(parallel, serial) builds of fn. The serial one is compiled from a renamed copy of the
    function: Numba's disk cache keys a function by its name and line, not by the compile
    options, so two builds of one function would load each other's machine code."""
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__,
                              fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_serial"
    return njit(**_jit)(fn), njit(**_serial)(twin)


def _run(kernel, work, *args):
    """kernel(*args) on Numba's threads when `work` (elements touched) is large, on the main
    thread, outside minparcae's own jobs; the serial build otherwise."""
    parallel, serial = kernel
    if work >= PARALLEL_MIN and numba.get_num_threads() > 1 and not _state["jobs_running"] and \
            threading.current_thread() is threading.main_thread():
        return parallel(*args)
    return serial(*args)


@_kernel
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
            if has_w:
                y[i, j] = xh * w[j]


def rmsnorm_forward(x, weight, eps):
    x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    xhat = np.empty_like(x2)
    y = np.empty_like(x2) if weight is not None else xhat  # without a weight y is x̂: one array
    r = np.empty(x2.shape[0], dtype=x.dtype)
    w = weight if weight is not None else np.empty(0, dtype=x.dtype)
    _run(_rmsnorm_forward, x2.size, x2, w, weight is not None, eps, y, xhat, r)
    return y.reshape(x.shape), xhat.reshape(x.shape), r.reshape(x.shape[:-1] + (1,))


@_kernel
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


@njit(**_serial)
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


@_kernel
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


# QK-norm after the rotary embedding, in one pass per row. A rotation keeps each row's length, so
# r = 1/rms(x) can be taken before rotating: y = RoPE(x)·r = N(RoPE(x)). The rows are read from
# (and the backward's written to) the heads of the fused q/k/v product in place, (B, T, heads, hs),
# so the head split's copies go too; the kernel sees them C-contiguous, which lets it vectorise.

@_kernel
def _rope_rmsnorm_forward(x, first, cos, sin, eps, y, r):  # x: (B, T, heads, hs); y: (B, n, T, hs)
    B, n, T, hs = y.shape
    for bh in prange(B * n):
        b, h = bh // n, bh % n
        for t in range(T):
            ss = 0.0
            for j in range(hs):
                ss += x[b, t, first + h, j] * x[b, t, first + h, j]
            ri = 1.0 / math.sqrt(ss / hs + eps)
            r[b, h, t] = ri
            for i in range(hs // 2):
                x0, x1 = x[b, t, first + h, 2 * i], x[b, t, first + h, 2 * i + 1]
                c, s = cos[t, i], sin[t, i]
                y[b, h, t, 2 * i] = (x0 * c - x1 * s) * ri
                y[b, h, t, 2 * i + 1] = (x0 * s + x1 * c) * ri


def rope_rmsnorm_forward(x, first, n, cos, sin, eps):
    B, T, _, hs = x.shape
    y = np.empty((B, n, T, hs), dtype=x.dtype)
    r = np.empty((B, n, T), dtype=x.dtype)
    _run(_rope_rmsnorm_forward, y.size, x, first, np.ascontiguousarray(cos, dtype=x.dtype),
         np.ascontiguousarray(sin, dtype=x.dtype), eps, y, r)
    return y, r[..., None]


@_kernel
def _rope_rmsnorm_backward(g, y, r, cos, sin, out, first):  # dx = RoPEᵀ(r (g − y · mean(g ⊙ y)))
    B, n, T, hs = g.shape
    for bh in prange(B * n):
        b, h = bh // n, bh % n
        for t in range(T):
            dot = 0.0
            for j in range(hs):
                dot += g[b, h, t, j] * y[b, h, t, j]
            mean = dot / hs
            ri = r[b, h, t]
            for i in range(hs // 2):
                u0 = ri * (g[b, h, t, 2 * i] - y[b, h, t, 2 * i] * mean)
                u1 = ri * (g[b, h, t, 2 * i + 1] - y[b, h, t, 2 * i + 1] * mean)
                c, s = cos[t, i], sin[t, i]
                out[b, t, first + h, 2 * i] = u0 * c + u1 * s
                out[b, t, first + h, 2 * i + 1] = u1 * c - u0 * s


def rope_rmsnorm_backward(dy, y, r, cos, sin, out, first):
    _run(_rope_rmsnorm_backward, dy.size, np.ascontiguousarray(dy), y, r.reshape(r.shape[:-1]),
         np.ascontiguousarray(cos, dtype=dy.dtype), np.ascontiguousarray(sin, dtype=dy.dtype), out,
         first)


@_kernel
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
# a Numba loop makes. So the cross-entropy's softmax is: one kernel pass (shift by the row max),
# NumPy's exp in place, one kernel pass (normalise) -- three passes where the reference makes six.

@_kernel
def _shift_rows(z, targets, out, z_target):  # out = z − rowmax;  z_target = z[y] − rowmax
    N, V = z.shape
    for i in prange(N):
        m = z[i, 0]
        for j in range(1, V):
            m = max(m, z[i, j])
        for j in range(V):
            out[i, j] = z[i, j] - m
        z_target[i] = out[i, targets[i]]


@_kernel
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


@_kernel
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


@_kernel
def _adamw(p, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step, sqrt_bc2, eps):
    for e in prange(p.size):  # flat arrays; optim.AdamW's update, one pass instead of ten
        ge = g[e]
        me = beta1 * m[e] + one_minus_beta1 * ge
        ve = beta2 * v[e] + one_minus_beta2 * ge * ge
        m[e], v[e] = me, ve
        p[e] = p[e] * decay - step * me / (math.sqrt(ve) / sqrt_bc2 + eps)


def adamw_step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2):
    """optim.AdamW's update of p, m, v in place. The scalars are cast to the arrays' dtype, so a
    float32 parameter is updated in float32 arithmetic, as NumPy does it."""
    if not (p.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
        raise ValueError("adamw_step updates p, m and v in place: they must be C-contiguous")
    f = p.dtype.type
    g = np.ascontiguousarray(g)
    _run(_adamw, p.size, p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1),
         f(1 - lr * weight_decay), f(beta1), f(1 - beta1), f(beta2), f(1 - beta2),
         f(lr / bias_correction1), f(math.sqrt(bias_correction2)), f(eps))


# Causal attention in row blocks. Query rows r0..r1−1 attend to keys 0..r1−1 only, so the
# scores of a row block are the (r1−r0) × r1 product q[r0:r1] k[:r1]ᵀ, and the blocks above the
# diagonal, which the mask would zero, are never computed: with T/ATTN_BLOCK blocks the matrix
# products do (1 + 1/n_blocks)/2 of the full T × T work (5/8 at T = 256), and so do the softmax
# passes and the exponentials.
ATTN_BLOCK = 64

# The heads are independent, and each head's products are small (64 × 256 × 64 at T = 256):
# too small for BLAS to split well over threads, so it spends its time waking and waiting for
# them, once per head and per product. Far worse on a shared machine: when another process holds
# a core, each of those waits can last a scheduler time slice (a batch of 24 such products went
# from 2 ms to 400 ms). So the attention core splits the heads instead: one job per thread, each
# job running its heads' products on one BLAS thread and its softmax passes in single-threaded
# kernels (nogil, so the jobs run at once), with no synchronisation until the jobs are done.


@functools.cache
def _blas_thread_control():
    """(get, set) of the thread count of the OpenBLAS that NumPy loaded, or None (another BLAS,
    or no /proc): then minparcae runs its work on the calling thread, and BLAS threads its
    products as it likes."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("openblas", "")):
            get, put = f"{prefix}_get_num_threads{suffix}", f"{prefix}_set_num_threads{suffix}"
            if hasattr(lib, get) and hasattr(lib, put):
                return getattr(lib, get), getattr(lib, put)
    return None


@functools.cache
def _pool():
    """The worker threads of _parallel (it starts them as jobs need them, up to one per core)."""
    return ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="minparcae")


def _threads():
    """How many threads minparcae's CPU work may use: the thread count NumPy's OpenBLAS is set to
    (OPENBLAS_NUM_THREADS, by default the cores), or 1 when that BLAS cannot be controlled."""
    control = _blas_thread_control()
    return control[0]() if control else 1


def _split(M, n):
    """n slices [lo, hi) of range(M), as even as can be (fewer if M < n)."""
    n = max(1, min(M, n))
    cuts = [M * i // n for i in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _split_heads(M):
    """Slices [lo, hi) of the M heads, one per thread."""
    return _split(M, _threads())


def _parallel(job, slices):
    """job(lo, hi) for each slice, all at once: the first on the calling thread, the others on a
    pool, with BLAS single-threaded meanwhile. Returns the jobs' results in order. (BLAS's thread
    count is process-wide: BLAS called from another thread meanwhile runs single-threaded too, and
    the work inside a job sees one thread, so it splits nothing further.)"""
    control = _blas_thread_control()
    if len(slices) == 1 or control is None or threading.current_thread() is not threading.main_thread():
        return [job(*s) for s in slices]  # one thread: in order (a pool thread must not wait on its pool)
    get, put = control
    threads = get()
    put(1)
    _state["jobs_running"] = True
    try:
        rest = [_pool().submit(job, *s) for s in slices[1:]]
        try:
            first = job(*slices[0])
        finally:
            wait(rest)
        return [first] + [f.result() for f in rest]
    finally:
        _state["jobs_running"] = False
        put(threads)


def split_batch(job, B):
    """job(lo, hi) for slices of range(B), one per thread, all at once (see model.loss_and_grads)."""
    return _parallel(job, _split(B, _threads()))


# Matrix products, split over the threads by rows (or columns, when the rows are fewer), each
# slice one single-threaded BLAS call into its part of the output. OpenBLAS's own threads, once
# woken, spin for a long while after their product is done (2^28 cycles, ~0.1 s, by default);
# between products the cores are wanted by the Numba kernels and the attention jobs, and three
# busy threads on two cores slowed every one of them. minparcae's pool threads sleep instead.
MATMUL_SPLIT_MIN = 1 << 22  # multiply-adds; below this one thread is quicker than a hand-off


def matmul(a, b):
    M, K = a.shape
    N = b.shape[1]
    n = _threads()
    if n == 1 or M * N * K < MATMUL_SPLIT_MIN:
        return a @ b
    out = np.empty((M, N), dtype=np.result_type(a, b))
    if M >= N:
        _parallel(lambda lo, hi: np.matmul(a[lo:hi], b, out=out[lo:hi]), _split(M, n))
    else:
        _parallel(lambda lo, hi: np.matmul(a, b[:, lo:hi], out=out[:, lo:hi]), _split(N, n))
    return out


def _row_blocks(T):
    return [(r0, min(T, r0 + ATTN_BLOCK)) for r0 in range(0, T, ATTN_BLOCK)]


@functools.cache
def _future(n):
    """(n, n) mask of the keys after each query in a diagonal block: True above the diagonal."""
    return np.triu(np.ones((n, n), dtype=bool), 1)


# The row sums and dot products below accumulate in the arrays' own dtype (starting from the
# first term): a float64 accumulator would halve the SIMD width of a float32 loop (3× slower here).

@njit(**_serial)
def _causal_softmax_pass2(e, r0):  # e = exp(shifted scores) (0 after the last key); rows sum to 1
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


@njit(**_serial)
def _softmax_backward(p, dp, r0, scale):  # in place on dp: dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale
    M, rows, L = p.shape
    for m in range(M):
        for i in range(rows):
            n = r0 + i + 1
            dot = dp[m, i, 0] * p[m, i, 0]
            for j in range(1, n):
                dot += dp[m, i, j] * p[m, i, j]
            for j in range(n):
                dp[m, i, j] = p[m, i, j] * (dp[m, i, j] - dot) * scale
            for j in range(n, L):
                dp[m, i, j] = 0.0


def _heads3(a):  # (B, H, T, hs) -> (B·H, T, hs), a view when it can be
    return a.reshape(-1, a.shape[-2], a.shape[-1])


def attention_forward(q, k, v, scale):
    """The reference's products (BLAS) by causal row blocks. The scale goes into q before the
    product ((q·scale) kᵀ, a pass over q instead of over the scores); a row block's keys after its
    queries are all in its last r1 − r0 columns, which get −inf; then NumPy's SIMD row max,
    subtraction and exp, and one kernel pass to normalise. The cache keeps P as the blocks of
    each job's heads."""
    q3, k3, v3 = _heads3(q), _heads3(k), _heads3(v)
    y = np.empty(q3.shape, dtype=q.dtype)
    scale = q.dtype.type(scale)
    qs = q3 * scale

    def job(lo, hi):  # heads lo..hi−1
        p_blocks = []
        for r0, r1 in _row_blocks(q3.shape[1]):
            p = qs[lo:hi, r0:r1] @ k3[lo:hi, :r1].transpose(0, 2, 1)  # (heads, r1 − r0, r1)
            np.copyto(p[:, :, r0:], -np.inf, where=_future(r1 - r0))
            p -= p.max(axis=-1, keepdims=True)
            np.exp(p, out=p)
            _causal_softmax_pass2(p, r0)
            np.matmul(p, v3[lo:hi, :r1], out=y[lo:hi, r0:r1])
            p_blocks.append(p)
        return p_blocks

    slices = _split_heads(q3.shape[0])
    p_blocks = _parallel(job, slices)
    return y.reshape(q.shape), (q3, k3, v3, slices, p_blocks, scale)


def attention_backward(dy, cache):
    """The reference's backward, block by block: a row block's dS reaches dq of its own rows and
    dk, dv of the keys it attended to (0..r1−1); the same split of heads as the forward."""
    q3, k3, v3, slices, p_blocks, scale = cache
    shape = dy.shape
    dy3 = _heads3(dy)
    dq, dk, dv = np.empty_like(q3), np.zeros_like(k3), np.zeros_like(v3)
    blocks_of = {lo: blocks for (lo, _), blocks in zip(slices, p_blocks)}

    def job(lo, hi):  # the forward's slices: each job finds the P blocks its forward kept
        for (r0, r1), p in zip(_row_blocks(q3.shape[1]), blocks_of[lo]):
            dy_b = dy3[lo:hi, r0:r1]
            dv[lo:hi, :r1] += p.transpose(0, 2, 1) @ dy_b
            ds = dy_b @ v3[lo:hi, :r1].transpose(0, 2, 1)  # dP, then dS in place
            _softmax_backward(p, ds, r0, scale)
            np.matmul(ds, k3[lo:hi, :r1], out=dq[lo:hi, r0:r1])
            dk[lo:hi, :r1] += ds.transpose(0, 2, 1) @ q3[lo:hi, r0:r1]

    _parallel(job, slices)
    return dq.reshape(shape), dk.reshape(shape), dv.reshape(shape)


_FLOATS = {np.dtype(np.float32), np.dtype(np.float64)}
KERNELS = {name: (func, _FLOATS) for name, func in {
    "rmsnorm_forward": rmsnorm_forward, "rmsnorm_backward": rmsnorm_backward, "rotary": rotary,
    "relu2_forward": relu2_forward, "softmax_xent": softmax_xent, "scatter_add": scatter_add,
    "attention_forward": attention_forward, "attention_backward": attention_backward,
    "adamw_step": adamw_step, "rope_rmsnorm_forward": rope_rmsnorm_forward,
    "rope_rmsnorm_backward": rope_rmsnorm_backward, "matmul": matmul,
    "split_batch": split_batch}.items()}
