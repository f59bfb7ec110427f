"""GPU kernels: Numba CUDA versions of the ops' hot paths, float32, and at the end of the file the
op replacements that kernels.select gives the model on a GPU (`REPLACEMENTS`).

Each public function before them is a launch wrapper: it takes arrays, allocates its outputs with
the array module of its input and launches a `cuda.jit` kernel. On a GPU the arrays are CuPy arrays and the
kernel runs on CuPy's current stream; under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, how the
tests check these kernels on a CPU) they are NumPy arrays and the same wrapper runs unchanged.
Matrix products are not here: they stay on cuBLAS.

Three shapes of kernel:
  - row kernels (RMSNorm, cross-entropy, the injection's backward): a block per row, threads along
    the row, with a block-wide reduction (sum or max) where the row needs one. Blocks walk the rows
    in a grid-stride loop, so a row-sum over all rows (dweight, dĀ) is accumulated per block and
    the few per-block partial rows are summed afterwards;
  - elementwise kernels (rotary, ReLU², injection forward, AdamW, scatter-add): a thread per element;
  - attention: tiled "flash" kernels that never hold the (T, T) matrix (see `_flash_kernels`).

Block reductions use warp shuffles on a GPU. Numba's simulator has no shuffles, so there the same
reductions go through shared memory instead (WARP_SHUFFLES is False); the choice is made once at
import, so each compiled kernel contains one strategy. (The tests also run the shuffle path on the
simulator, through an emulation of their own: tests/cudasim.py.)
"""

import functools
import math
from typing import NamedTuple

import numpy as np
from numba import cuda, float32

from ..backend import array_module
from ..ops import attention as ops_attention
from ..ops import cross_entropy as ops_cross_entropy
from ..ops import embedding as ops_embedding
from ..ops import injection as ops_injection
from ..ops import linear as ops_linear
from ..ops import mlp as ops_mlp
from ..ops import qk_norm as ops_qk_norm
from ..ops import rmsnorm as ops_rmsnorm
from ..ops import rotary as ops_rotary
from ..ops.linear import rows_matmul
from . import replace

WARP_SHUFFLES = hasattr(cuda, "shfl_xor_sync")  # False under the simulator
MAX_THREADS = 256  # threads of a row kernel's block (a power of two, at least a warp)
ROW_BLOCKS = 2048  # most blocks a row kernel launches (about what a Hopper GPU holds at once)
THREADS = 256  # threads per block of the elementwise kernels
SHARED_BYTES = 48 * 1024  # static shared memory a block may declare (more needs opt-in, dynamic)
MAX_GRID_Y = 65535  # blocks along a grid's y axis
FULL_MASK = 0xFFFFFFFF
NEG_INF, ZERO, HALF, ONE = np.float32(-np.inf), np.float32(0), np.float32(0.5), np.float32(1)
_REDUCE_BUF = 32 if WARP_SHUFFLES else 1024  # shared slots a block reduction needs: per warp, per thread


def _cdiv(a, b):
    return -(-a // b)


def _threads(n):
    """Threads for a row of n: the power of two ≥ n, within [32, MAX_THREADS]."""
    return min(MAX_THREADS, max(32, 1 << (n - 1).bit_length()))


@functools.lru_cache(maxsize=None)
def _stream(ptr):
    return cuda.external_stream(ptr) if ptr else cuda.default_stream()


def _launch(kernel, grid, block, *args):
    """kernel[grid, block](*args), on CuPy's current stream for CuPy arrays. Numba would otherwise
    synchronise the host with the stream each CuPy array names; launching on that same stream keeps
    the order without waiting."""
    if not np.prod(grid):
        return  # empty arrays: nothing to do, and CUDA refuses an empty grid
    xp = array_module(args[0])
    if xp is np:
        kernel[grid, block](*args)
        return
    stream = _stream(xp.cuda.get_current_stream().ptr)
    kernel[grid, block, stream](*(cuda.as_cuda_array(a, sync=False)
                                  if hasattr(a, "__cuda_array_interface__") else a for a in args))


# ----------------------------------------------------------------------------- reductions

@cuda.jit(device=True)
def _combine(a, b, is_max):
    return max(a, b) if is_max else a + b


@cuda.jit(device=True)
def _warp_reduce(v, is_max, width, mask):
    """Fold v over each group of `width` consecutive lanes (a power of two ≤ 32) by butterfly
    shuffles: after log2(width) exchanges every lane holds its group's result."""
    offset = width // 2
    while offset > 0:
        v = _combine(v, cuda.shfl_xor_sync(mask, v, offset), is_max)
        offset //= 2
    return v


@cuda.jit(device=True)
def _block_reduce_shuffle(v, is_max, buf):
    """Sum or max of v over a 1-D block (a multiple of 32 threads): each warp folds its values, lane 0
    posts the warp's result to buf, then every warp folds the posted results, so all threads end
    with the block's result and no broadcast is needed."""
    lane, warp = cuda.threadIdx.x % 32, cuda.threadIdx.x // 32
    v = _warp_reduce(v, is_max, 32, FULL_MASK)
    if lane == 0:
        buf[warp] = v
    cuda.syncthreads()
    v = buf[lane] if lane < cuda.blockDim.x // 32 else (NEG_INF if is_max else ZERO)
    v = _warp_reduce(v, is_max, 32, FULL_MASK)
    cuda.syncthreads()  # buf is free again
    return v


@cuda.jit(device=True)
def _block_reduce_shared(v, is_max, buf):
    """The same through shared memory (a power-of-two block): halve the active threads each step."""
    t = cuda.threadIdx.x
    buf[t] = v
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if t < step:
            buf[t] = _combine(buf[t], buf[t + step], is_max)
        cuda.syncthreads()
        step //= 2
    v = buf[0]
    cuda.syncthreads()
    return v


@cuda.jit(device=True)
def _row_reduce_shuffle(v, is_max, buf, mask):
    """Sum or max of v over the threads (0..blockDim.x−1, threadIdx.y) of one row of a 2-D block;
    a row's threads are consecutive lanes of one warp, so shuffles fold them."""
    return _warp_reduce(v, is_max, cuda.blockDim.x, mask)


@cuda.jit(device=True)
def _row_reduce_shared(v, is_max, buf, mask):
    """The same through shared memory buf (blockDim.y, blockDim.x)."""
    c, r = cuda.threadIdx.x, cuda.threadIdx.y
    buf[r, c] = v
    cuda.syncthreads()
    v = buf[r, 0]
    for cc in range(1, buf.shape[1]):
        v = _combine(v, buf[r, cc], is_max)
    cuda.syncthreads()
    return v


_block_reduce = _block_reduce_shuffle if WARP_SHUFFLES else _block_reduce_shared
_row_reduce = _row_reduce_shuffle if WARP_SHUFFLES else _row_reduce_shared


# ----------------------------------------------------------------------------- RMSNorm

@cuda.jit
def _rmsnorm_forward(x, res, w, eps, has_res, has_w, s, y, xhat, r):
    """x, res, s, y, xhat: (N, n); w: (n,); r: (N,). Per row, with the residual add fused in:
        s = x + res (has_res, else s = x),   r = 1/√(mean_j s_j² + eps),   x̂ = s r,
        y = x̂ ⊙ w (has_w)"""
    buf = cuda.shared.array(_REDUCE_BUF, float32)
    N, n = x.shape
    t, nt = cuda.threadIdx.x, cuda.blockDim.x
    inv_n = ONE / np.float32(n)
    for i in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        ss = ZERO
        for j in range(t, n, nt):
            v = x[i, j]
            if has_res:
                v += res[i, j]
                s[i, j] = v
            ss += v * v
        ri = ONE / math.sqrt(_block_reduce(ss, False, buf) * inv_n + eps)
        for j in range(t, n, nt):
            xh = (s[i, j] if has_res else x[i, j]) * ri
            xhat[i, j] = xh
            if has_w:
                y[i, j] = xh * w[j]
        if t == 0:
            r[i] = ri


@cuda.jit
def _rmsnorm_backward(g, xhat, r, w, dres, has_w, has_res, dx, dw_part):
    """g, xhat, dres, dx: (N, n); r: (N,); w: (n,); dw_part: (gridDim.x, n). Per row, ĝ = g ⊙ w (has_w):
        dx = r (ĝ − x̂ mean_j(ĝ_j x̂_j))  (+ dres, the residual branch's gradient, when has_res)
        dw_part[block] = Σ over the block's rows of g ⊙ x̂   (dweight = Σ_blocks dw_part)"""
    buf = cuda.shared.array(_REDUCE_BUF, float32)
    N, n = g.shape
    t, nt, b = cuda.threadIdx.x, cuda.blockDim.x, cuda.blockIdx.x
    inv_n = ONE / np.float32(n)
    if has_w:
        for j in range(t, n, nt):
            dw_part[b, j] = ZERO
    for i in range(b, N, cuda.gridDim.x):
        dot = ZERO
        for j in range(t, n, nt):
            gj = g[i, j]
            if has_w:
                dw_part[b, j] += gj * xhat[i, j]
                gj *= w[j]
            dot += gj * xhat[i, j]
        mean = _block_reduce(dot, False, buf) * inv_n
        ri = r[i]
        for j in range(t, n, nt):
            gj = g[i, j] * w[j] if has_w else g[i, j]
            d = ri * (gj - xhat[i, j] * mean)
            dx[i, j] = d + dres[i, j] if has_res else d


def _rows(a):
    """a as C-contiguous (N, n) rows of its last axis."""
    return array_module(a).ascontiguousarray(a).reshape(-1, a.shape[-1])


def _absent(xp, ndim):
    """A stand-in of the right type for an array argument that the kernel leaves alone. A distinct
    one each time: Numba copies host arrays to the device one argument at a time, so an array passed
    twice would come back twice, the untouched copy possibly last."""
    return xp.empty((1,) * ndim, dtype=np.float32)


def _rmsnorm(x, res, weight, eps):
    xp, x2 = array_module(x), _rows(x)
    N, n = x2.shape
    xhat, r = xp.empty_like(x2), xp.empty(N, dtype=np.float32)
    y = xhat if weight is None else xp.empty_like(x2)
    s = x2 if res is None else xp.empty_like(x2)
    _launch(_rmsnorm_forward, min(N, ROW_BLOCKS), _threads(n), x2,
            _absent(xp, 2) if res is None else _rows(res), _absent(xp, 1) if weight is None else weight,
            np.float32(eps), res is not None, weight is not None, _absent(xp, 2) if res is None else s,
            _absent(xp, 2) if weight is None else y, xhat, r)
    return s.reshape(x.shape), y.reshape(x.shape), xhat.reshape(x.shape), r.reshape(x.shape[:-1] + (1,))


def rmsnorm_forward(x, weight, eps):
    """(y, x̂, r) of ops/rmsnorm.forward: x̂ = x r, y = x̂ ⊙ w (y is x̂ without a weight), r: (..., 1)."""
    return _rmsnorm(x, None, weight, eps)[1:]


def add_rmsnorm_forward(x, res, weight, eps):
    """The pre-norm block's `x = x + res; rmsnorm(x)` in one pass: returns (x + res, y, x̂, r)."""
    return _rmsnorm(x, res, weight, eps)


def rmsnorm_backward(dout, xhat, r, weight, dres=None):
    """(dx, dweight | None) of ops/rmsnorm.backward; with dres (the gradient that reaches the same x
    through the residual branch) the sum dx + dres comes out instead of dx, in the same pass."""
    xp, g = array_module(dout), _rows(dout)
    N, n = g.shape
    blocks = min(N, ROW_BLOCKS)
    dx = xp.empty_like(g)
    dw_part = _absent(xp, 2) if weight is None else xp.empty((blocks, n), dtype=np.float32)
    _launch(_rmsnorm_backward, blocks, _threads(n), g, xhat.reshape(N, n), r.reshape(N),
            _absent(xp, 1) if weight is None else weight, _absent(xp, 2) if dres is None else _rows(dres),
            weight is not None, dres is not None, dx, dw_part)
    return dx.reshape(dout.shape), None if weight is None else dw_part.sum(axis=0)


# ----------------------------------------------------------------------------- elementwise

@cuda.jit
def _rotary(x, cos, sin, y):
    """x: (B, H, T, hs), any strides; y: the same, contiguous; cos, sin: (T, hs/2). A thread per pair:
        y_2i = x_2i cos(pθ_i) − x_2i+1 sin(pθ_i),   y_2i+1 = x_2i sin(pθ_i) + x_2i+1 cos(pθ_i)"""
    B, H, T, hs = x.shape
    half = hs // 2
    e = cuda.grid(1)
    if e < B * H * T * half:
        i, row = e % half, e // half
        t, bh = row % T, row // T
        b, h = bh // H, bh % H
        x0, x1, c, s = x[b, h, t, 2 * i], x[b, h, t, 2 * i + 1], cos[t, i], sin[t, i]
        y[b, h, t, 2 * i] = x0 * c - x1 * s
        y[b, h, t, 2 * i + 1] = x0 * s + x1 * c


def rotary(x, cos, sin):
    """y of ops/rotary: adjacent pairs of x (..., T, hs) rotated by the angles of cos, sin (T, hs/2).
    A strided x (the op's head view of x W_q) is read in place: the kernel does the transpose copy."""
    xp = array_module(x)
    x4 = x.reshape((1,) * (4 - x.ndim) + x.shape) if x.ndim <= 4 else _rows(x).reshape((-1,) + x.shape[-3:])
    y = xp.empty(x4.shape, dtype=np.float32)
    _launch(_rotary, _cdiv(y.size // 2, THREADS), THREADS, x4, xp.ascontiguousarray(cos, dtype=np.float32),
            xp.ascontiguousarray(sin, dtype=np.float32), y)
    return y.reshape(x.shape)


@cuda.jit
def _relu2(u, a, g):
    """Flat arrays: a = relu(u), g = ½ a² (a NaN in u stays NaN, as in the reference)."""
    e = cuda.grid(1)
    if e < u.size:
        v = u[e]
        v = v if v > ZERO else v * ZERO
        a[e] = v
        g[e] = HALF * v * v


@cuda.jit
def _relu2_backward(dg, a, du):
    """Flat arrays: du = dg ⊙ a, since d(½ relu(u)²)/du = relu(u) = a."""
    e = cuda.grid(1)
    if e < du.size:
        du[e] = dg[e] * a[e]


def relu2_forward(u):
    """(a, g) of ops/mlp: a = relu(u), g = ½ a², both written in one pass over u."""
    xp = array_module(u)
    u = xp.ascontiguousarray(u)
    a, g = xp.empty_like(u), xp.empty_like(u)
    _launch(_relu2, _cdiv(u.size, THREADS), THREADS, u.reshape(-1), a.reshape(-1), g.reshape(-1))
    return a, g


def relu2_backward(dg, a):
    """dL/du = dL/dg ⊙ a, the MLP backward's one elementwise step."""
    xp = array_module(dg)
    dg = xp.ascontiguousarray(dg)
    du = xp.empty_like(dg)
    _launch(_relu2_backward, _cdiv(du.size, THREADS), THREADS, dg.reshape(-1), a.reshape(-1), du.reshape(-1))
    return du


@cuda.jit
def _scatter_add(table, rows, values):
    """table: (V, n); rows: (N,) ints; values: (N, n). A thread per value: table[rows_i, j] += values_ij,
    atomically, so repeated rows add up."""
    e = cuda.grid(1)
    N, n = values.shape
    if e < N * n:
        i, j = e // n, e % n
        cuda.atomic.add(table, (rows[i], j), values[i, j])


def scatter_add(table, rows, values):
    """The embedding backward: table[rows[i]] += values[i], in place."""
    values = array_module(values).ascontiguousarray(values)
    _launch(_scatter_add, _cdiv(values.size, THREADS), THREADS, table, rows, values)


@cuda.jit
def _injection_forward(h, u, A_bar, x):
    """Flat h, u, x: (N·d_h,); A_bar: (d_h,).  x = Ā ⊙ h + u  (u = B̄e, computed once per forward)."""
    e = cuda.grid(1)
    if e < x.size:
        x[e] = A_bar[e % A_bar.size] * h[e] + u[e]


@cuda.jit
def _injection_backward(dx, h, A_bar, dh, dA_part):
    """dx, h, dh: (N, d_h); A_bar: (d_h,); dA_part: (gridDim.x, d_h). Row kernel, no reduction along the row:
        dh = dx ⊙ Ā,   dA_part[block] = Σ over the block's rows of dx ⊙ h   (dĀ = Σ_blocks dA_part)"""
    N, n = dx.shape
    t, nt, b = cuda.threadIdx.x, cuda.blockDim.x, cuda.blockIdx.x
    for j in range(t, n, nt):
        acc = ZERO
        for i in range(b, N, cuda.gridDim.x):
            acc += dx[i, j] * h[i, j]
            dh[i, j] = dx[i, j] * A_bar[j]
        dA_part[b, j] = acc


def injection_forward(h, u, A_bar):
    """x = Ā ⊙ h + u for h, u (..., d_h) and Ā (d_h,): the diagonal injection's per-step update."""
    xp = array_module(h)
    h, u = xp.ascontiguousarray(h), xp.ascontiguousarray(u)
    x = xp.empty_like(h)
    _launch(_injection_forward, _cdiv(x.size, THREADS), THREADS, h.reshape(-1), u.reshape(-1),
            xp.ascontiguousarray(A_bar), x.reshape(-1))
    return x


def injection_backward(dx, h, A_bar):
    """(dh, dĀ) of x = Ā ⊙ h + u: dh = dx ⊙ Ā, dĀ = Σ_rows dx ⊙ h (dA_log and ddt_bias follow
    from dĀ)."""
    xp, g = array_module(dx), _rows(dx)
    N, n = g.shape
    blocks = min(N, ROW_BLOCKS)
    dh, dA_part = xp.empty_like(g), xp.empty((blocks, n), dtype=np.float32)
    _launch(_injection_backward, blocks, _threads(n), g, h.reshape(N, n), xp.ascontiguousarray(A_bar),
            dh, dA_part)
    return dh.reshape(dx.shape), dA_part.sum(axis=0)


@cuda.jit
def _adamw(p, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step, sqrt_bc2, eps):
    """Flat p, g, m, v, updated in place, in the order and rounding of optim.AdamW:
        p ← p·(1 − lr·wd),   m ← β1 m + (1 − β1) g,   v ← β2 v + (1 − β2) g²,
        p ← p − (lr/bc1) m / (√v / √bc2 + eps)"""
    e = cuda.grid(1)
    if e < p.size:
        ge = g[e]
        me = beta1 * m[e] + one_minus_beta1 * ge
        ve = beta2 * v[e] + one_minus_beta2 * ge * ge
        m[e], v[e] = me, ve
        p[e] = p[e] * decay - step * me / (math.sqrt(ve) / sqrt_bc2 + eps)


def adamw_step(p, g, m, v, lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2):
    """One AdamW update of parameter p with gradient g and moments m, v, all in place and C-contiguous;
    bias_correction1 = 1 − β1^t, bias_correction2 = 1 − β2^t; weight_decay 0 for undecayed parameters."""
    if not (p.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
        # reshape(-1) of a strided array is a copy: the kernel would update the copy, not p
        raise ValueError("adamw_step updates p, m and v in place: they must be C-contiguous")
    f = np.float32
    g = array_module(g).ascontiguousarray(g)
    _launch(_adamw, _cdiv(p.size, THREADS), THREADS, p.reshape(-1), g.reshape(-1), m.reshape(-1),
            v.reshape(-1), f(1 - lr * weight_decay), f(beta1), f(1 - beta1), f(beta2), f(1 - beta2),
            f(lr / bias_correction1), f(math.sqrt(bias_correction2)), f(eps))


# ----------------------------------------------------------------------------- cross-entropy

@cuda.jit
def _softmax_xent(z, targets, valid, inv_n, loss_rows, grad):
    """z, grad: (N, V); targets, valid, loss_rows: (N,). A block per row, two passes over it:
        1. each thread keeps a running max m_t and Σ exp(z − m_t) over its logits (rescaling the sum
           when the max grows), then M = max_t m_t and S = Σ_t exp(m_t − M)·sum_t over the block;
        2. grad_j = valid·(exp(z_j − M)/S − [j = y])·inv_n,   loss = valid·(log S + M − z_y)."""
    buf = cuda.shared.array(_REDUCE_BUF, float32)
    N, V = z.shape
    t, nt = cuda.threadIdx.x, cuda.blockDim.x
    for i in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        m, s = NEG_INF, ZERO
        for j in range(t, V, nt):
            zj = z[i, j]
            if zj > m:
                s = s * math.exp(m - zj) + ONE
                m = zj
            else:
                s += math.exp(zj - m)
        top = _block_reduce(m, True, buf)
        total = _block_reduce(s * math.exp(m - top), False, buf)
        y = targets[i]
        scale = inv_n if valid[i] else ZERO
        inv_total = ONE / total
        for j in range(t, V, nt):
            p = math.exp(z[i, j] - top) * inv_total
            grad[i, j] = (p - ONE if j == y else p) * scale
        if t == 0:
            loss_rows[i] = math.log(total) + top - z[i, y] if valid[i] else ZERO


def softmax_xent(z, targets, valid, n_valid):
    """(loss_rows, grad) of ops/cross_entropy.softmax_xent, the logits gradient written in the same
    kernel as the loss. z: (N, V); targets, valid: (N,)."""
    xp = array_module(z)
    N, V = z.shape
    loss_rows, grad = xp.empty(N, dtype=np.float32), xp.empty_like(z)
    _launch(_softmax_xent, min(N, ROW_BLOCKS), _threads(V), z, targets, valid, np.float32(1.0 / n_valid),
            loss_rows, grad)
    return loss_rows, grad


# ----------------------------------------------------------------------------- attention

@cuda.jit(device=True)
def _load_tile(tile, src, bh, row0, scale):
    """tile[rr, d] = scale · src[bh, row0 + rr, d] for the tile's rows, zeros past the sequence's end.
    The block's threads copy consecutive elements, so the reads from global memory coalesce."""
    R, T, D = tile.shape[0], src.shape[1], src.shape[2]
    nx, ny = cuda.blockDim.x, cuda.blockDim.y
    for e in range(cuda.threadIdx.y * nx + cuda.threadIdx.x, R * D, nx * ny):
        rr, d = e // D, e % D
        tile[rr, d] = src[bh, row0 + rr, d] * scale if row0 + rr < T else ZERO


def _flash_tiles(hs):
    """(BQ, BK, TPR): queries per block, keys per tile, threads per query row. The backward's four
    (b, hs + 1) tiles must fit in 48 KB of static shared memory: b = 16 does up to hs = 128."""
    b = 16 if hs <= 128 else 8 if hs <= 256 else 4
    return b, b, math.gcd(hs, b)


def flash_shared_bytes(D, BQ, BK):
    """Static shared memory of the largest of the three flash kernels, `backward_dkv`: tiles of k,
    v (BK, D + 1), q, dy (BQ, D + 1), P and dS (BK, BQ), and lse, Δ (BQ,), in float32."""
    return 4 * (2 * BK * (D + 1) + 2 * BQ * (D + 1) + 2 * BK * BQ + 2 * BQ)


def _check_flash_tiles(D, BQ, BK, TPR):
    """Raise ValueError unless tiles (BQ, BK, TPR) can run for head size D: a row's TPR threads are
    consecutive lanes of one warp that fold the row by shuffles, so TPR is a power of two ≤ 32
    dividing D, BQ and BK; a block's BQ·TPR or BK·TPR threads are whole warps or fewer than one
    (a shuffle's mask names exactly the lanes present); static shared memory is at most 48 KB."""
    if not (1 <= TPR <= 32 and TPR & (TPR - 1) == 0 and D % TPR == 0 and BQ % TPR == 0
            and BK % TPR == 0):
        raise ValueError(f"flash tiles (BQ={BQ}, BK={BK}, TPR={TPR}) for head size {D}: TPR must be a "
                         "power of two up to 32 that divides the head size, BQ and BK.")
    for rows in (BQ, BK):
        if rows * TPR > 1024 or (rows * TPR > 32 and rows * TPR % 32):
            raise ValueError(f"flash tiles (BQ={BQ}, BK={BK}, TPR={TPR}): a block of {rows} × {TPR} "
                             "threads must be at most 32 threads or whole warps, at most 1024.")
    if flash_shared_bytes(D, BQ, BK) > SHARED_BYTES:
        raise ValueError(f"head size {D} with flash tiles (BQ={BQ}, BK={BK}) needs "
                         f"{flash_shared_bytes(D, BQ, BK) / 1024:.1f} KB of shared memory per block, more "
                         f"than the {SHARED_BYTES // 1024} KB a CUDA kernel may declare: use smaller tiles or "
                         "a smaller head size (more heads).")


def _check_flash_grid(BH):
    if BH > MAX_GRID_Y:
        raise ValueError(f"flash attention runs a block row per (sequence, head) pair, at most "
                         f"{MAX_GRID_Y:,} of them, and got {BH:,}: split the batch.")


@functools.lru_cache(maxsize=None)
def _flash_kernels(D, BQ, BK, TPR):
    """The three flash-attention kernels for head size D and tile sizes BQ, BK, TPR (compile-time
    constants). Layout: q, k, v, y, dy: (BH, T, D) with BH = batch × heads; lse, delta: (BH, T).

    A block owns a tile of rows (queries, or keys in `backward_dkv`); thread (c, r) = (threadIdx.x,
    threadIdx.y) serves row r of the tile, and with its TPR − 1 row mates splits the row's keys (for
    the scores) and its D output columns (for the accumulators), D/TPR columns each. Tiles of q, k,
    v, dy go to shared memory with a row stride of D + 1, so threads that read down a column hit
    different banks. Causality skips every key tile that lies wholly in a query tile's future.

    Forward, online softmax over key tiles, for query i with running max m and sum l:
        s_j = scale·q_i·k_j (−∞ for j > i),   m' = max(m, max_j s_j),   α = exp(m − m'),
        l ← α l + Σ_j exp(s_j − m'),   o ← α o + Σ_j exp(s_j − m') v_j,   m ← m'
        y_i = o / l,   lse_i = m + log l       (only lse is kept for the backward, never P)
    Backward, with P_ij = exp(s_ij − lse_i) recomputed and Δ_i = Σ_d dy_id y_id:
        dS_ij = P_ij (dy_i·v_j − Δ_i),   dq_i = scale Σ_j dS_ij k_j   (`backward_dq`, per query tile)
        dv_j = Σ_i P_ij dy_i,   dk_j = scale Σ_i dS_ij q_i           (`backward_dkv`, per key tile)
    Splitting dq from dk, dv recomputes P once more but needs no atomics, so results are deterministic.
    """
    _check_flash_tiles(D, BQ, BK, TPR)
    DP, ND, NK, NQ = D + 1, D // TPR, BK // TPR, BQ // TPR
    MASK = FULL_MASK if BQ * TPR >= 32 else (1 << BQ * TPR) - 1  # lanes present in a small block

    @cuda.jit
    def forward(q, k, v, scale, y, lse):
        Qs = cuda.shared.array((BQ, DP), float32)
        Ks = cuda.shared.array((BK, DP), float32)
        Vs = cuda.shared.array((BK, DP), float32)
        Ps = cuda.shared.array((BQ, BK), float32)
        red = cuda.shared.array((BQ, TPR), float32)
        s = cuda.local.array(NK, float32)
        acc = cuda.local.array(ND, float32)
        T = q.shape[1]
        bh, q0 = cuda.blockIdx.y, cuda.blockIdx.x * BQ
        c, r = cuda.threadIdx.x, cuda.threadIdx.y
        i = q0 + r
        _load_tile(Qs, q, bh, q0, scale)  # scaled once here, so a score is a plain dot product
        for dd in range(ND):
            acc[dd] = ZERO
        m, l = NEG_INF, ZERO
        for k0 in range(0, min(T, q0 + BQ), BK):
            cuda.syncthreads()  # the previous tiles are no longer read
            _load_tile(Ks, k, bh, k0, ONE)
            _load_tile(Vs, v, bh, k0, ONE)
            cuda.syncthreads()
            for jj in range(NK):
                s[jj] = ZERO
            for d in range(D):
                qd = Qs[r, d]
                for jj in range(NK):
                    s[jj] += qd * Ks[c + jj * TPR, d]
            top = NEG_INF
            for jj in range(NK):
                if k0 + c + jj * TPR > i:
                    s[jj] = NEG_INF
                top = max(top, s[jj])
            m_new = max(m, _row_reduce(top, True, red, MASK))  # finite: key 0 is in the first tile
            alpha = math.exp(m - m_new)
            psum = ZERO
            for jj in range(NK):
                p = math.exp(s[jj] - m_new)
                Ps[r, c + jj * TPR] = p
                psum += p
            l = l * alpha + _row_reduce(psum, False, red, MASK)
            m = m_new
            cuda.syncthreads()  # the row's P is complete
            for dd in range(ND):
                acc[dd] *= alpha
            for jj in range(BK):
                p = Ps[r, jj]
                for dd in range(ND):
                    acc[dd] += p * Vs[jj, c + dd * TPR]
        if i < T:
            for dd in range(ND):
                y[bh, i, c + dd * TPR] = acc[dd] / l
            if c == 0:
                lse[bh, i] = m + math.log(l)

    @cuda.jit
    def backward_dq(q, k, v, dy, lse, delta, scale, dq):
        Qs = cuda.shared.array((BQ, DP), float32)
        dYs = cuda.shared.array((BQ, DP), float32)
        Ks = cuda.shared.array((BK, DP), float32)
        Vs = cuda.shared.array((BK, DP), float32)
        dSs = cuda.shared.array((BQ, BK), float32)
        acc = cuda.local.array(ND, float32)
        T = q.shape[1]
        bh, q0 = cuda.blockIdx.y, cuda.blockIdx.x * BQ
        c, r = cuda.threadIdx.x, cuda.threadIdx.y
        i = q0 + r
        _load_tile(Qs, q, bh, q0, scale)
        _load_tile(dYs, dy, bh, q0, ONE)
        li = lse[bh, i] if i < T else ZERO
        di = delta[bh, i] if i < T else ZERO
        for dd in range(ND):
            acc[dd] = ZERO
        for k0 in range(0, min(T, q0 + BQ), BK):
            cuda.syncthreads()
            _load_tile(Ks, k, bh, k0, ONE)
            _load_tile(Vs, v, bh, k0, ONE)
            cuda.syncthreads()
            for jj in range(NK):
                jl = c + jj * TPR
                sc, dp = ZERO, ZERO
                for d in range(D):
                    sc += Qs[r, d] * Ks[jl, d]
                    dp += dYs[r, d] * Vs[jl, d]
                p = math.exp(sc - li) if k0 + jl <= i and i < T else ZERO
                dSs[r, jl] = p * (dp - di)
            cuda.syncthreads()
            for jj in range(BK):
                ds = dSs[r, jj]
                for dd in range(ND):
                    acc[dd] += ds * Ks[jj, c + dd * TPR]
        if i < T:
            for dd in range(ND):
                dq[bh, i, c + dd * TPR] = acc[dd] * scale

    @cuda.jit
    def backward_dkv(q, k, v, dy, lse, delta, scale, dk, dv):
        Ks = cuda.shared.array((BK, DP), float32)
        Vs = cuda.shared.array((BK, DP), float32)
        Qs = cuda.shared.array((BQ, DP), float32)
        dYs = cuda.shared.array((BQ, DP), float32)
        Ps = cuda.shared.array((BK, BQ), float32)
        dSs = cuda.shared.array((BK, BQ), float32)
        Ls = cuda.shared.array(BQ, float32)
        Ds = cuda.shared.array(BQ, float32)
        dk_acc = cuda.local.array(ND, float32)
        dv_acc = cuda.local.array(ND, float32)
        T = q.shape[1]
        bh, k0 = cuda.blockIdx.y, cuda.blockIdx.x * BK
        c, r = cuda.threadIdx.x, cuda.threadIdx.y
        j = k0 + r
        _load_tile(Ks, k, bh, k0, scale)
        _load_tile(Vs, v, bh, k0, ONE)
        for dd in range(ND):
            dk_acc[dd] = ZERO
            dv_acc[dd] = ZERO
        for q0 in range(k0 - k0 % BQ, T, BQ):  # the query tiles that can see this key tile
            cuda.syncthreads()
            _load_tile(Qs, q, bh, q0, ONE)
            _load_tile(dYs, dy, bh, q0, ONE)
            for e in range(r * TPR + c, BQ, BK * TPR):
                Ls[e] = lse[bh, q0 + e] if q0 + e < T else ZERO
                Ds[e] = delta[bh, q0 + e] if q0 + e < T else ZERO
            cuda.syncthreads()
            for jj in range(NQ):
                il = c + jj * TPR
                sc, dp = ZERO, ZERO
                for d in range(D):
                    sc += Qs[il, d] * Ks[r, d]
                    dp += dYs[il, d] * Vs[r, d]
                p = math.exp(sc - Ls[il]) if j <= q0 + il and q0 + il < T else ZERO
                Ps[r, il] = p
                dSs[r, il] = p * (dp - Ds[il])
            cuda.syncthreads()
            for il in range(BQ):
                p, ds = Ps[r, il], dSs[r, il]
                for dd in range(ND):
                    dv_acc[dd] += p * dYs[il, c + dd * TPR]
                    dk_acc[dd] += ds * Qs[il, c + dd * TPR]
        if j < T:
            for dd in range(ND):
                dk[bh, j, c + dd * TPR] = dk_acc[dd] * scale
                dv[bh, j, c + dd * TPR] = dv_acc[dd]

    return forward, backward_dq, backward_dkv


@cuda.jit
def _attention_simple(q, k, v, scale, y, lse):
    """The definition, one thread per query row i, no tiles and no shared memory, for comparison:
        s_ij = scale q_i·k_j,   m = max_{j ≤ i} s_ij,
        y_i = Σ_{j ≤ i} exp(s_ij − m) v_j / Σ_{j ≤ i} exp(s_ij − m)
    The scores are computed twice (for m, then for y) instead of being stored; y's row accumulates."""
    BH, T, D = q.shape
    e = cuda.grid(1)
    if e >= BH * T:
        return
    bh, i = e // T, e % T
    m = NEG_INF
    for j in range(i + 1):
        sc = ZERO
        for d in range(D):
            sc += q[bh, i, d] * k[bh, j, d]
        m = max(m, sc * scale)
    for d in range(D):
        y[bh, i, d] = ZERO
    l = ZERO
    for j in range(i + 1):
        sc = ZERO
        for d in range(D):
            sc += q[bh, i, d] * k[bh, j, d]
        p = math.exp(sc * scale - m)
        l += p
        for d in range(D):
            y[bh, i, d] += p * v[bh, j, d]
    for d in range(D):
        y[bh, i, d] /= l
    lse[bh, i] = m + math.log(l)


def _heads3(*arrays):
    """(B, H, T, hs) arrays as contiguous (B·H, T, hs)."""
    return [array_module(a).ascontiguousarray(a).reshape((-1,) + a.shape[-2:]) for a in arrays]


def attention_forward(q, k, v, scale, tiles=None):
    """(y, cache) of ops/attention.forward for q, k, v (B, H, T, hs) of equal heads, flash style: the
    cache holds y and the row log-sum-exps lse (B·H, T) instead of the (T, T) probabilities."""
    xp = array_module(q)
    q3, k3, v3 = _heads3(q, k, v)
    BH, T, hs = q3.shape
    tiles = tiles or _flash_tiles(hs)
    BQ, BK, TPR = tiles
    _check_flash_grid(BH)
    y, lse, scale = xp.empty_like(q3), xp.empty((BH, T), dtype=np.float32), np.float32(scale)
    _launch(_flash_kernels(hs, *tiles)[0], (_cdiv(T, BQ), BH), (TPR, BQ), q3, k3, v3, scale, y, lse)
    return y.reshape(q.shape), (q3, k3, v3, y, lse, scale, tiles)


def attention_forward_simple(q, k, v, scale):
    """`attention_forward` by the one-thread-per-row kernel (the same cache, so the same backward)."""
    xp = array_module(q)
    q3, k3, v3 = _heads3(q, k, v)
    BH, T, hs = q3.shape
    y, lse, scale = xp.empty_like(q3), xp.empty((BH, T), dtype=np.float32), np.float32(scale)
    _launch(_attention_simple, _cdiv(BH * T, THREADS), THREADS, q3, k3, v3, scale, y, lse)
    return y.reshape(q.shape), (q3, k3, v3, y, lse, scale, _flash_tiles(hs))


def attention_backward(dy, cache):
    """(dq, dk, dv) of ops/attention.backward, from the flash cache."""
    q3, k3, v3, y, lse, scale, tiles = cache
    BQ, BK, TPR = tiles
    BH, T, hs = q3.shape
    _check_flash_grid(BH)
    xp = array_module(dy)
    (dy3,) = _heads3(dy)
    delta = (dy3 * y).sum(axis=-1)  # Δ_i = Σ_d dy_id y_id  (BH, T)
    dq, dk, dv = xp.empty_like(q3), xp.empty_like(k3), xp.empty_like(v3)
    _, backward_dq, backward_dkv = _flash_kernels(hs, *tiles)
    _launch(backward_dq, (_cdiv(T, BQ), BH), (TPR, BQ), q3, k3, v3, dy3, lse, delta, scale, dq)
    _launch(backward_dkv, (_cdiv(T, BK), BH), (TPR, BK), q3, k3, v3, dy3, lse, delta, scale, dk, dv)
    return dq.reshape(dy.shape), dk.reshape(dy.shape), dv.reshape(dy.shape)


# ----------------------------------------------------------------------------- the op replacements
#
# The launch wrappers above, arranged as whole ops with the signatures of minparcae/ops (what
# kernels.select hands the model on a GPU). float32 only: select gives float64 the reference.

class AttentionCache(NamedTuple):
    q: object  # (N·H, T, hs) each, the key/value heads repeated for the query heads that read them
    k: object
    v: object
    y: object
    lse: object  # each query row's log Σ exp of its scores, (N·H, T): the flash cache
    scale: object
    tiles: tuple
    group: int
    shape: tuple  # q's (N, H, T, hs)


def _attention_forward(q, k, v, scale, kv=None):
    if kv is not None:  # decoding: one query row at a time, the reference is as good
        return ops_attention.forward(q, k, v, scale, kv)
    xp = array_module(q)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = xp.repeat(k, group, axis=1), xp.repeat(v, group, axis=1)
    y, (q3, k3, v3, y3, lse, scale, tiles) = attention_forward(q, k, v, scale)
    return y, AttentionCache(q3, k3, v3, y3, lse, scale, tiles, group, q.shape)


def _attention_backward(dy, cache):
    N, H, T, hs = cache.shape
    dq, dk, dv = attention_backward(dy, tuple(cache[:7]))
    if cache.group > 1:
        dk = dk.reshape(N, H // cache.group, cache.group, T, hs).sum(axis=2)
        dv = dv.reshape(N, H // cache.group, cache.group, T, hs).sum(axis=2)
    return {"q": dq, "k": dk, "v": dv}


def _rmsnorm_op_forward(x, weight=None, eps=ops_rmsnorm.EPS):
    y, xhat, r = rmsnorm_forward(x, weight, eps)
    return y, ops_rmsnorm.Cache(xhat, r, weight)


def _rmsnorm_op_add_forward(x, res, weight=None, eps=ops_rmsnorm.EPS):
    s, y, xhat, r = add_rmsnorm_forward(x, res, weight, eps)
    return s, y, ops_rmsnorm.Cache(xhat, r, weight)


def _rmsnorm_op_backward(dout, cache, dres=None):
    dx, dweight = rmsnorm_backward(dout, cache.xhat, cache.r, cache.weight, dres)
    return {"x": dx} if cache.weight is None else {"x": dx, "weight": dweight}


def _qk_norm_forward(x, cos, sin, eps=None):
    eps = ops_qk_norm.eps_for(x.dtype) if eps is None else eps
    rotated = rotary(x.transpose(0, 2, 1, 3), cos, sin)  # the kernel reads the strided heads
    y, cache = _rmsnorm_op_forward(rotated, None, eps)
    return y, ops_qk_norm.Cache(cache, ops_rotary.Cache(cos, sin))


def _qk_norm_backward(dy, cache):
    d_rotated = _rmsnorm_op_backward(dy, cache.norm)["x"]
    return {"x": rotary(d_rotated, cache.rope.cos, -cache.rope.sin).transpose(0, 2, 1, 3)}


def _mlp_forward(x, w_fc, w_proj):
    u = rows_matmul(x, w_fc)
    a, g = relu2_forward(u)
    return rows_matmul(g, w_proj), ops_mlp.Cache(ops_linear.Cache(x, w_fc), ops_linear.Cache(g, w_proj), a)


def _mlp_backward(dout, cache):
    g_proj = ops_linear.backward(dout, cache.proj)
    g_fc = ops_linear.backward(relu2_backward(g_proj["x"], cache.a), cache.fc)
    return {"x": g_fc["x"], "w_fc": g_fc["w"], "w_proj": g_proj["w"]}


def _cross_entropy_forward(logits, targets, ignore_index=ops_cross_entropy.IGNORE_INDEX, scale=1.0,
                           softcap=None):
    z, y, valid, n_valid = ops_cross_entropy.prepare(logits, targets, ignore_index, scale, softcap)
    loss_rows, grad = softmax_xent(z, y, valid, n_valid)
    return ops_cross_entropy.finish(loss_rows, grad, z, n_valid, logits.shape, scale, softcap)


def _state_forward(kind, p, h, u):
    if kind != "diagonal":
        return ops_injection.state_forward(kind, p, h, u)
    A_bar, delta, a = ops_injection.diagonal_decay(p["inject.A_log"], p["inject.dt_bias"])
    return injection_forward(h, u, A_bar), ops_injection.StateCache(kind, h, A_bar, delta, a)


def _state_backward(dx, cache, p):
    kind, h, A_bar, delta, a = cache
    if kind != "diagonal":
        return ops_injection.state_backward(dx, cache, p)
    dh, dA_bar = injection_backward(dx, h, A_bar)
    g = dA_bar * A_bar
    return {"h": dh, "u": dx, "inject.A_log": -g * delta * a,
            "inject.dt_bias": -g * a * ops_injection.sigmoid(p["inject.dt_bias"])}


def _embedding_backward(dout, cache):
    xp = array_module(dout)
    dtable = xp.zeros(cache.shape, dtype=dout.dtype)
    scatter_add(dtable, cache.ids.reshape(-1), dout.reshape(-1, cache.shape[1]))
    return {"table": dtable}


REPLACEMENTS = {
    "attention": replace(ops_attention, forward=_attention_forward, backward=_attention_backward),
    "rmsnorm": replace(ops_rmsnorm, forward=_rmsnorm_op_forward, add_forward=_rmsnorm_op_add_forward,
                       backward=_rmsnorm_op_backward),
    "qk_norm": replace(ops_qk_norm, forward=_qk_norm_forward, backward=_qk_norm_backward),
    "mlp": replace(ops_mlp, forward=_mlp_forward, backward=_mlp_backward),
    "cross_entropy": replace(ops_cross_entropy, forward=_cross_entropy_forward),
    "injection": replace(ops_injection, state_forward=_state_forward, state_backward=_state_backward),
    "embedding": replace(ops_embedding, backward=_embedding_backward),
}
